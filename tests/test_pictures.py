"""Pictures: class-row grids, the sampling GIF (one frame per step), the loss curve, TensorBoard logging,
and the tokenizer's reconstruction report (PSNR / SSIM / LPIPS with a side-by-side PNG)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RECIPE
from PIL import Image

from sandbox.images.animation import CAPTION_HEIGHT, caption_frame
from sandbox.images.grids import class_grid, class_layout, save_gif


def test_class_grid_has_one_row_per_class():
    labels = torch.tensor([3, 1, 3, 1, 3, 7])
    slots, ncol = class_layout(labels)
    assert ncol == 3 and slots == [3, 0, 4, 1, 5, 6]  # rows: class 1, class 3, class 7 (sorted), order kept
    grid = class_grid(torch.zeros(6, 3, 8, 8), labels, pad=1, upscale=1)
    assert grid.shape == (3 * 9 + 1, 3 * 9 + 1, 3) and grid.dtype == np.uint8
    wide, ncol = class_layout(torch.zeros(40, dtype=torch.long))  # one class with many images wraps at 16
    assert ncol == 16 and max(wide) == 39


def test_sample_grid_rows_and_gif_frames(sandbox_cli, tiny_run, tmp_path):
    proc = sandbox_cli("sample", "--run_dir", tiny_run, "--num_images", 20, "--num_iter", 3, "--progress", "false",
                       "--out", tmp_path / "g.png", "--animate", tmp_path / "a.gif")
    assert proc.returncode == 0, proc.stderr
    tile = 8 * 8 + 1  # 8 px digits shown at 8x, 1 px padding
    assert Image.open(tmp_path / "g.png").size == (2 * tile + 1, 10 * tile + 1)  # 10 classes x 2 images
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 3  # one frame per sampling step
    # the first batch (8 images, classes 0..7), one row per class, and the "step i/n" caption strip below
    assert gif.size == (1 * tile + 1, 8 * tile + 1 + CAPTION_HEIGHT)
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"))[:-CAPTION_HEIGHT])
    grey = [(np.abs(f.astype(int) - 128) <= 4).all(-1).mean() for f in frames]  # GIF palettes round colours
    assert grey[0] > 0.5 and grey[0] > grey[1] > grey[2] and grey[2] < 0.2  # tokens appear step by step


def test_gif_keeps_a_frame_for_every_step_even_when_nothing_changes(tmp_path):
    """A GIF encoder merges identical consecutive frames; the caption keeps steps that add nothing visible
    (e.g. within one scale of a coarse-to-fine ordering) as frames of their own."""
    frame = np.full((65, 65, 3), 128, dtype=np.uint8)
    save_gif([caption_frame(frame, i + 1, 5) for i in range(5)], tmp_path / "same.gif")
    assert Image.open(tmp_path / "same.gif").n_frames == 5


def test_gif_frames_follow_the_ordering(tiny_run):
    """Every step of the plan makes a frame in which exactly the known tokens are drawn (random ordering)."""
    from sandbox.core.sampling import generate
    from sandbox.images.animation import FrameRecorder, preview_images
    from sandbox.run.loading import load_run

    loaded = load_run(tiny_run, device="cpu")

    exp, model = loaded.exp, loaded.model
    labels = torch.arange(4)
    seen = []
    recorder = FrameRecorder(exp, labels)
    generate(exp, labels, num_iter=5, generator=torch.Generator().manual_seed(0), model=model,
             on_step=lambda s: (recorder(s), seen.append(s.known.clone())))
    assert len(recorder.frames) == 5
    tokens = torch.randn(4, exp.ordering.seq_len, exp.tokenizer.token_dim)
    images = preview_images(exp, tokens, seen[1])
    s = exp.tokenizer.token_stride
    shown = exp.ordering.to_grid(seen[1][..., None].float())[:, 0].repeat_interleave(s, 1).repeat_interleave(s, 2)
    assert (images.permute(1, 0, 2, 3)[:, shown == 0] == 0).all()  # unknown cells grey


def test_loss_curve_after_training(tiny_run):
    curve = Image.open(tiny_run / "loss_curve.png")
    assert curve.format == "PNG" and curve.size == (700, 600)


def parse_tiny(tmp_path, **train):
    from sandbox.config.recipe import recipe_parser

    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update(train)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return recipe_parser().parse_args(["--config", str(tmp_path / "r.yaml")])


def test_tensorboard_logs_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from sandbox.run.trainer import train

    train(parse_tiny(tmp_path, steps=2, tensorboard=True), tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(tags["scalars"]) and "samples" in tags["images"]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    from sandbox.errors import UserError
    from sandbox.run.trainer import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"mar-sandbox\[tensorboard\]"):
        train(parse_tiny(tmp_path, steps=2, tensorboard=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def alexnet_trunk(tmp_path_factory):
    """A random AlexNet trunk in torchvision's key layout (the real file is ImageNet-trained; same shapes)."""
    import torchvision

    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        features = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


def test_eval_tokenizer_report_and_png(sandbox_cli, tiny_recipe, tmp_path, alexnet_trunk):
    proc = sandbox_cli("eval-tokenizer", "--config", tiny_recipe, "--num_images", 24, "--grid_images", 9,
                       "--out", tmp_path / "rec.png", "--lpips_weights", alexnet_trunk, "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_images"] == 24 and json.loads((tmp_path / "r.json").read_text()) == result
    assert result["psnr"] == "inf" and result["ssim"] == pytest.approx(1.0) and result["lpips"] == pytest.approx(0.0)
    w, h = Image.open(tmp_path / "rec.png").size
    panel = 3 * 65 + 1  # 3 x 3 tiles of 8 px at 8x with 1 px padding
    assert (w, h) == (2 * panel + 8, panel + 14)


def test_eval_tokenizer_without_the_lpips_trunk(sandbox_cli, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("SANDBOX_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setenv("SANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proc = sandbox_cli("eval-tokenizer", "--config", tiny_recipe, "--out", tmp_path / "rec.png")
    assert proc.returncode == 2 and "alexnet-owt-7be5be79.pth" in proc.stderr and "--lpips_weights" in proc.stderr
    assert not (tmp_path / "rec.png").exists()
    ok = sandbox_cli("eval-tokenizer", "--config", tiny_recipe, "--num_images", 8, "--lpips", "false",
                     "--out", tmp_path / "rec.png")
    assert ok.returncode == 0 and "lpips" not in json.loads(ok.stdout)


def test_reconstruction_scores_of_a_lossy_reconstruction():
    from sandbox.eval.reconstruction import load_lpips, reconstruction_scores, summarize

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    scores = reconstruction_scores(x, noisy, load_lpips(random_trunk=True))
    assert all(v.shape == (6,) for v in scores.values())
    s = summarize(scores)
    assert 15 < s["psnr"] < 40 and 0 < s["ssim"] < 1 and s["lpips"] > 0
