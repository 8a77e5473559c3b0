"""``sandbox eval``: score a run's class-balanced samples, or a folder/.npz of images, as JSON.

    sandbox eval --run_dir DIR                                  # the dataset's offline score (digits), 1,000 samples
    sandbox eval --run_dir DIR --mode 50k --ref REF.npz         # + FID-50K, IS, precision/recall (Inception)
    sandbox eval --images SAMPLES.npz|DIR --ref REF.npz|DIR     # score images made elsewhere

A run's samples are written to RUN/eval/samples-<N>-<key>.npz and reused by the next eval with the same
settings. REF is a folder of images, an .npz of images, or an ADM-style .npz holding ``mu``/``sigma``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentParser, Namespace

from sandbox.cli.sample import add_sampling_arguments, check_sampling_arguments
from sandbox.errors import UserError

NAME = "eval"
HELP = "Score samples: the dataset's offline score (digits) and, with --ref, FID / IS / precision-recall."
ORDER = 30


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p, run_dir_required=False)
    p.set_defaults(num_images=1000, progress=False)
    p.add_argument("--mode", type=Optional[Literal["5k", "10k", "50k"]], default=None,
                   help="Sample 5,000, 10,000 or 50,000 images (overrides --num_images); FID-50K is the paper's.")
    p.add_argument("--images", type=str | None, default=None,
                   help="Score these images (folder or .npz with images/arr_0 [+ labels]) instead of sampling.")
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
    p.add_argument("--json", type=str | None, default=None, help="Also write the result here (default: RUN/eval.json).")
    return p


def _info(msg: str) -> None:
    print(msg, file=sys.stderr)  # stdout carries only the JSON result


def run(cfg: Namespace) -> None:
    from sandbox.run import distributed

    # under `torchrun --nproc_per_node N -m sandbox eval ...` the ranks split the samples; rank 0 scores
    with distributed.session(cfg.device):
        _run(cfg)


def _run(cfg: Namespace) -> None:
    from sandbox.images.io import read_image_set
    from sandbox.run.files import atomic_write_bytes

    if cfg.run_dir is None and cfg.images is None:
        raise UserError("give --run_dir (sample and score a run) or --images (score a folder or .npz)")
    if cfg.labels:
        raise UserError("eval sets are class-balanced (image i has class i % K); --labels is for `sandbox sample`")
    num_images = _num_images(cfg)
    check_sampling_arguments(cfg)
    if cfg.fidelity_batch_size < 1:
        raise UserError(f"--fidelity_batch_size must be >= 1, got {cfg.fidelity_batch_size}")
    inception = cfg.inception if cfg.inception is not None else cfg.ref is not None
    if cfg.run_dir is None and not inception:
        raise UserError("nothing to score without a run: pass --ref REF (FID, IS, precision/recall) or --inception true (IS)")
    ref = read_image_set(cfg.ref) if cfg.ref else None  # a bad reference fails before any sampling
    if inception:  # and so do missing Inception weights (the network itself loads after sampling, on rank 0)
        from sandbox.eval.fidelity import check_feature_extractor

        check_feature_extractor(cfg.feature_extractor, cfg.inception_weights)
    given = read_image_set(cfg.images) if cfg.images else None
    if given is not None and given.count == 0:
        raise UserError(f"{cfg.images} holds no images")
    result, scorer, images, labels = {}, None, None, None
    if cfg.run_dir is not None:
        scorer, images, labels = _run_samples(cfg, num_images, inception, given is None, result)
        if scorer is None and images is None and given is None:  # a rank other than 0: rank 0 scores
            return
    if given is not None:
        result["images"] = str(cfg.images)
        images, labels = given.read_all() if scorer is not None else None, given.labels
    result["num_images"] = int(len(images) if images is not None else given.count)
    result.update(_scores(cfg, scorer, images, labels, given, inception, ref))
    text = json.dumps(result, indent=2)
    print(text)
    out = cfg.json or (Path(cfg.run_dir) / "eval.json" if cfg.run_dir is not None else None)
    if out is not None:
        atomic_write_bytes(Path(out), text.encode())


def _run_samples(cfg: Namespace, num_images: int, inception: bool, sample: bool, result: dict):
    """Load the run; with ``sample``, its evaluation set (sampled, or reused from the run directory).
    Returns (the dataset's scorer, images (N,H,W,3) uint8 or None, labels); adds what it did to ``result``.
    A rank other than 0 of a multi-process run gets (None, None, None)."""
    from sandbox.cli.sample import load, sampling_options
    from sandbox.eval.samples import eval_samples
    from sandbox.run.device import autocast_dtype

    loaded = load(cfg)
    exp, model = loaded.exp, loaded.model
    scorer = loaded.dataset().scorer()
    if scorer is None and not inception:
        raise UserError(f"dataset {exp.cfg.data.class_path} has no offline scorer; pass --ref REF for FID / IS")
    result.update(run_dir=str(cfg.run_dir), step=loaded.step, ema=loaded.ema, seed=cfg.seed)
    if cfg.head_args:
        result["head_args"] = cfg.head_args
    if not sample:
        return scorer, None, None
    opts = sampling_options(cfg, loaded)
    settings = {"num_images": num_images, "seed": cfg.seed, "chunk_size": opts["batch_size"],
                "num_iter": opts["num_iter"], "cfg": float(opts["cfg"]), "cfg_schedule": opts["cfg_schedule"],
                "temperature": float(opts["temperature"]), "step": loaded.step, "ema": loaded.ema}
    if cfg.head_args:  # another sampler is another evaluation set (the samples are cached by settings)
        settings["head_args"] = cfg.head_args
    if cfg.compile:  # compiled kernels round differently: their own set
        settings["compile"] = True
    if not cfg.fast_paths:  # so does the plain path
        settings["fast_paths"] = False
    conditioning = _conditioning(loaded, num_images, settings, result)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    images, labels, path, reused = eval_samples(exp, model, settings, Path(cfg.run_dir), progress=cfg.progress,
                                                autocast_dtype=autocast_dtype(loaded.train_config.precision, device),
                                                conditioning=conditioning)
    if images is None:
        return None, None, None
    _info(f"{'reusing' if reused else 'wrote'} {num_images} samples {path}" if path else
          f"sampled {num_images} images (not kept)")
    result["samples"] = str(path) if path else None
    if not reused:
        result["sampling_seconds"] = round(time.perf_counter() - t0, 2)
    return scorer, images, labels


def _conditioning(loaded, num_images: int, settings: dict, result: dict):
    """For a run that does not read class labels: the data asking for class i % K of each image, the way its
    condition reads (a captioned dataset's held-out prompts), keyed into the set's settings; else None."""
    from sandbox.eval.samples import balanced_labels, conditioning_for, data_key

    condition = loaded.model.condition
    if condition.field == "label":
        return None
    labels = balanced_labels(num_images, loaded.exp.num_classes)
    conditioning = conditioning_for(condition, loaded.dataset(), labels)
    settings["conditioning"] = data_key(conditioning)
    if "text" in conditioning:  # which prompts asked, in the JSON: a few of them
        distinct = list(dict.fromkeys(conditioning["text"]))
        result["prompts"] = {"distinct": len(distinct), "first": distinct[:4]}
    return conditioning


def _scores(cfg: Namespace, scorer, images, labels, given, inception: bool, ref) -> dict:
    """The dataset's offline score (with labels) and the Inception metrics of the images."""
    import numpy as np
    import torch

    from sandbox.images.io import from_uint8

    out = {}
    if scorer is not None:
        if labels is None:
            _info(f"note: {cfg.images} has no labels; the dataset's offline score needs them and is skipped")
        else:
            out.update(scorer.score(from_uint8(images), torch.as_tensor(np.asarray(labels))))
    if inception:
        bs = cfg.fidelity_batch_size
        batches = (images[i : i + bs] for i in range(0, len(images), bs)) if images is not None else given.batches(bs)
        out.update(_inception_metrics(cfg, batches, ref))
    return out


def _num_images(cfg: Namespace) -> int:
    from sandbox.eval.samples import MODES

    n = MODES[cfg.mode] if cfg.mode else cfg.num_images
    if n < 1:
        raise UserError("--num_images must be >= 1")
    return n


def _inception_metrics(cfg: Namespace, batches, ref) -> dict:
    """IS of the images (uint8 batches), and FID / precision-recall against ``ref`` when given."""
    from sandbox.eval.fidelity import (
        extract_features,
        fidelity_scores,
        load_feature_extractor,
        reference_features,
    )
    from sandbox.run.device import resolve_device

    device = resolve_device(cfg.device)
    extractor = load_feature_extractor(cfg.feature_extractor, cfg.inception_weights, device)
    feats = extract_features(extractor, batches, device)
    ref_feats = None
    if ref is not None:
        ref_feats = reference_features(ref, extractor, extractor.weights_file, device, cfg.fidelity_batch_size)
    out = fidelity_scores(feats, extractor, ref, ref_feats, device)
    if ref is not None:
        out["reference"] = str(ref.path)
    return out
