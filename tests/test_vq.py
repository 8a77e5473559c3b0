"""VQ tokens and a cross-entropy head: the VQ tokenizer (codebook rows out, the latent before quantisation with
quantize false), CategoricalHead (cross-entropy on codebook indices, temperature, top-k, guidance on logits), the
core's injection of the codebook with its one-line refusals, and a VQ tokenizer trained by `sandbox
train-tokenizer` under a MAR with a categorical head, end to end through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_RECIPE

from sandbox.errors import UserError
from sandbox.plugins.heads.categorical import CategoricalHead
from sandbox.plugins.tokenizers.vq import VQTokenizer, nearest_code
from sandbox.testing import check_head, check_tokenizer, contract_args

TINY_VQ = contract_args(VQTokenizer)["config"]  # two levels (stride 2), 16 codes of 4 dims, random weights

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def head_with_logits(token_dim: int = 12, K: int = 5, c: int = 3, **kwargs) -> CategoricalHead:
    """A CategoricalHead whose output layer is random (a fresh one starts at zero: uniform logits)."""
    torch.manual_seed(0)
    head = CategoricalHead(token_dim, 8, codebook=torch.randn(K, c, generator=gen(1)), width=16, depth=1, **kwargs)
    torch.nn.init.normal_(head.net.linear.weight, std=1.0, generator=gen(2))
    return head.eval()


# --------------------------------------------------------------------------------------
# CategoricalHead
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("token_dim", [3, 12], ids=["one-code", "2x2-patch"])
def test_loss_is_cross_entropy_on_the_codebook_indices(token_dim):
    head = head_with_logits(token_dim)
    m = token_dim // 3
    index = torch.randint(0, 5, (20, m), generator=gen(3))  # (N, m)
    tokens = head.tokens(index)  # (N, C): codebook rows in (c, p, q) channel order
    assert torch.equal(tokens.view(20, 3, m).transpose(1, 2), head.codebook[index])
    assert torch.equal(head.indices(tokens), index)  # exact: each code finds its own row
    cond = torch.randn(20, 8, generator=gen(4))
    expected = F.cross_entropy(head.logits(cond).flatten(0, 1), index.flatten(), reduction="none").view(20, m).sum(1)
    torch.testing.assert_close(head.loss(tokens, cond), expected, rtol=0, atol=0)
    noisy = tokens + 1e-3 * torch.randn(tokens.shape, generator=gen(5))  # off the codebook: the nearest row's index
    torch.testing.assert_close(head.loss(noisy, cond), expected, rtol=0, atol=0)


def test_a_fresh_head_starts_uniform():
    head = CategoricalHead(8, 8, codebook=torch.randn(7, 4, generator=gen(0)), width=16, depth=2)
    loss = head.loss(head.tokens(torch.zeros(3, 2, dtype=torch.long)), torch.randn(3, 8, generator=gen(1)))
    torch.testing.assert_close(loss, torch.full((3,), 2 * torch.log(torch.tensor(7.0)).item()))  # m ln K nats


def test_temperature_to_zero_gives_the_argmax_and_top_1_always_does():
    head = head_with_logits()
    cond = torch.randn(50, 8, generator=gen(6))
    argmax = head.logits(cond).argmax(-1)  # (N, m)
    for temperature in (0.0, 1e-4):
        assert torch.equal(head.indices(head.sample(cond, temperature, generator=gen(7))), argmax)
    top1 = head_with_logits(top_k=1)
    assert torch.equal(top1.indices(top1.sample(cond, 2.0, generator=gen(8))), argmax)
    top2 = head_with_logits(top_k=2)
    drawn = top2.indices(top2.sample(cond, 5.0, generator=gen(9)))  # (N, m)
    allowed = top2.logits(cond).topk(2, -1).indices  # (N, m, 2)
    assert bool((drawn[..., None] == allowed).any(-1).all())
    assert not torch.equal(drawn, argmax)  # a hot temperature does leave the argmax


def test_guidance_mixes_the_logits_and_temperature_scales_them():
    head = head_with_logits()
    cond, uncond = torch.randn(2, 4000, 8, generator=gen(10))
    l_c, l_u = head.logits(cond), head.logits(uncond)
    guided = head.guided_logits(cond, 3.0, uncond)
    torch.testing.assert_close(guided, l_u + 3.0 * (l_c - l_u))
    assert torch.equal(head.guided_logits(cond, 1.0, uncond), l_c)  # cfg 1: no unconditional pass
    # the sampler draws from exactly these logits: the same draw as `draw` on them, with the same generator
    sample = head.sample(cond, 0.7, 3.0, uncond, generator=gen(11))
    assert torch.equal(head.indices(sample), head.draw(guided, 0.7, gen(11)))
    # and the draws follow softmax(guided / T): code frequencies of one row repeated 4000 times
    row = head.guided_logits(cond[:1].expand(4000, -1), 3.0, uncond[:1].expand(4000, -1))
    freq = torch.bincount(head.draw(row, 0.7, gen(12))[:, 0], minlength=5).float() / 4000
    torch.testing.assert_close(freq, (row[0, 0] / 0.7).softmax(-1), atol=0.03, rtol=0)


def test_head_refuses_a_codebook_that_does_not_fit():
    cb = torch.randn(6, 4)
    with pytest.raises(ValueError, match="codebook_size is 8 but the tokenizer's codebook has 6 entries"):
        CategoricalHead(4, 8, codebook=cb, codebook_size=8)
    with pytest.raises(ValueError, match="token_dim 6 is not a multiple of the codebook's code dim 4"):
        CategoricalHead(6, 8, codebook=cb)
    with pytest.raises(ValueError, match="needs the tokenizer's codebook"):
        CategoricalHead(4, 8)


def test_contract_kit_injects_a_codebook():
    check_head(CategoricalHead, **contract_args(CategoricalHead))  # codebook of 7 codes, 2 codes per token
    check_head(CategoricalHead, token_dim=3, top_k=2, width=16, depth=1)


# --------------------------------------------------------------------------------------
# VQTokenizer
# --------------------------------------------------------------------------------------
def test_vq_tokens_are_codebook_rows_and_the_head_finds_their_codes():
    torch.manual_seed(0)
    tok = VQTokenizer(config=TINY_VQ, patch_size=2, scale=0.7)
    x = torch.rand(3, 3, 16, 16, generator=gen(0)) * 2 - 1
    with torch.no_grad():
        latent = tok.encode(x)  # (B, c, 8, 8)
        h = tok.vae.encode(x).latents  # before quantisation, the VQModel's units
    rows = latent.permute(0, 2, 3, 1).reshape(-1, 4)
    codebook = tok.codebook  # (16, 4), scaled
    assert torch.equal(codebook, tok.vae.quantize.embedding.weight * 0.7)
    own = nearest_code(h.permute(0, 2, 3, 1).reshape(-1, 4), tok.vae.quantize.embedding.weight)
    assert torch.equal(rows, codebook[own])  # bit for bit rows of the codebook, the nearest codes
    assert torch.equal(nearest_code(codebook, codebook), torch.arange(16))  # quantising a code gives itself
    head = CategoricalHead(tok.token_dim, 8, codebook=codebook, width=16, depth=1)
    grid = tok.to_tokens(latent)  # (B, 16, 4, 4): 2 x 2 codes per token
    index = head.indices(grid.permute(0, 2, 3, 1).reshape(-1, 16))  # (B*16, 4)
    expected = own.view(3, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)  # (b, h, w, p, q) -> tokens, codes
    assert torch.equal(index, expected)


def test_quantize_false_gives_the_latent_before_quantisation():
    torch.manual_seed(0)
    tok = VQTokenizer(config=TINY_VQ, quantize=False, scale=0.5, shift=0.1)
    x = torch.rand(2, 3, 8, 8, generator=gen(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(x), (tok.vae.encode(x).latents - 0.1) * 0.5)
    assert tok.codebook is None  # continuous tokens: the core refuses a categorical head on them
    check_tokenizer(tok)


def test_loads_a_saved_vqmodel_and_names_a_missing_or_wrong_folder(tmp_path):
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(0)
    vae = VQModel(**{**TINY_VQ, "scaling_factor": 0.25})
    vae.save_pretrained(tmp_path / "repo" / "vae")
    tok = VQTokenizer(str(tmp_path / "repo"))
    assert (tok.scale, tok.shift, tok.stride, tok.latent_channels, tok.folder.name) == (0.25, 0.0, 2, 4, "vae")
    torch.testing.assert_close(tok.codebook, vae.quantize.embedding.weight * 0.25)
    with pytest.raises(UserError, match=r"VQModel folder not found: .*nope"):
        VQTokenizer(str(tmp_path / "nope"))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "kl")
    with pytest.raises(UserError, match="holds a diffusers AutoencoderKL, not a VQModel"):
        VQTokenizer(str(tmp_path / "kl"))
    with pytest.raises(ValueError, match="either path .* or config"):
        VQTokenizer(str(tmp_path / "repo"), config=TINY_VQ)


# --------------------------------------------------------------------------------------
# The core's injection: one error line naming both plugins, nothing written
# --------------------------------------------------------------------------------------
VQ_RECIPE = {
    **TINY_RECIPE,
    "tokenizer": {"class_path": "VQTokenizer", "init_args": {"config": TINY_VQ}},  # 8 px -> 4 x 4 codes
    "head": {"class_path": "CategoricalHead", "init_args": {"width": 32, "depth": 1}},
    "model": {**TINY_RECIPE["model"], "head_batch_mul": 1},
}


def with_(recipe: dict, **slots) -> dict:
    out = json.loads(json.dumps(recipe))
    for key, init_args in slots.items():
        out[key]["init_args"] = {**out[key].get("init_args", {}), **init_args}
    return out


BAD = {
    "continuous tokenizer": ({**TINY_RECIPE, "head": VQ_RECIPE["head"]},
                             "head CategoricalHead and tokenizer PixelTokenizer do not fit: the head needs the "
                             "tokenizer's codebook, which this tokenizer does not have (codebook is None: its "
                             "tokens are continuous)"),
    "latent before quantisation": (with_(VQ_RECIPE, tokenizer={"quantize": False}),
                                   "head CategoricalHead and tokenizer VQTokenizer do not fit: the head needs"),
    "another codebook size": (with_(VQ_RECIPE, head={"codebook_size": 512}),
                              "head CategoricalHead and tokenizer VQTokenizer do not fit: head codebook_size is 512 "
                              "but the tokenizer's codebook has 16 entries (given the tokenizer's codebook (16, 4))"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_head_and_tokenizer_that_do_not_fit_are_one_error_line(case, tmp_path, sandbox_cli):
    recipe, message = BAD[case]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = sandbox_cli("train", "--config", tmp_path / "r.yaml", "--run_dir", tmp_path / "run")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {message}"), res.stderr
    assert not (tmp_path / "run").exists()


def test_a_recipe_cannot_give_the_codebook(tmp_path, sandbox_cli):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(with_(VQ_RECIPE, head={"codebook": [[0.0] * 4] * 16})))
    res = sandbox_cli("train", "--config", tmp_path / "r.yaml", "--run_dir", tmp_path / "run")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: head CategoricalHead and tokenizer VQTokenizer: head.init_args.codebook "
                                 "comes from the tokenizer, never from the recipe"), res.stderr
    assert not (tmp_path / "run").exists()


def test_the_latent_before_quantisation_trains_with_a_continuous_head():
    from sandbox.config.build import build
    from sandbox.config.recipe import recipe_parser

    recipe = {**with_(VQ_RECIPE, tokenizer={"quantize": False}), "head": TINY_RECIPE["head"]}
    exp = build(recipe_parser().parse_object(recipe))
    assert exp.tokenizer.codebook is None and type(exp.model.head).__name__ == "DiffusionHead"


# --------------------------------------------------------------------------------------
# End to end: train a tiny VQ tokenizer, then a MAR with a categorical head on its codes, through the CLI
# --------------------------------------------------------------------------------------
VQ_TOKENIZER_RECIPE = {
    "seed": 0,
    "data": {"class_path": "DigitsDataset", "init_args": {"image_size": 8}},
    "autoencoder": {"bottleneck": "vq", "codebook_size": 32, "block_out_channels": [8, 16], "latent_channels": 4,
                    "norm_num_groups": 4},
    "loss": {"perceptual_weight": 0.0, "codebook_restart_steps": 2},
    "train": {"steps": 6, "batch_size": 16, "lr": 3e-3, "betas": [0.5, 0.9], "weight_decay": 0.0, "grad_clip": 0.0,
              "log_every": 2, "ckpt_every": 3, "ema_decay": 0.9},
}


def test_vq_tokenizer_training_and_a_categorical_mar_end_to_end(tmp_path, sandbox_cli):
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(VQ_TOKENIZER_RECIPE))
    res = sandbox_cli("train-tokenizer", "--config", tmp_path / "tok.yaml", "--run_dir", tmp_path / "tok")
    assert res.returncode == 0, res.stderr
    assert "class_path: VQTokenizer" in res.stdout and "codes used" in res.stdout
    logs = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["l1"] < logs[0]["l1"] and {"vq_mse", "used", "restarted"} <= set(logs[-1])
    report = json.loads((tmp_path / "tok" / "reconstruction.json").read_text())
    config = json.loads((tmp_path / "tok" / "vae" / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["scaling_factor"] == report["scale"]
    assert report["codebook_size"] == 32 and 1 <= report["codes_used"] <= 32 and "psnr_before_quantisation" in report

    tokenizer = VQTokenizer(str(tmp_path / "tok"))
    assert tokenizer.scale == report["scale"] and tokenizer.codebook.shape == (32, 4)
    recipe = {**VQ_RECIPE, "tokenizer": {"class_path": "VQTokenizer", "init_args": {"path": str(tmp_path / "tok")}},
              "head": {"class_path": "CategoricalHead", "init_args": {"width": 32, "depth": 1, "codebook_size": 32}},
              "train": {**TINY_RECIPE["train"], "steps": 4}}
    (tmp_path / "mar.yaml").write_text(yaml.safe_dump(recipe))
    res = sandbox_cli("train", "--config", tmp_path / "mar.yaml", "--run_dir", tmp_path / "mar")
    assert res.returncode == 0, res.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "mar" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] < torch.log(torch.tensor(32.0)).item() + 0.1  # nats per token, from ln K at the start
    res = sandbox_cli("sample", "--run_dir", tmp_path / "mar", "--num_images", 4, "--out", tmp_path / "s.npz")
    assert res.returncode == 0, res.stderr
    import numpy as np

    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 8, 8, 3)
