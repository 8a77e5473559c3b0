"""The causal backbone (plugins/backbones/causal.py) and MAR Table 1's grid (recipes/ablations/, issue 21).

Causality in the training forward; the KV cache against the from-scratch reference (one token per step, several,
guided, editing); teacher forcing equals stepping the cache along the same order; the orderings it refuses; every
digits ablation recipe trains and samples through the CLI; bad input is one error line naming both plugins; the
measurement scripts run at a tiny scale. The contract kit runs on CausalBackbone in tests/test_contracts.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

from sandbox.core.condition import ClassCondition
from sandbox.core.contracts import ConditionTokens
from sandbox.core.model import MAR
from sandbox.core.sampling import sample_tokens
from sandbox.core.transformer import MARConfig
from sandbox.errors import UserError
from sandbox.plugins.backbones.causal import CausalBackbone
from sandbox.plugins.heads.diffusion import DiffusionHead
from sandbox.plugins.orderings.multiscale import MultiscaleOrdering
from sandbox.plugins.orderings.random import RandomOrdering
from sandbox.plugins.orderings.raster import RasterOrdering
from sandbox.testing import check_backbone

L, C, B = 16, 5, 3
CONFIG = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                   buffer_size=3, attn_dropout=0.0, proj_dropout=0.0)
ORDERINGS = {"raster": lambda: RasterOrdering((4, 4)), "random": lambda: RandomOrdering((4, 4))}


def backbone(**kw) -> CausalBackbone:
    torch.manual_seed(0)
    return CausalBackbone(CONFIG, L, C, **kw).eval()


def conditions() -> list[ConditionTokens]:
    g = torch.Generator().manual_seed(1)
    return [ConditionTokens(torch.randn(B, 1, 32, generator=g)),  # one class token, repeated over the prefix
            ConditionTokens(torch.randn(B, 2, 32, generator=g), torch.tensor([[1, 0], [1, 1], [1, 1]]).bool())]


# --------------------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ORDERINGS))
def test_a_later_token_never_changes_an_earlier_condition(name):
    bb = backbone()
    for cond in conditions():
        seq = torch.randn(B, L, C, generator=torch.Generator().manual_seed(2))
        split = bb.training_split(ORDERINGS[name](), seq, torch.Generator().manual_seed(3))
        assert split.visible.all() and (split.weight == 1).all()  # teacher forcing: every position, loss 1
        with torch.no_grad():
            z = bb(split.inputs, split.visible, cond, None, split.order)  # (B, L, D) in sequence order
            for k in (0, 5, L - 1):  # change the k-th token of each row's order
                changed = seq.clone()
                changed[torch.arange(B), split.order[:, k]] += 3.0
                z2 = bb(changed, split.visible, cond, None, split.order)
                for b in range(B):
                    upto, after = split.order[b, : k + 1], split.order[b, k + 1 :]
                    assert torch.equal(z[b, upto], z2[b, upto])  # itself and everything before: untouched
                    if len(after):
                        assert (z[b, after] - z2[b, after]).abs().max() > 1e-3  # what follows reads it


def test_teacher_forcing_equals_the_cache_stepped_along_the_same_order():
    """Training conditions = sampling conditions when sampling reveals the true tokens in the training order."""
    bb = backbone()
    for name, make in ORDERINGS.items():
        ordering = make()
        seq = torch.randn(B, L, C, generator=torch.Generator().manual_seed(4))
        plan = ordering.sampling_plan(B, L, torch.Generator().manual_seed(5))  # one position per step
        order = torch.stack([s.predict.float().argmax(1) for s in plan], 1)  # (B, L): the plan's order
        for cond in conditions():
            with torch.no_grad():
                full = bb(seq, torch.ones(B, L, dtype=torch.bool), cond, None, order)  # (B, L, D)
                sampler, known = bb.start_sampling(cond), torch.zeros(B, L, dtype=torch.bool)
                for step in plan:
                    z = sampler.step(seq * known[..., None], known, step.predict)  # (B, D)
                    torch.testing.assert_close(z, full[step.predict], atol=1e-5, rtol=0, msg=name)
                    known |= step.predict


# --------------------------------------------------------------------------------------
# The KV cache against the reference (use_cache: false recomputes every step)
# --------------------------------------------------------------------------------------
def causal_mar() -> MAR:
    torch.manual_seed(0)
    head = DiffusionHead(C, 32, width=16, depth=1, num_sampling_steps=4, x0_clip=1.0)
    torch.nn.init.normal_(head.net.final_layer.linear.weight, std=0.02)  # a fresh head ignores z: make it read z
    return MAR(ClassCondition(32, 10), CausalBackbone(CONFIG, L, C), head, CONFIG).eval()


@pytest.mark.parametrize("name", list(ORDERINGS))
@pytest.mark.parametrize("num_iter", [L, 4], ids=["one-per-step", "several-per-step"])
@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["cfg1", "cfg3"])
def test_kv_cached_sampling_equals_uncached_sampling(name, num_iter, cfg):
    model, labels = causal_mar(), torch.tensor([1, 2, 3])
    out = {}
    for use_cache in (True, False):
        model.backbone.use_cache = use_cache
        out[use_cache] = sample_tokens(model, ORDERINGS[name](), C, labels, num_iter=num_iter, cfg=cfg,
                                       temperature=0.9, generator=torch.Generator().manual_seed(6))
    assert out[True].abs().max() > 0.1  # real samples, not zeros
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)


def test_kv_cached_editing_equals_uncached():
    """Known tokens at the start (inpainting) are fed first, then the plan."""
    model, labels = causal_mar(), torch.tensor([1, 2, 3])
    known = torch.zeros(B, L, dtype=torch.bool)
    known[:, :6] = True
    start = (torch.randn(B, L, C, generator=torch.Generator().manual_seed(7)) * known[..., None], known)
    out = {}
    for use_cache in (True, False):
        model.backbone.use_cache = use_cache
        out[use_cache] = sample_tokens(model, RandomOrdering((4, 4)), C, labels, num_iter=5, cfg=2.0, start=start,
                                       generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    assert torch.equal(out[True][known], start[0][known])


def test_the_contract_kit_passes_without_the_cache_too():
    check_backbone(CausalBackbone, use_cache=False)  # with the cache: tests/test_contracts.py


# --------------------------------------------------------------------------------------
# What it refuses
# --------------------------------------------------------------------------------------
class BackwardsRaster(RasterOrdering):
    """Generates in reversed raster order but samples in raster order: training would not rehearse sampling."""

    def generation_order(self, batch, generator=None, device="cpu"):
        return torch.arange(self.seq_len - 1, -1, -1, device=device).expand(batch, -1)


class NotAPermutation(RasterOrdering):
    def generation_order(self, batch, generator=None, device="cpu"):
        return torch.zeros(batch, self.seq_len, dtype=torch.long, device=device)


def test_orderings_it_cannot_serve_are_one_error_naming_both():
    bb = backbone()
    bb.check_ordering(RasterOrdering((4, 4)))
    bb.check_ordering(RandomOrdering((4, 4)))
    with pytest.raises(UserError, match=r"^backbone CausalBackbone and ordering MultiscaleOrdering cannot work "
                                        r"together: at sampling step 1 its step_inputs shows 4 positions"):
        bb.check_ordering(MultiscaleOrdering((4, 4)))
    with pytest.raises(UserError, match="ordering BackwardsRaster cannot work together: sampling step 0 predicts "
                                        "positions out of its generation_order"):
        bb.check_ordering(BackwardsRaster((4, 4)))
    with pytest.raises(UserError, match=r"ordering NotAPermutation .*generation_order gave .*each row a permutation"):
        bb.training_split(NotAPermutation((4, 4)), torch.zeros(2, L, C))


def test_the_sampler_refuses_a_step_that_shows_what_it_predicts():
    bb = backbone()
    sampler = bb.start_sampling(conditions()[0])
    predict = torch.zeros(B, L, dtype=torch.bool)
    predict[:, 0] = True
    with pytest.raises(UserError, match="shows the encoder positions it predicts"):
        sampler.step(torch.zeros(B, L, C), predict.clone(), predict)


# --------------------------------------------------------------------------------------
# The digits grid through the CLI: tokenizers trained for 2 steps, every cell for 3 steps of a tiny model
# --------------------------------------------------------------------------------------
CELLS = sorted(p.stem for p in (REPO / "recipes" / "ablations").glob("*.yaml") if not p.stem.startswith("digits"))
TINY = ["--train.steps", "3", "--train.batch_size", "8", "--model.encoder_dim", "32", "--model.decoder_dim", "32",
        "--model.encoder_heads", "2", "--model.decoder_heads", "2", "--model.encoder_depth", "1",
        "--model.decoder_depth", "1", "--head.init_args.width", "32", "--head.init_args.depth", "1",
        "--sample.grid_classes", "2", "--sample.grid_per_class", "1"]


def cli(cwd: Path, *args) -> tuple[int, str, str]:
    """``sandbox ARGS`` in a subprocess in ``cwd`` (the recipes' tokenizer paths are relative to it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "SANDBOX_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "sandbox", *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=cwd)
    return res.returncode, res.stdout, res.stderr


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> Path:
    """A working directory holding runs/kl4_digits_tokenizer and runs/vq_digits_tokenizer (2 steps each)."""
    root = tmp_path_factory.mktemp("ablations")
    for name in ("kl4_digits_tokenizer", "vq_digits_tokenizer"):
        code, _, err = cli(root, "train-tokenizer", "--config", REPO / "recipes" / f"{name}.yaml", "--run_dir",
                           f"runs/{name}", "--train.steps", "2", "--train.batch_size", "8")
        assert code == 0, err
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_every_ablation_recipe_trains_and_samples(cell, grid_dir, monkeypatch):
    assert len(CELLS) == 8
    extra = ["--head.init_args.num_sampling_steps", "4"] if cell.startswith("diffloss") else []
    code, _, err = cli(grid_dir, "train", "--config", REPO / "recipes" / "ablations" / f"{cell}.yaml", "--run_dir",
                       f"runs/{cell}", *TINY, *extra)
    assert code == 0, err
    code, _, err = cli(grid_dir, "sample", "--run_dir", f"runs/{cell}", "--num_images", 4, "--out", f"{cell}.npz")
    assert code == 0, err
    images = np.load(grid_dir / f"{cell}.npz")["images"]
    assert images.shape == (4, 32, 32, 3) and images.std() > 0  # uint8 images from finite tokens

    import sandbox

    monkeypatch.chdir(grid_dir)  # the recipe's tokenizer path is relative to where the commands run
    run = sandbox.load_run(f"runs/{cell}")
    from sandbox.core.transformer import MARBackbone

    assert isinstance(run.exp.model.backbone, CausalBackbone if "causal" in cell else MARBackbone)
    assert torch.isfinite(sandbox.generate(run, labels=[0, 1], seed=0)).all()


BAD = {  # (cell, extra recipe, the error's start)
    "a backbone and an ordering that cannot work together":
        ("crossent_raster_causal", {"ordering": {"class_path": "MultiscaleOrdering"}},
         "backbone CausalBackbone and ordering MultiscaleOrdering cannot work together: "),
    "a categorical head on continuous tokens":
        ("crossent_mar", {"tokenizer": {"class_path": "DiffusersVAETokenizer",
                                        "init_args": {"path": "runs/kl4_digits_tokenizer"}}},
         "head CategoricalHead and tokenizer DiffusersVAETokenizer do not fit: the head needs the tokenizer's "
         "codebook"),
    "a codebook that does not match the head":
        ("crossent_random_causal", {"head": {"init_args": {"codebook_size": 512}}},
         "head CategoricalHead and tokenizer VQTokenizer do not fit: head codebook_size is 512 but the tokenizer's "
         "codebook has 256 entries"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_both_plugins(case, grid_dir):
    cell, extra, message = BAD[case]
    (grid_dir / f"bad_{cell}.yaml").write_text(yaml.safe_dump(extra))
    code, _, err = cli(grid_dir, "train", "--config", REPO / "recipes" / "ablations" / f"{cell}.yaml", "--config",
                         f"bad_{cell}.yaml", "--run_dir", f"runs/bad_{cell}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}"), err
    assert not (grid_dir / "runs" / f"bad_{cell}").exists()


@pytest.mark.slow
def test_the_measurement_scripts_run_at_a_tiny_scale(grid_dir):
    env = {**os.environ, "SANDBOX_ABLATIONS_TINY": "1", "SANDBOX_THREADS": "1"}
    for script, args in (("measure_ablations.py", ["--cells", "crossent_raster_causal", "--seeds", "0", "1"]),
                         ("measure_speed.py", [])):
        res = subprocess.run([sys.executable, str(REPO / ".ci" / script), "--workdir", str(grid_dir), *args],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
    page = (grid_dir / "ablations.md").read_text()
    assert "| AR: raster, causal, 1 token/step | cross-entropy (VQ) | 19.58 -> 4.92 |" in page and "| 2 |" in page
    assert "| causal AR, KV cache |" in page and (grid_dir / "ablations_speed.png").stat().st_size > 1000
    results = json.loads((grid_dir / "runs" / "ablations" / "results.json").read_text())
    assert sorted(results) == ["crossent_raster_causal/seed0", "crossent_raster_causal/seed1"]


# --------------------------------------------------------------------------------------
# sandbox bench: images/s against steps (the paper's Fig. 6), another backbone at the same model settings
# --------------------------------------------------------------------------------------
def test_bench_sweeps_the_steps_and_swaps_the_backbone(tmp_path, sandbox_cli):
    from conftest import TINY_RECIPE, parity_fixture_dir

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    args = ["bench", "--batch_size", "4", "--steps", "1", "--warmup", "0", "--sample_batch_size", "2",
            "--num_sampling_steps", "2", "--num_iter_sweep", "[2,16]"]
    res = sandbox_cli(*args, "--recipe", tmp_path / "tiny.yaml", "--backbone", "CausalBackbone",
                      "--backbone_args", "{use_cache: false}")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["config"]["backbone"] == "CausalBackbone"
    assert out["config"]["recipe"]["backbone"]["init_args"]["use_cache"] is False
    assert [s["num_iter"] for s in out["sample_sweep"]] == [2, 16]
    assert all(s["images_per_s"] > 0 and s["warmup_seconds"] == 0 for s in out["sample_sweep"])
    fixtures = parity_fixture_dir()
    fixture = next(iter(sorted(fixtures.glob("official_mar_*.pt"))), None) if fixtures else None
    if fixture is not None:  # an official configuration's sizes with the causal backbone (random weights)
        res = sandbox_cli(*args, "--official_config", fixture, "--backbone", "CausalBackbone")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["config"]["backbone"] == "CausalBackbone"
        res = sandbox_cli(*args, "--official_config", fixture, "--backbone", "Nope")
        assert res.returncode == 2 and "--backbone 'Nope' is not a registered backbone" in res.stderr
    res = sandbox_cli(*args, "--recipe", tmp_path / "tiny.yaml", "--backbone_args", "{use_cache: false}")
    assert res.returncode == 2 and "--backbone_args needs --backbone" in res.stderr
    res = sandbox_cli("bench", "--recipe", tmp_path / "tiny.yaml", "--num_iter_sweep", "[0]")
    assert res.returncode == 2 and "num_iter must be >= 1" in res.stderr
