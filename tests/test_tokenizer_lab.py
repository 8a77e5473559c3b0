"""Tokenizer lab: any local diffusers AutoencoderKL as a tokenizer, latent-scale calibration and the trainer's
warnings, training a small KL autoencoder, and that autoencoder as the tokenizer of a MAR recipe end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.eval.diagnostics import head_width_warning, latent_std_warning
from sandbox.eval.reconstruction import psnr
from sandbox.lab.tokenizer_training import LossConfig, _Losses, load_lpips
from sandbox.plugins.heads.diffusion import DiffusionHead
from sandbox.plugins.tokenizers.diffusers_vae import DiffusersVAETokenizer
from sandbox.run.rundir import RunDir


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, **config)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# Any diffusers AutoencoderKL from a local folder
# --------------------------------------------------------------------------------------
def test_loads_a_saved_autoencoder_with_its_scale_and_shift(tmp_path):
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "repo" / "vae")  # a model repository's layout: the VAE in vae/
    tok = DiffusersVAETokenizer(str(tmp_path / "repo"), patch_size=2)
    assert (tok.stride, tok.latent_channels, tok.token_dim, tok.scale, tok.shift) == (2, 4, 16, 0.5, 0.1)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(tok.encode(x, sample=False), (mean - 0.1) * 0.5)
        assert tok.to_tokens(tok.encode(x)).shape == (2, 16, 2, 2)  # 8 px / stride 2 / patch 2
        assert tok.decode(tok.encode(x, sample=False)).shape == x.shape
    assert DiffusersVAETokenizer(str(tmp_path / "repo"), scale=2.0, subfolder="vae").scale == 2.0  # recipe wins


def test_missing_or_wrong_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(UserError, match="AutoencoderKL folder not found: .*nope.*config.json"):
        DiffusersVAETokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no AutoencoderKL"):
        DiffusersVAETokenizer(str(tmp_path / "empty"))
    recipe = {**TINY_RECIPE, "tokenizer": {"class_path": "DiffusersVAETokenizer",
                                           "init_args": {"path": str(tmp_path / "nope")}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli(capsys, "train", "--config", tmp_path / "r.yaml", "--run_dir", tmp_path / "run")
    assert code == 2 and err.startswith("error: AutoencoderKL folder not found") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# Latent scale: calibration on a synthetic latent distribution of known std, and the trainer's warnings
# --------------------------------------------------------------------------------------
GAUSSIAN_TOKENIZER = '''
import torch
from sandbox.core.contracts import Tokenizer

class LabGaussianTokenizer(Tokenizer):
    """Synthetic latents N(0.3, 2.5^2), whatever the image: a known distribution to calibrate."""
    latent_channels, stride = 4, 2

    def __init__(self, patch_size: int = 1, scale: float = 1.0, shift: float = 0.0):
        super().__init__(patch_size)
        self.scale, self.shift = scale, shift

    def encode(self, images, generator=None, sample=True):
        B, _, H, W = images.shape
        z = torch.randn(B, 4, H // 2, W // 2, generator=generator) * 2.5 + 0.3
        return (z - self.shift) * self.scale

    def decode(self, latent):
        return latent.mean(1, keepdim=True).expand(-1, 3, -1, -1).repeat_interleave(2, -1).repeat_interleave(2, -2)
'''


def test_calibrate_scale_writes_one_over_std_into_the_recipe_and_silences_the_warning(tmp_path, capsys):
    (tmp_path / "gaussian.py").write_text(GAUSSIAN_TOKENIZER)
    recipe = {**TINY_RECIPE, "plugins": ["gaussian.py"], "tokenizer": {"class_path": "LabGaussianTokenizer"},
              "train": {**TINY_RECIPE["train"], "steps": 1}, "sample": {**TINY_RECIPE["sample"], "grid_classes": 1}}
    path = tmp_path / "r.yaml"
    path.write_text("# my recipe: keep this comment\n" + yaml.safe_dump(recipe))

    code, _, err = cli(capsys, "train", "--config", path, "--run_dir", tmp_path / "before")
    assert code == 0 and err.count("warning: the latents of this run have std 2.") == 1  # once, and clearly
    assert "calibrate-scale" in err

    code, out, _ = cli(capsys, "calibrate-scale", "--config", path, "--num_images", 512, "--shift", "true")
    result = json.loads(out)
    assert result["latent_std"] == pytest.approx(2.5, rel=0.02) and result["latent_mean"] == pytest.approx(0.3, abs=0.05)
    written = yaml.safe_load(path.read_text())["tokenizer"]["init_args"]
    assert written == {"scale": result["scale"], "shift": result["shift"]}
    assert written["scale"] == pytest.approx(1 / 2.5, rel=0.02) and path.read_text().startswith("# my recipe")

    code, out, err = cli(capsys, "train", "--config", path, "--run_dir", tmp_path / "after")
    assert code == 0 and "warning" not in out + err


def test_head_width_warning_follows_the_reported_flux_case():
    flux = head_width_warning(64, DiffusionHead(64, 32, width=1024, depth=1))  # LTH14/mar#102: FID 30 at MAR-B
    assert flux and "LTH14/mar#102" in flux and ">= 2048" in flux
    assert head_width_warning(16, DiffusionHead(16, 32, width=1024, depth=1)) is None  # KL-16 at MAR-B
    assert head_width_warning(12, DiffusionHead(12, 32, width=128, depth=1)) is None  # the pixel quickstart
    assert latent_std_warning(1.3, 64) is None and "std 0.2" in latent_std_warning(0.2, 64)


# --------------------------------------------------------------------------------------
# Training a small KL autoencoder
# --------------------------------------------------------------------------------------
TOKENIZER_RECIPE = {
    "seed": 0,
    "data": {"class_path": "DigitsDataset", "init_args": {"image_size": 8}},
    "autoencoder": {"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4},
    "loss": {"perceptual_weight": 1.0, "lpips_net": "alex", "lpips_random_trunk": True,
             "disc_start": 10, "disc_layers": 1, "disc_channels": 8},
    "train": {"steps": 12, "batch_size": 16, "lr": 3e-3, "betas": [0.5, 0.9], "weight_decay": 0.0, "grad_clip": 0.0,
              "log_every": 2, "ckpt_every": 6, "ema_decay": 0.9},
}


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "tok.yaml").write_text(yaml.safe_dump(TOKENIZER_RECIPE))
    assert main(["train-tokenizer", "--config", str(root / "tok.yaml"), "--run_dir", str(root / "run")]) == 0
    return root / "run"


def test_training_lowers_the_reconstruction_loss_and_exports_a_diffusers_folder(trained_tokenizer):
    run = trained_tokenizer
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logs] == [2, 4, 6, 8, 10, 12]
    assert logs[-1]["l1"] < 0.85 * logs[0]["l1"] and logs[-1]["lpips"] < logs[0]["lpips"]
    assert "d_loss" in logs[-1] and "d_loss" not in logs[0]  # the discriminator joins after its warm-up
    assert RunDir(run).load_latest()["step"] == 12 and (run / "samples" / "reconstructions.png").is_file()
    scores = json.loads((run / "reconstruction.json").read_text())
    assert json.loads((run / "vae" / "config.json").read_text())["scaling_factor"] == scores["scale"]
    assert scores["psnr"] > 5

    # rerunning with more steps resumes from the last checkpoint, as `sandbox train` does; here from a recipe
    # that builds on the first one (base:, as MAR recipes do)
    (run.parent / "longer.yaml").write_text("base: tok.yaml\ntrain:\n  steps: 14\n")
    assert main(["train-tokenizer", "--config", str(run.parent / "longer.yaml"), "--run_dir", str(run)]) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-2:] == [12, 14]


def test_psnr_matches_its_definition():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.2  # 0.1 on the [0, 1] scale: mse 0.01 -> 20 dB
    assert psnr(a, b)[0].item() == pytest.approx(20.0) and psnr(a, b)[1].item() == float("inf")


def test_lpips_is_not_built_without_a_perceptual_weight(monkeypatch, tmp_path):
    import lpips

    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: pytest.fail("LPIPS built with perceptual_weight 0"))
    assert _Losses(LossConfig(perceptual_weight=0.0), torch.device("cpu")).lpips is None
    with pytest.raises(UserError, match="LPIPS alex trunk weights not found at .*nope.pth.*perceptual_weight 0"):
        load_lpips("alex", str(tmp_path / "nope.pth"))


def test_lpips_reads_its_trunk_from_a_local_torchvision_file(tmp_path):
    # torchvision's alexnet-owt-7be5be79.pth names AlexNet's convolutions features.0/3/6/8/10 (shapes below);
    # a random file of that layout stands in for it (the classifier's weights are not read)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, shape in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shape, generator=g)
        state[f"features.{i}.bias"] = torch.randn(shape[0], generator=g)
    torch.save(state, tmp_path / "alex.pth")
    loaded = load_lpips("alex", str(tmp_path / "alex.pth")).net.state_dict()
    torch.testing.assert_close(loaded["slice1.0.weight"], state["features.0.weight"])  # conv1
    torch.testing.assert_close(loaded["slice5.10.bias"], state["features.10.bias"])  # conv5: indices kept across slices
    (tmp_path / "torn.pth").write_bytes((tmp_path / "alex.pth").read_bytes()[:1000])
    with pytest.raises(UserError, match="torn.pth"):
        load_lpips("alex", str(tmp_path / "torn.pth"))


def test_trained_tokenizer_in_a_mar_recipe_end_to_end(trained_tokenizer, tmp_path):
    recipe = {**TINY_RECIPE, "tokenizer": {"class_path": "DiffusersVAETokenizer",
                                           "init_args": {"path": str(trained_tokenizer)}},
              "train": {**TINY_RECIPE["train"], "steps": 3}}
    (tmp_path / "mar.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "sandbox", "train", "--config", str(tmp_path / "mar.yaml"),
                           "--run_dir", str(tmp_path / "mar")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["sample", "--run_dir", str(tmp_path / "mar"), "--num_images", "4", "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 8, 8, 3)
