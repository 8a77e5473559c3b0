#!/usr/bin/env bash
# Issue 22, item 6: the quickstart's quality-speed map -> docs/performance.md (the table between its pareto
# markers) and docs/quickstart_pareto.png. Run it alone on the machine (the timing is part of the result):
#
#   .ci/measure_fast_sampling.sh                     # trains runs/quickstart_v1 if missing, then maps it
#   RECIPE=recipes/quickstart.yaml RUN=runs/quickstart .ci/measure_fast_sampling.sh   # the tuned quickstart
#   RUN=/path/to/run .ci/measure_fast_sampling.sh    # another trained run
#
# sandbox bench --pareto scores every point of the default grid (num_iter 4/8/16 x head_steps 100% /
# linear:100%:10% x cache off / approx:2) over 3 seeds of 1,000 samples (sandbox sweep: finished points are kept,
# so a stopped map continues) and times each in one process over 256 images. Expected on a free 2-core CPU:
# about 20 minutes (36 sample sets of 1,000 digits, 15-65 s each, then the timing pass), plus ~6 to train.
# What `--fast true` sets (FAST_SAMPLING in sandbox/fast/sampling.py, updated by hand with the commit it was read
# at) is the fastest point found within the seeds' spread of the default's Frechet distance, over this map and the
# step-count maps of docs/performance.md ("Step counts at four plan steps": --pareto_grid with constant and annealed
# head_steps at num_iter 4), confirmed side by side by .ci/measure_fast_target.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the published map and --fast were measured on the quickstart before its tuning (docs/tuning.md): v1 by default
RECIPE="${RECIPE:-recipes/quickstart_v1.yaml}"
RUN="${RUN:-runs/quickstart_v1}"
python -m sandbox train --config "$RECIPE" --run_dir "$RUN"
python -m sandbox bench --pareto "$RUN" --json "$RUN/sweeps/pareto/bench.json" > /dev/null
python - "$RUN" <<'PY'
import shutil, sys
from pathlib import Path

from sandbox.eval.provenance import write_between_markers

folder = Path(sys.argv[1]) / "sweeps" / "pareto"
write_between_markers(Path("docs/performance.md"), (folder / "pareto.md").read_text().strip(),
                      "<!-- pareto table: begin (.ci/measure_fast_sampling.sh) -->", "<!-- pareto table: end -->",
                      "measure_fast_sampling")
shutil.copyfile(folder / "pareto.png", "docs/quickstart_pareto.png")
print("wrote docs/performance.md and docs/quickstart_pareto.png")
PY
