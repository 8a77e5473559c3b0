"""``sandbox eval``: score a run's class-balanced samples, or a folder/.npz of images, as JSON.

    sandbox eval --run_dir DIR                                  # the dataset's offline score (digits), 1,000 samples
    sandbox eval --run_dir DIR --seeds 3                        # mean and std over 3 sample sets (seeds 0, 1, 2)
    sandbox eval --run_dir DIR --nll                            # + bits/dim of the dataset's held-out split
    sandbox eval --run_dir DIR --mode 50k --ref REF.npz         # + FID-50K, IS, precision/recall (Inception)
    sandbox eval --images SAMPLES.npz|DIR --ref REF.npz|DIR     # score images made elsewhere

A run's samples are written to RUN/eval/samples-<N>-<key>.npz and reused by the next eval with the same
settings. REF is a folder of images, an .npz of images, or an ADM-style .npz holding ``mu``/``sigma``.
With several seeds, eval.json holds {"seeds": [one result per seed], "mean": {...}, "std": {...}}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from sandbox.cli.sample import add_sampling_arguments, check_sampling_arguments
from sandbox.errors import UserError

NAME = "eval"
HELP = "Score samples: the dataset's offline score (digits) and, with --ref, FID / IS / precision-recall."
ORDER = 30


def add_scoring_arguments(p: ArgumentParser) -> None:
    """Options shared by the commands that score samples (eval, sweep): the Inception metrics and seeds."""
    p.add_argument("--ref", type=str | None, default=None,
                   help="Reference for FID / precision-recall: a folder of images, an .npz of images, or an "
                        "ADM-style .npz with mu/sigma (+ arr_0 images for precision/recall).")
    p.add_argument("--inception_weights", type=str | None, default=None,
                   help="Inception weights (weights-inception-2015-12-05-6726825d.pth); default: "
                        "$SANDBOX_INCEPTION_WEIGHTS, $SANDBOX_CACHE/weights or $TORCH_HOME/hub/checkpoints.")
    p.add_argument("--feature_extractor", type=str, default="inception-v3-compat",
                   help="torch-fidelity feature extractor (a --plugin file may register others).")
    p.add_argument("--inception", type=bool | None, default=None,
                   help="Compute the Inception metrics (IS, and with --ref FID and precision/recall); "
                        "default: when --ref is given.")
    p.add_argument("--fidelity_batch_size", type=int, default=64, help="Images per feature-extractor batch.")
    p.add_argument("--seeds", type=int, default=1,
                   help="Score N sample sets, seeds --seed, --seed + 1, ...: the mean and standard deviation of "
                        "every score (and each seed's values).")


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p, run_dir_required=False)
    p.set_defaults(num_images=1000, progress=False)
    p.add_argument("--mode", type=Optional[Literal["5k", "10k", "50k"]], default=None,
                   help="Sample 5,000, 10,000 or 50,000 images (overrides --num_images); FID-50K is the paper's.")
    p.add_argument("--images", type=str | None, default=None,
                   help="Score these images (folder or .npz with images/arr_0 [+ labels]) instead of sampling.")
    add_scoring_arguments(p)
    p.add_argument("--nll", action=ActionYesNo(no_prefix="no_"), nargs="?", default=False,
                   help="(--nll, or --nll true|false) Also the negative log-likelihood of the dataset's held-out split in bits per dimension, "
                        "with a per-step table and plot in RUN/eval/ (the estimators' cost: --nll_images, "
                        "--head_args '{nll_timesteps: 50}' for the diffusion head).")
    p.add_argument("--nll_images", type=int, default=256,
                   help="Held-out images for --nll (a fixed subset; 256 give a standard error ~1% of the value).")
    p.add_argument("--sample", type=bool, default=True,
                   help="Sample and score images (false: with --nll, the likelihood alone).")
    p.add_argument("--json", type=str | None, default=None, help="Also write the result here (default: RUN/eval.json).")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.run import distributed

    # under `torchrun --nproc_per_node N -m sandbox eval ...` the ranks split the samples; rank 0 scores
    with distributed.session(cfg.device):
        _run(cfg)


def _run(cfg: Namespace) -> None:
    from sandbox.eval.scoring import check_inception, seed_list
    from sandbox.images.io import read_image_set

    if cfg.run_dir is None and cfg.images is None:
        raise UserError("give --run_dir (sample and score a run) or --images (score a folder or .npz)")
    if cfg.labels:
        raise UserError("eval sets are class-balanced (image i has class i % K); --labels is for `sandbox sample`")
    num_images = _num_images(cfg)
    seeds = seed_list(cfg.seed, cfg.seeds)
    if cfg.run_dir is None and (len(seeds) > 1 or cfg.nll):
        raise UserError(f"{'--seeds' if len(seeds) > 1 else '--nll'} needs --run_dir: it samples or reads a run")
    if not cfg.sample and not cfg.nll:
        raise UserError("--sample false leaves nothing to do without --nll")
    if cfg.nll and cfg.nll_images < 1:
        raise UserError(f"--nll_images must be >= 1, got {cfg.nll_images}")
    check_sampling_arguments(cfg)
    inception = check_inception(cfg.feature_extractor, cfg.inception_weights, cfg.ref, cfg.inception, cfg.device,
                                cfg.fidelity_batch_size)
    if cfg.run_dir is None and inception is None:
        raise UserError("nothing to score without a run: pass --ref REF (FID, IS, precision/recall) or --inception true (IS)")
    given = read_image_set(cfg.images) if cfg.images else None
    if given is not None and given.count == 0:
        raise UserError(f"{cfg.images} holds no images")
    if cfg.run_dir is None:
        result = _score_given(cfg, given, None, inception)
    else:
        result = _score_run(cfg, seeds, num_images, given, inception)
        if result is None:  # a rank other than 0: rank 0 writes
            return
    text = json.dumps(result, indent=2)
    print(text)
    out = cfg.json or (Path(cfg.run_dir) / "eval.json" if cfg.run_dir is not None else None)
    if out is not None:
        from sandbox.run.files import atomic_write_bytes

        atomic_write_bytes(Path(out), text.encode())


def _score_given(cfg: Namespace, given, scorer, inception) -> dict:
    """Scores of the images of ``--images`` (the run's offline scorer when a run is named)."""
    from sandbox.eval.scoring import info, score_samples

    result = {"images": str(cfg.images), "num_images": int(given.count)}
    if scorer is not None:
        if given.labels is None:
            info(f"note: {cfg.images} has no labels; the dataset's offline score needs them and is skipped")
        else:
            result.update(score_samples(scorer, None, given.read_all(), given.labels))
    if inception is not None:
        result.update(inception(given.batches(inception.batch_size)))
    return result


def _score_run(cfg: Namespace, seeds: list[int], num_images: int, given, inception) -> dict | None:
    """Load the run and, for each seed, its evaluation set's scores (and the held-out likelihood): one flat
    result for one seed, the seeds form for several. None on a rank other than 0."""
    from sandbox.cli.sample import load, sampling_options
    from sandbox.eval.scoring import dataset_scorer, heldout_data, over_seeds

    loaded = load(cfg)
    scorer = dataset_scorer(loaded, inception, nll=cfg.nll)
    held = heldout_data(loaded) if cfg.nll else None  # a head without a likelihood: before any sampling
    head = {"run_dir": str(cfg.run_dir), "step": loaded.step, "ema": loaded.ema}
    if cfg.head_args:
        head["head_args"] = cfg.head_args
    if given is not None:  # score images made elsewhere with the run's scorer
        return {**head, **_score_given(cfg, given, scorer, inception)}
    opts = sampling_options(cfg, loaded)
    per_seed = [_one_seed(cfg, loaded, opts, seed, num_images, scorer, inception, held) for seed in seeds]
    if per_seed[0] is None:
        return None
    if len(per_seed) == 1:
        return {**head, **per_seed[0]}
    mean, std = over_seeds(per_seed)
    count = {"num_images": num_images} if cfg.sample else {}
    return {**head, **count, "seeds": per_seed, "mean": mean, "std": std}


def _one_seed(cfg: Namespace, loaded, opts: dict, seed: int, num_images: int, scorer, inception, held) -> dict | None:
    """One seed's flat result: its evaluation set's scores, and the held-out likelihood with --nll. None on a rank
    other than 0 (which takes part in both all the same: the ranks split the images and the likelihood's chunks)."""
    from sandbox.eval.scoring import eval_settings, heldout_likelihood, sample_set, score_samples
    from sandbox.run import distributed

    result = {"seed": seed}
    if cfg.sample:
        settings = eval_settings(loaded, opts, num_images=num_images, seed=seed, head_args=cfg.head_args,
                                 compile=cfg.compile, fast_paths=cfg.fast_paths)
        samples = sample_set(loaded, settings, progress=cfg.progress)
        if samples.images is not None:
            result.update(samples.describe(), num_images=len(samples.images))
            result.update(score_samples(scorer, inception, samples.images, samples.labels))
    if held is not None:
        nll = heldout_likelihood(loaded, held, opts, num_images=cfg.nll_images, seed=seed, head_args=cfg.head_args,
                                 progress=cfg.progress)
        result.update(nll or {})
    return result if distributed.info().is_main else None


def _num_images(cfg: Namespace) -> int:
    from sandbox.eval.samples import MODES

    n = MODES[cfg.mode] if cfg.mode else cfg.num_images
    if n < 1:
        raise UserError("--num_images must be >= 1")
    return n
