"""Evaluation: FID / IS / precision-recall wiring (an injected tiny feature network, offline), eval sample
sets (seeded by index, reused), the missing-weights message, and the digits score against its floor."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sandbox.images.grids import save_png
from sandbox.images.io import read_image_set, save_npz, to_uint8
from sandbox.plugins.datasets.digits import load_digits_tensor
from sandbox.testing import register_tiny_feature_extractor


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Real 8 px digits and uniform noise as .npz sets, and the real ones as a folder of PNGs."""
    root = tmp_path_factory.mktemp("sets")
    x, y = load_digits_tensor(8)
    real, labels = x[:120], y[:120]
    noise = torch.rand(120, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_npz(real, labels, root / "real.npz")
    save_npz(noise, labels, root / "noise.npz")
    for i, im in enumerate(to_uint8(real)):
        save_png(im, root / "folder" / f"{i // 60}" / f"{i:03d}.png")  # class-folder-like nesting
    return root


def scores(sandbox_cli, *args):
    proc = sandbox_cli("eval", "--feature_extractor", register_tiny_feature_extractor(), *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_fid_wiring_zero_for_identical_sets_larger_for_different(sandbox_cli, image_sets):
    same = scores(sandbox_cli, "--images", image_sets / "real.npz", "--ref", image_sets / "real.npz")
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert same["num_images"] == 120 and same["inception_score"] >= 1.0
    other = scores(sandbox_cli, "--images", image_sets / "noise.npz", "--ref", image_sets / "real.npz")
    assert other["fid"] > 0.1 and other["precision"] < 0.5
    # a folder of the same images (PNG round trip is lossless) is the same reference
    folder = scores(sandbox_cli, "--images", image_sets / "noise.npz", "--ref", image_sets / "folder")
    assert folder["fid"] == pytest.approx(other["fid"], rel=1e-6)


def test_fid_against_precomputed_statistics(sandbox_cli, image_sets, tmp_path):
    """An ADM-style reference .npz with only mu/sigma gives the FID that its images give."""
    from sandbox.eval.fidelity import extract_features, load_feature_extractor

    extractor = load_feature_extractor(register_tiny_feature_extractor())
    feats = extract_features(extractor, read_image_set(image_sets / "real.npz").batches(50))["pool"].double()
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0).numpy(), sigma=torch.cov(feats.T).numpy())
    from_stats = scores(sandbox_cli, "--images", image_sets / "noise.npz", "--ref", tmp_path / "stats.npz")
    from_images = scores(sandbox_cli, "--images", image_sets / "noise.npz", "--ref", image_sets / "real.npz")
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-5)
    assert "precision" not in from_stats  # statistics alone cannot give precision/recall


def test_eval_of_a_run_writes_its_samples_and_reuses_them(sandbox_cli, tiny_run, image_sets):
    args = ("--run_dir", tiny_run, "--num_images", 20, "--num_iter", 2, "--ref", image_sets / "real.npz")
    first = scores(sandbox_cli, *args)
    for key in ("accuracy", "frechet_distance", "real_frechet_floor", "fid", "inception_score", "precision", "recall"):
        assert key in first, key
    npz = read_image_set(first["samples"])
    assert npz.count == 20 and npz.labels.tolist() == [i % 10 for i in range(20)]  # class-balanced
    assert npz.meta["num_images"] == 20 and npz.meta["num_iter"] == 2
    proc = sandbox_cli("eval", "--feature_extractor", register_tiny_feature_extractor(), *args)
    again = json.loads(proc.stdout)
    assert "reusing" in proc.stderr and again["fid"] == first["fid"] and again["accuracy"] == first["accuracy"]
    assert json.loads((tiny_run / "eval.json").read_text()) == again


