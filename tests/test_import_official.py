"""Importing released MAR checkpoints: safe loading, the architecture from args + shapes, and a run directory
that `sandbox sample` uses like any other (round trip on a checkpoint written here from a fixture)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import fixture_files

from sandbox.cli import main
from sandbox.core.transformer import MARBackbone
from sandbox.errors import UserError
from sandbox.lab.official import (
    FACTORIES,
    load_official_checkpoint,
    mar_config,
    official_architecture,
    to_official_state_dict,
)
from sandbox.run.rundir import RunDir


def _fixtures():
    mar, kl16 = fixture_files("official_mar_latent*.pt"), fixture_files("official_kl16*.pt")
    if not mar or not kl16:
        pytest.skip("needs official_mar_latent*.pt and official_kl16*.pt (SANDBOX_PARITY_FIXTURES or ../shared/fixtures)")
    load = lambda path: torch.load(path, weights_only=False)  # trusted test data recorded by the project
    return load(mar[0]), load(kl16[0])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A checkpoint-last.pth in the official format: the latent fixture's weights (an 8 x 8 grid of 16-dim
    KL-16 tokens at 128 px), an EMA that differs from them, the optimizer and epoch, and the training args."""
    mar, kl16 = _fixtures()
    root = tmp_path_factory.mktemp("official")
    torch.save({"model": kl16["state_dict"]}, root / "kl16.ckpt")  # a KL-16 with 32 base channels
    args = argparse.Namespace(model="mar_tiny", **mar["config"], data_path="/data/imagenet", batch_size=64,
                              epochs=400, seed=1, num_iter=64, cfg=1.0, temperature=1.0, lr=8e-4)
    ema = {k: v + 0.001 for k, v in mar["state_dict"].items()}
    torch.save({"model": mar["state_dict"], "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 399, "scaler": {}, "args": args}, root / "checkpoint-last.pth")
    return root, mar


def test_import_then_sample(released, tmp_path, capsys):
    root, mar = released
    run = tmp_path / "run"
    assert main(["import-official", str(root / "checkpoint-last.pth"), "--run_dir", str(run),
                 "--vae", str(root / "kl16.ckpt")]) == 0
    ckpt = RunDir(run).load_latest()
    for key, want in (("model", mar["state_dict"]), ("ema", None)):
        back = to_official_state_dict(ckpt[key])
        assert set(back) == set(mar["state_dict"])
        for name, value in mar["state_dict"].items():
            assert torch.equal(back[name], value if key == "model" else value + 0.001), name
    recipe = ckpt["recipe"]
    assert recipe["model"]["encoder_heads"] == mar["config"]["encoder_num_heads"]
    assert recipe["head"]["init_args"]["depth"] == mar["config"]["diffloss_d"]
    assert recipe["tokenizer"]["init_args"]["base_channels"] == 32 and ckpt["meta"]["image_size"] == 128
    assert ckpt["step"] == recipe["train"]["steps"]  # epoch 399 of 400: complete
    assert main(["sample", "--run_dir", str(run), "--num_images", "2", "--num_iter", "2", "--labels", "[3]",
                 "--out", str(tmp_path / "s.npz"), "--progress", "false"]) == 0
    out = np.load(tmp_path / "s.npz")
    assert out["images"].shape == (2, 128, 128, 3) and out["labels"].tolist() == [3, 3]
    capsys.readouterr()
    assert main(["import-official", str(root / "checkpoint-last.pth"), "--run_dir", str(run),
                 "--vae", str(root / "kl16.ckpt")]) == 2  # never over an existing run
    assert "already holds a run" in capsys.readouterr().err
    assert main(["import-official", str(root / "checkpoint-last.pth"), "--run_dir", str(tmp_path / "other"),
                 "--vae", str(tmp_path / "nope.ckpt")]) == 2
    assert "KL-16 weights not found" in capsys.readouterr().err and not (tmp_path / "other").exists()


class Payload:  # a class a malicious checkpoint could make torch.load instantiate
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_allows_only_tensors_and_namespace(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(model="mar_base"), "x": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="refusing to load"):
        load_official_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not found.*checkpoint-last.pth"):
        load_official_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": {}}, tmp_path / "noargs.pth")
    with pytest.raises(UserError, match="not an official MAR checkpoint"):
        load_official_checkpoint(tmp_path / "noargs.pth")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_architecture_of_the_released_sizes(name):
    width, depth, heads = FACTORIES[name]
    diffloss_w, diffloss_d = {"mar_base": (1024, 6), "mar_large": (1280, 8), "mar_huge": (1536, 12)}[name]
    with torch.device("meta"):  # shapes only: MAR-H is 943M parameters
        tr = MARBackbone(mar_config(dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                                         decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                                         buffer_size=64)), 256, 16)
        state = dict(tr.state_dict())
        state["class_emb.weight"] = torch.empty(1000, width)  # the official MAR holds the class embedding itself
        state["diffloss.net.input_proj.weight"] = torch.empty(diffloss_w, 16)
        state.update({f"diffloss.net.res_blocks.{i}.in_ln.weight": torch.empty(diffloss_w) for i in range(diffloss_d)})
    arch = official_architecture(state, {"model": name})
    assert (arch["encoder_embed_dim"], arch["encoder_depth"], arch["encoder_num_heads"]) == (width, depth, heads)
    assert (arch["seq_len"], arch["buffer_size"], arch["class_num"], arch["mlp_ratio"]) == (256, 64, 1000, 4.0)
    assert (arch["diffloss_w"], arch["diffloss_d"], arch["norm_eps"]) == (diffloss_w, diffloss_d, 1e-6)
    other = "mar_large" if name == "mar_base" else "mar_base"
    with pytest.raises(UserError, match=f"args.model is {other}"):
        official_architecture(state, {"model": other})
    with pytest.raises(UserError, match="attention heads"):
        official_architecture(state, {"model": "mystery"})
