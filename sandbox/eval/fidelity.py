"""FID, Inception Score and precision/recall of image sets, computed with torch-fidelity from local weights.

Why torch-fidelity (and not torchmetrics): it is the one well-kept library that gives all three metrics the
paper and its baselines report -- ISC, FID and the k-NN precision/recall of Kynkaenniemi et al. (torchmetrics
has no precision/recall) -- from a port of the TF Inception graph that the ADM evaluation suite and the
official MAR code use (torchmetrics' FID wraps the same torch-fidelity network), and it takes a local
weights path. The sandbox only feeds it batches and reads its functions: the network and its TF-compatible
resize (``FeatureExtractorInceptionV3``), ``fid_features_to_statistics``/``fid_statistics_to_metric``,
``isc_features_to_metric`` and ``prc_features_to_metric``.

Any feature extractor in torch-fidelity's registry can replace Inception (``--feature_extractor NAME``; a
``--plugin`` file may register one with ``torch_fidelity.register_feature_extractor``): the tests inject a
tiny random network this way, so the whole path runs offline.

References:
    Heusel et al. 2017 (FID); Salimans et al. 2016 (Inception Score, 10 splits); Kynkaenniemi et al. 2019
    (improved precision and recall, k = 3); Dhariwal & Nichol 2021 (ADM evaluation suite: reference batches
    holding mu/sigma, FID of 50k samples); MAR sec. 5 (FID-50K, IS).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sandbox.errors import UserError
from sandbox.images.io import ImageSet
from sandbox.run.checkpoints import load_cached, load_checkpoint, save_checkpoint
from sandbox.weights import cache_dir, find_weights

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-Inception port: the network of published FIDs
# torch-fidelity's file; pytorch-fid's file of the same TF graph has the same layout and loads too
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "SANDBOX_INCEPTION_WEIGHTS"
PRC_NEIGHBORHOOD = 3  # Kynkaenniemi et al. 2019: k = 3 nearest neighbours define each sample's manifold ball
ISC_SPLITS = 10  # Salimans et al. 2016 / every published IS: mean over 10 splits


def feature_extractors() -> dict[str, type]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return dict(FEATURE_EXTRACTORS_REGISTRY)


def inception_weights(path: str | None = None) -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return find_weights(path, INCEPTION_ENV, INCEPTION_FILES, "Inception (FID/IS)", "--inception_weights",
                        f"torch-fidelity's TF-Inception port, {URL_INCEPTION_V3}")


def check_feature_extractor(name: str = INCEPTION, weights: str | None = None) -> str | None:
    """The extractor is one torch-fidelity knows and its weight file is there (cheap: for a command to check
    before it samples). Returns the weights path to load."""
    registry = feature_extractors()
    if name not in registry:
        raise UserError(f"unknown feature extractor {name!r}; torch-fidelity knows {', '.join(sorted(registry))}")
    return str(inception_weights(weights)) if name == INCEPTION else weights


def load_feature_extractor(name: str = INCEPTION, weights: str | None = None, device: torch.device | str = "cpu"):
    """A torch-fidelity feature extractor in eval mode on ``device``. Inception needs its weight file
    (``inception_weights``); another registered extractor gets ``weights`` if given, else builds itself."""
    weights = check_feature_extractor(name, weights)
    cls = feature_extractors()[name]
    if name == INCEPTION:
        # torch-fidelity unpickles the file with weights_only=False; read it safely first, so a file that
        # would run code is refused here (sandbox.run.checkpoints' rule for every file the project loads)
        load_checkpoint(weights)
    layers = sorted({cls.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "prc")})
    try:
        extractor = cls(name, layers, feature_extractor_weights_path=weights, verbose=False)
    except Exception as e:  # a wrong, truncated or foreign file: one line, not a traceback
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"cannot load {name} weights from {weights}: {type(e).__name__}: {msg}") from e
    extractor.weights_file = weights  # the file it was built from (keys the reference-feature cache)
    return extractor.to(device).eval()


def metric_layers(extractor) -> dict[str, str | None]:
    """Which output feeds which metric. IS needs class logits: it is left out (None) for an extractor whose
    IS layer is its FID embedding (e.g. DINOv2), where the number would mean nothing."""
    layer = {m: extractor.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "prc")}
    if layer["isc"] == layer["fid"]:
        layer["isc"] = None
    return layer


@torch.no_grad()
def extract_features(extractor, batches, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """uint8 (b,H,W,3) batches -> {layer: (N,F) float32 on the CPU}."""
    out: dict[str, list[Tensor]] = {name: [] for name in extractor.features_list}
    for batch in batches:
        x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).to(device)  # (b, 3, H, W) uint8 (a writable copy)
        feats = extractor.convert_features_tuple_to_dict(extractor(x))
        for name, f in feats.items():
            out[name].append(f.float().cpu())
    if not out or not next(iter(out.values())):
        raise UserError("no images to extract features from")
    return {name: torch.cat(parts) for name, parts in out.items()}


# --------------------------------------------------------------------------------------
# Reference sets: folders, image .npz, ADM-style statistics
# --------------------------------------------------------------------------------------
def _fingerprint(ref: ImageSet) -> dict:
    if ref._files is not None:
        stats = [f.stat() for f in ref._files]
        return {"files": len(stats), "bytes": sum(s.st_size for s in stats), "mtime": max(s.st_mtime_ns for s in stats)}
    st = ref.path.stat()
    return {"bytes": st.st_size, "mtime": st.st_mtime_ns}


def reference_features(ref: ImageSet, extractor, weights: str | None, device, batch_size: int = 64,
                       cache: bool = True) -> dict[str, Tensor] | None:
    """Features of a reference set's images (None for a statistics-only file), cached under
    ``$SANDBOX_CACHE/fidelity`` by the set's path, size and mtime and the weights file, so the 50k-image
    reference of a long evaluation is read once. An extractor without a weights file is never cached."""
    if ref.count == 0:
        return None
    path = None
    if cache and weights:
        w = Path(weights)
        key = json.dumps({"ref": str(ref.path.resolve()), **_fingerprint(ref), "extractor": extractor.get_name(),
                          "weights": str(w.resolve()), "weights_bytes": w.stat().st_size}, sort_keys=True)
        path = cache_dir() / "fidelity" / f"ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        cached = load_cached(path)  # a corrupt entry is recomputed, never trusted; a planted pickle refused
        if cached is not None:
            return cached
    feats = extract_features(extractor, ref.batches(batch_size), device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(feats, path)
    return feats


def _statistics(features: Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double().cpu())  # float64, as the ADM statistics are


def fidelity_scores(sample_feats: dict[str, Tensor], extractor, ref: ImageSet | None,
                    ref_feats: dict[str, Tensor] | None, device: torch.device | str = "cpu") -> dict:
    """IS of the samples; FID and precision/recall against the reference (statistics and/or features)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    layer = metric_layers(extractor)
    n = len(sample_feats[layer["fid"]])
    out: dict = {"feature_extractor": extractor.get_name(), "fidelity_num_images": n}
    if layer["isc"] is not None:
        splits = max(1, min(ISC_SPLITS, n // 2))
        isc = isc_features_to_metric(sample_feats[layer["isc"]], splits=splits)
        out.update(inception_score=isc["inception_score_mean"], inception_score_std=isc["inception_score_std"],
                   inception_score_splits=splits)
    if ref is None:
        return out
    if n < 2:
        raise UserError("FID needs at least 2 images")
    mine = _statistics(sample_feats[layer["fid"]])
    if ref.mu is not None and ref.sigma is not None:
        theirs = {"mu": np.asarray(ref.mu, np.float64), "sigma": np.asarray(ref.sigma, np.float64)}
        out["fid_reference"] = "statistics (mu, sigma)"
    elif ref_feats is not None:
        theirs = _statistics(ref_feats[layer["fid"]])
        out["fid_reference"] = f"{len(ref_feats[layer['fid']])} images"
    else:
        raise UserError(f"reference {ref.path} has neither images nor statistics")
    if theirs["mu"].shape != mine["mu"].shape or theirs["sigma"].shape != mine["sigma"].shape:
        raise UserError(f"reference statistics in {ref.path} have {theirs['mu'].shape[0]} features but "
                        f"{extractor.get_name()} gives {mine['mu'].shape[0]}: they come from another network")
    out["fid"] = fid_statistics_to_metric(mine, theirs, verbose=False)["frechet_inception_distance"]
    if ref_feats is not None:
        a, b = sample_feats[layer["prc"]], ref_feats[layer["prc"]]
        if min(len(a), len(b)) > PRC_NEIGHBORHOOD:
            prc = prc_features_to_metric(a.to(device), b.to(device), prc_neighborhood=PRC_NEIGHBORHOOD,
                                         save_cpu_ram=len(a) * len(b) > 10**8, verbose=False)  # > 10k x 10k: in parts
            out.update(precision=prc["precision"], recall=prc["recall"])
    return out