def test_eval_samples_do_not_depend_on_how_indices_are_split(tiny_run):
    """What distributed eval relies on: image i is the same whether made alone, in halves or all at once."""
    from sandbox.eval.samples import generate_eval_images
    from sandbox.run.loading import load_run

    loaded = load_run(tiny_run, device="cpu")

    exp, model = loaded.exp, loaded.model
    kw = dict(total=10, seed=3, chunk_size=4, num_iter=2)
    whole, labels = generate_eval_images(exp, model, range(10), **kw)
    a, la = generate_eval_images(exp, model, [0, 1, 2, 3, 4, 5], **kw)  # splits chunk 1 (images 4..7)
    b, lb = generate_eval_images(exp, model, [9, 8, 7, 6], **kw)
    assert whole.shape == (10, 8, 8, 3) and whole.dtype == np.uint8
    assert np.array_equal(np.concatenate([a, b[::-1]]), whole)
    assert labels.tolist() == [i % 10 for i in range(10)] and lb.tolist() == [9, 8, 7, 6]
    other_seed, _ = generate_eval_images(exp, model, range(10), **{**kw, "seed": 4})
    assert not np.array_equal(other_seed, whole)


def test_modes_fix_the_number_of_images():
    from sandbox.cli.eval import _num_images, parser

    for mode, n in (("5k", 5_000), ("10k", 10_000), ("50k", 50_000)):
        assert _num_images(parser().parse_args(["--run_dir", "r", "--num_images", "7", "--mode", mode])) == n
    assert _num_images(parser().parse_args(["--run_dir", "r"])) == 1000  # the digits tables' sample count


def test_missing_inception_weights_stop_a_run_eval_before_sampling(sandbox_cli, tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("SANDBOX_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("SANDBOX_CACHE", str(tmp_path / "cache"))
    before = sorted(tiny_run.rglob("*"))
    proc = sandbox_cli("eval", "--run_dir", tiny_run, "--inception", "true", "--num_images", 3, "--num_iter", 2)
    assert proc.returncode == 2 and "weights-inception-2015-12-05-6726825d.pth" in proc.stderr
    assert sorted(tiny_run.rglob("*")) == before  # no samples drawn and cached for nothing


def test_missing_inception_weights_name_the_file(sandbox_cli, image_sets, tmp_path, monkeypatch):
    monkeypatch.delenv("SANDBOX_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("SANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proc = sandbox_cli("eval", "--images", image_sets / "real.npz", "--ref", image_sets / "real.npz")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "weights-inception-2015-12-05-6726825d.pth" in line
    assert str(tmp_path / "cache" / "weights") in line and "--inception_weights" in line
    proc = sandbox_cli("eval", "--images", image_sets / "real.npz", "--ref", image_sets / "real.npz",
                       "--inception_weights", tmp_path / "nope.pth")
    assert proc.returncode == 2 and "nope.pth" in proc.stderr


def test_bad_references_are_one_line_errors(sandbox_cli, tmp_path):
    np.savez(tmp_path / "odd.npz", something=np.zeros(3))
    for ref, fragment in ((tmp_path / "missing.npz", "not found"), (tmp_path / "odd.npz", "neither images")):
        proc = sandbox_cli("eval", "--images", ref, "--ref", ref)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr


def test_digits_score_real_near_floor_noise_far():
    """Real digits the scorer's reference never saw score at its floor; noise is orders of magnitude off."""
    from sandbox.plugins.datasets.digits_classifier import DigitsScorer

    scorer = DigitsScorer(8)
    x, y = load_digits_tensor(8)
    labels = torch.arange(400) % 10
    real = scorer.score(x[scorer.real_like(labels, torch.Generator().manual_seed(5))], labels)
    assert real["accuracy"] > 0.95
    assert 0.5 * real["real_frechet_floor"] < real["frechet_distance"] < 2 * real["real_frechet_floor"]
    noise = scorer.score(torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, labels)
    assert noise["accuracy"] < 0.3 and noise["frechet_distance"] > 50 * noise["real_frechet_floor"]
    # the floor is measured at the sample set's size: fewer images, higher floor (FD's finite-N bias)
    assert scorer.score(x[:100], y[:100])["real_frechet_floor"] > real["real_frechet_floor"]
