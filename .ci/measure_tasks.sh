#!/usr/bin/env bash
# Issue 23, item 4: other tasks with the same model, measured on digits -> docs/tasks.md (tables) and
# docs/tasks_*.png (pictures). Run it alone on the machine, from anywhere:
#
#   .ci/measure_tasks.sh                        # trains the two runs if they are missing, then measures
#   SANDBOX_TASKS_TINY=1 .ci/measure_tasks.sh /tmp/tasks    # a few steps of tiny runs: does it all work?
#
# 1. the v1 quickstart run (runs/quickstart_v1: recipes/quickstart_v1.yaml, the quickstart before its tuning) and
#    the multiscale quickstart run (runs/quickstart_multiscale); a finished run is reported complete, not trained
#    again
# 2. .ci/measure_tasks.py: on the digits scorer's held-out half (~900 real digits), 3 seeds each,
#    - bottom-half inpainting under the true label: the classifier's accuracy, the Frechet distance and its floor
#    - class-guided editing of the bottom half: the share read as the new label (and as the old one)
#    - super-resolution 4x4 -> 16x16 with the multiscale run: accuracy, Frechet distance, and bicubic upsampling
#    the pictures (one digit per class, seed 0), and the tables between docs/tasks.md's markers
#
# Expected on a free 2-core CPU: about 25 minutes with both runs to train (~6 + ~7 min), about 10 without
# (x 3 seeds: an inpainting and a class-guided pass over ~900 digits, ~1-1.5 min each, and a super-resolution
# pass, ~45 s; then the pictures, ~20 s, and the classifier's one-time ~20 s). Estimated from sampling 64 images
# on the shared CPU against the README's 1,000 quickstart samples in 63 s: inpainting costs ~1.3x plain sampling
# per image (the encoder sees the known half at every step), super-resolution ~0.7x. Every finished (task, seed) is kept in WORKDIR/results.json, so a
# stopped measurement continues where it stopped.
#
# WORKDIR (default runs/tasks) holds the inputs, the edited sets and results.json. Environment: QUICKSTART_RUN,
# MULTISCALE_RUN (the run directories), SEEDS (default "0 1 2"). With SANDBOX_TASKS_TINY=1 both runs are a few
# steps of a tiny model in WORKDIR, the sets are 20 digits and the page and pictures go to WORKDIR: the numbers
# mean nothing, the wiring is what is tested (tests/test_edit.py runs it so).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="${1:-runs/tasks}"
SEEDS="${SEEDS:-0 1 2}"
mkdir -p "$WORK"

if [ -n "${SANDBOX_TASKS_TINY:-}" ] && [ "${SANDBOX_TASKS_TINY}" != 0 ]; then
  QUICK="${QUICKSTART_RUN:-$WORK/quickstart_v1}"
  MULTI="${MULTISCALE_RUN:-$WORK/quickstart_multiscale}"
  TINY=(--train.steps 3 --train.batch_size 8 --model.encoder_dim 32 --model.decoder_dim 32
        --model.encoder_heads 2 --model.decoder_heads 2 --model.encoder_depth 1 --model.decoder_depth 1
        --head.init_args.width 32 --head.init_args.depth 1 --head.init_args.num_sampling_steps 4
        --sample.num_iter 4 --sample.grid_classes 2 --sample.grid_per_class 1)
else
  QUICK="${QUICKSTART_RUN:-runs/quickstart_v1}"
  MULTI="${MULTISCALE_RUN:-runs/quickstart_multiscale}"
  TINY=()
fi

# the published tables were measured on the quickstart before its tuning (docs/tuning.md): v1
python -m sandbox train --config recipes/quickstart_v1.yaml --run_dir "$QUICK" "${TINY[@]}"
python -m sandbox train --config recipes/quickstart_multiscale.yaml --run_dir "$MULTI" "${TINY[@]}"
# shellcheck disable=SC2086  # SEEDS is a list
python .ci/measure_tasks.py --quickstart "$QUICK" --multiscale "$MULTI" --workdir "$WORK" --seeds $SEEDS
