"""Scoring a run's samples, shared by ``sandbox eval`` and ``sandbox sweep``: the settings that key an evaluation
set, the set itself (sampled or reused), the dataset's offline score and the Inception metrics of it, and the
mean and spread of a score over seeds.

A sample set is keyed by every setting that fixes its images (``eval_settings``), so an eval and a sweep point
with the same settings share one file in RUN/eval/, and a sweep resumed after a kill samples nothing twice.

References:
    Dhariwal & Nichol 2021 and MAR sec. 5 (class-balanced evaluation sets, FID-50K); Heusel et al. 2017 (FID).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sandbox.errors import UserError

# numbers in a result that describe the evaluation rather than the samples: no mean or spread over seeds
BOOKKEEPING = ("seed", "step", "num_images", "num_reference")
TIMINGS = ("sampling_seconds",)  # the machine's, not the samples': kept per seed (a reused set has none)


def info(msg: str) -> None:
    print(msg, file=sys.stderr)  # stdout carries only a command's JSON result


# --------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------
def eval_settings(loaded, options: dict, *, num_images: int, seed: int, head_args: dict | None = None,
                  compile: bool = False, fast_paths: bool = True) -> dict:
    """Everything that fixes the images of an evaluation set (``sandbox.eval.samples.eval_samples`` keys its
    file by them): ``options`` are the checked sampling options (num_iter, cfg, cfg_schedule, temperature,
    batch_size, head_steps, cache: ``sandbox.cli.sample.sampling_options``), ``loaded`` the run (its step and weights)."""
    settings = {"num_images": num_images, "seed": seed, "chunk_size": options["batch_size"],
                "num_iter": options["num_iter"], "cfg": float(options["cfg"]), "cfg_schedule": options["cfg_schedule"],
                "temperature": float(options["temperature"]), "step": loaded.step, "ema": loaded.ema}
    if head_args:  # another sampler is another evaluation set
        settings["head_args"] = head_args
    if options.get("head_steps") is not None:  # so is another step schedule, and a cache (keys only when set:
        settings["head_steps"] = options["head_steps"]  # the sets of runs evaluated before them keep their names)
    if options.get("cache", "off") != "off":
        settings["cache"] = options["cache"]
    if compile:  # compiled kernels round differently: their own set
        settings["compile"] = True
    if not fast_paths:  # so does the plain path
        settings["fast_paths"] = False
    return settings


@dataclass
class SampleSet:
    """An evaluation set: images (N,H,W,3) uint8 and labels (N,) on rank 0 (None on the other ranks), where it
    is kept (None: not kept, a read-only run directory), whether it was reused, and the sampling time."""

    images: np.ndarray | None
    labels: np.ndarray | None
    path: Path | None
    reused: bool
    seconds: float
    prompts: dict | None = None  # a text-conditioned run: how many distinct prompts asked, and the first few

    def describe(self) -> dict:
        out = {"samples": str(self.path) if self.path else None}
        if self.prompts is not None:
            out["prompts"] = self.prompts
        if not self.reused:
            out["sampling_seconds"] = round(self.seconds, 2)
        return out


def sample_set(loaded, settings: dict, progress: bool = False) -> SampleSet:
    """The evaluation set of ``settings`` for the loaded run: reused from RUN/eval/ or sampled (split over the
    ranks of a torchrun session; every rank must call it) and kept there."""
    from sandbox.eval.samples import eval_samples
    from sandbox.run.device import autocast_dtype

    device = next(loaded.model.parameters()).device
    conditioning, prompts = _conditioning(loaded, settings["num_images"])
    if conditioning is not None:  # the data that asks is part of what fixes the set
        from sandbox.eval.samples import data_key

        settings = {**settings, "conditioning": data_key(conditioning)}
    t0 = time.perf_counter()
    images, labels, path, reused = eval_samples(
        loaded.exp, loaded.model, settings, loaded.root, progress=progress,
        autocast_dtype=autocast_dtype(loaded.train_config.precision, device), conditioning=conditioning)
    seconds = time.perf_counter() - t0
    if images is not None:
        n = settings["num_images"]
        info(f"{'reusing' if reused else 'wrote'} {n} samples {path}" if path else f"sampled {n} images (not kept)")
    return SampleSet(images, labels, path, reused, seconds, prompts)


def _conditioning(loaded, num_images: int) -> tuple[object, dict | None]:
    """For a run that does not read class labels: the data asking for class i % K of each image, the way its
    condition reads it (a captioned dataset's held-out prompts), and a summary of the prompts; else (None, None)."""
    from sandbox.eval.samples import balanced_labels, conditioning_for

    condition = loaded.model.condition
    if condition.field == "label":
        return None, None
    labels = balanced_labels(num_images, loaded.exp.num_classes)
    conditioning = conditioning_for(condition, loaded.dataset(), labels)
    if not (isinstance(conditioning, dict) and "text" in conditioning):
        return conditioning, None
    distinct = list(dict.fromkeys(conditioning["text"]))
    return conditioning, {"distinct": len(distinct), "first": distinct[:4]}


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------
class Inception:
    """FID, IS and precision/recall (``sandbox.eval.fidelity``) against one reference. The feature extractor and
    the reference's features load on first use and stay, so a sweep pays for them once."""

    def __init__(self, extractor: str, weights: str | None, ref, device, batch_size: int):
        self.name, self.weights, self.ref, self.device, self.batch_size = extractor, weights, ref, device, batch_size
        self._extractor, self._ref_feats = None, None

    def __call__(self, batches) -> dict:
        """The metrics of the images in ``batches`` (uint8 (b,H,W,3) arrays)."""
        from sandbox.eval.fidelity import (
            extract_features,
            fidelity_scores,
            load_feature_extractor,
            reference_features,
        )

        if self._extractor is None:
            self._extractor = load_feature_extractor(self.name, self.weights, self.device)
            if self.ref is not None:
                self._ref_feats = reference_features(self.ref, self._extractor, self._extractor.weights_file,
                                                     self.device, self.batch_size)
        feats = extract_features(self._extractor, batches, self.device)
        out = fidelity_scores(feats, self._extractor, self.ref, self._ref_feats, self.device)
        if self.ref is not None:
            out["reference"] = str(self.ref.path)
        return out

    def of_images(self, images: np.ndarray) -> dict:
        bs = self.batch_size
        return self(images[i : i + bs] for i in range(0, len(images), bs))


def check_inception(extractor: str, weights: str | None, ref_path: str | None, inception: bool | None, device,
                    batch_size: int) -> Inception | None:
    """The Inception metrics a command asked for (``inception`` None: when a reference is given), checked before
    anything is sampled: a bad reference or missing weights cost nothing. None when not asked for."""
    from sandbox.eval.fidelity import check_feature_extractor
    from sandbox.images.io import read_image_set
    from sandbox.run.device import resolve_device

    if batch_size < 1:
        raise UserError(f"--fidelity_batch_size must be >= 1, got {batch_size}")
    wanted = inception if inception is not None else ref_path is not None
    ref = read_image_set(ref_path) if ref_path else None  # a bad reference fails before any sampling
    if not wanted:
        return None
    check_feature_extractor(extractor, weights)  # and so do missing weights (the network loads on first use)
    return Inception(extractor, weights, ref, resolve_device(device), batch_size)


def score_samples(scorer, inception: Inception | None, images: np.ndarray, labels) -> dict:
    """The dataset's offline score of ``images`` (uint8 (N,H,W,3)) given ``labels`` (when both are there), and
    the Inception metrics."""
    from sandbox.images.io import from_uint8

    out = {}
    if scorer is not None and labels is not None:
        out.update(scorer.score(from_uint8(images), torch.as_tensor(np.asarray(labels))))
    if inception is not None:
        out.update(inception.of_images(images))
    return out


def dataset_scorer(loaded, inception: Inception | None, nll: bool = False):
    """The offline scorer of the run's dataset (None when it has none); one error line when there is then
    nothing to measure (no scorer, no Inception metrics and no likelihood)."""
    cfg = loaded.exp.cfg
    scorer = loaded.dataset().scorer()
    if scorer is None and inception is None and not nll:
        raise UserError(f"dataset {cfg.data.class_path} has no offline scorer; pass --ref REF for FID / IS")
    return scorer


# --------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------
def seed_list(first: int, count: int) -> list[int]:
    """The seeds of ``--seeds count``: first, first + 1, ... (seed s fixes the sample set and the NLL's draws)."""
    if count < 1:
        raise UserError(f"--seeds must be >= 1, got {count}")
    return list(range(first, first + count))


def over_seeds(results: list[dict]) -> tuple[dict, dict]:
    """(mean, std) of every number the per-seed ``results`` share (``BOOKKEEPING`` and ``TIMINGS`` aside); std is
    the sample standard deviation (n - 1), 0 for one seed."""
    keys = [k for k, v in results[0].items() if _number(v) and k not in BOOKKEEPING + TIMINGS
            and all(_number(r.get(k)) for r in results)]
    mean = {k: statistics.fmean(float(r[k]) for r in results) for k in keys}
    std = {k: statistics.stdev(float(r[k]) for r in results) if len(results) > 1 else 0.0 for k in keys}
    return mean, std


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# Likelihood of held-out data (--nll)
# --------------------------------------------------------------------------------------
def heldout_data(loaded):
    """The run's held-out split (``Dataset.heldout``), checked before anything is sampled: one error line when
    the head has no likelihood or the dataset no held-out split of images."""
    from sandbox.config.recipe import instantiate

    head, cfg = loaded.model.head, loaded.exp.cfg
    if not getattr(head, "has_nll", False):
        raise UserError(f"head {type(head).__name__} has no likelihood (has_nll is False); --nll needs a head that "
                        "implements nll()")
    held = instantiate(cfg, "data").heldout()
    if held is None or len(held) == 0:
        raise UserError(f"dataset {cfg.data.class_path} has no held-out split (Dataset.heldout() is None); --nll "
                        "measures the likelihood of held-out data")
    if held.provides != "images" or held.image_size != loaded.exp.image_size:
        raise UserError(f"the held-out split of {cfg.data.class_path} does not hold {loaded.exp.image_size} px images")
    return held


def heldout_likelihood(loaded, held, options: dict, *, num_images: int, seed: int, head_args: dict | None = None,
                       progress: bool = False) -> dict | None:
    """Bits per dimension of the first ``num_images`` items of ``held`` (``heldout_indices``) along the ordering's
    plan of ``options["num_iter"]`` steps, with the per-step table (.txt), its plot (.png) and the summary (.json)
    in RUN/eval/nll-<N>-<key>.*; a summary with the same settings there is reused. Returns the result's entries
    (``nll_bits_per_dim`` and the details under ``nll``) on rank 0, None on the other ranks."""
    import dataclasses

    from sandbox.eval.likelihood import dataset_nll, heldout_indices, step_token_counts, summarize_nll
    from sandbox.run import distributed
    from sandbox.run.device import autocast_dtype

    if num_images < 1:
        raise UserError(f"--nll_images must be >= 1, got {num_images}")
    indices = heldout_indices(held, num_images)
    settings = {"nll_images": len(indices), "data": repr(held), "seed": seed, "num_iter": options["num_iter"],
                "batch_size": options["batch_size"], "step": loaded.step, "ema": loaded.ema, "head_args": head_args}
    stem = _nll_stem(loaded.root, settings)
    summary = _cached_nll(stem.with_suffix(".json"), settings)
    reused = summary is not None
    if not reused:
        t0, exp, model = time.perf_counter(), loaded.exp, loaded.model
        nll = dataset_nll(exp, model, held, indices, num_iter=options["num_iter"], batch_size=options["batch_size"],
                          seed=seed, autocast_dtype=autocast_dtype(loaded.train_config.precision, model.device),
                          progress=progress)
        if nll is not None:  # rank 0
            L, C = exp.ordering.seq_len, exp.tokenizer.token_dim
            steps = step_token_counts(exp.ordering, options["num_iter"])
            summary = dataclasses.asdict(summarize_nll(nll, L, C, steps))
            summary.update(settings=settings, seconds=round(time.perf_counter() - t0, 2))
            try:
                _write_nll(stem, summary, f"{type(model.head).__name__} on {held!r}, {options['num_iter']} steps")
            except UserError as e:  # a read-only run directory: reported all the same, just not kept
                info(f"warning: could not keep the likelihood's table and plot ({e})")
    if not distributed.info().is_main:
        return None
    info(f"{'reusing' if reused else 'wrote'} the likelihood of {len(indices)} held-out images {stem}.json")
    return {"nll_bits_per_dim": summary["bits_per_dim"],
            "nll": {"stderr": summary["stderr"], "images": summary["num_images"], "steps": len(summary["step_share"]),
                    "num_iter": options["num_iter"], "data": repr(held), "table": str(stem.with_suffix(".txt")),
                    "plot": str(stem.with_suffix(".png")), "seconds": summary["seconds"]}}


def _nll_stem(root: Path, settings: dict) -> Path:
    """RUN/eval/nll-<N>-<hash of the settings>"""
    import hashlib
    import json

    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / "eval" / f"nll-{settings['nll_images']}-{key}"


def _cached_nll(path: Path, settings: dict) -> dict | None:
    """The summary kept at ``path`` when it was made with exactly ``settings`` (a damaged one is computed again)."""
    import json

    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        return summary if isinstance(summary, dict) and summary.get("settings") == settings else None
    except (OSError, ValueError):
        return None


def _write_nll(stem: Path, summary: dict, title: str) -> None:
    """The summary (.json), the per-step table (.txt) and the plot (.png); the .json last: it marks them done."""
    import json

    from sandbox.eval.likelihood import NLLSummary, plot_nll_steps
    from sandbox.run.files import atomic_write_bytes

    fields = {k: summary[k] for k in NLLSummary.__dataclass_fields__}
    table = NLLSummary(**fields)
    atomic_write_bytes(stem.with_suffix(".txt"), f"{title}\n{table.table()}\n".encode())
    plot_nll_steps(table, stem.with_suffix(".png"), title.split(" on ")[0])
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(summary, indent=2).encode())
