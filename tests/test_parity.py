"""Numerical parity with the official MAR implementation, on recorded fixtures.

Every ``official_mar_*.pt`` in the fixture directory ($SANDBOX_PARITY_FIXTURES,
or ../shared/fixtures) is converted into the sandbox model and must reproduce
the official tensors within |a - b| <= 1e-5 * max(1, |b|, scale) (float32): an
absolute 1e-5 near zero, 1e-5 relative to a value or to the magnitude of the
terms it was formed from (``scale``). The last matters for the sampler step:
x0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps multiplies eps by ~2e4
at t = 999, and where x_t and eps nearly cancel, x0 is small while one float32
rounding of eps (which depends on the CPU's matrix kernels: AVX-512 or not)
moves it by ~2e4 ulp of eps. So x0, the mean and the step are compared relative
to the size of their terms (the bound error propagation gives; the network's
eps itself is checked un-amplified in test_head_output_and_training_losses).
The fixtures were recorded with the bare ``MAR(...)`` constructor, whose
LayerNorms use eps 1e-5 (the released mar_base/large/huge factories use 1e-6).
"""
from __future__ import annotations

import pytest
import torch
from conftest import parity_fixture_dir

from sandbox.core.contracts import Tokenizer
from sandbox.core.schedules import cosine_schedule
from sandbox.lab.official import build_model, convert_state_dict, to_official_state_dict
from sandbox.plugins.orderings.random import RandomOrdering

pytestmark = pytest.mark.parity
ATOL = 1e-5

FIXTURE_DIR = parity_fixture_dir()
FILES = sorted(FIXTURE_DIR.glob("official_mar_*.pt")) if FIXTURE_DIR and FIXTURE_DIR.is_dir() else []


def _skip_reason() -> str:
    if FIXTURE_DIR is None:
        return "no parity fixtures: set SANDBOX_PARITY_FIXTURES or put them in ../shared/fixtures"
    return f"no official_mar_*.pt in {FIXTURE_DIR}"


if not FILES:
    pytest.skip(_skip_reason(), allow_module_level=True)


@pytest.fixture(scope="module", params=FILES, ids=[f.stem for f in FILES])
def fx(request):
    data = torch.load(request.param, weights_only=False)  # trusted test data recorded by the project
    model = build_model(data["config"], norm_eps=1e-5).eval()
    model.load_state_dict(convert_state_dict(data["state_dict"]))
    data["model"] = model
    return data


def close(a, b, atol=ATOL, scale=None):
    """|a - b| <= atol * max(1, |b|, scale) elementwise: absolute near zero, relative to the value or, for an
    amplified value, to ``scale``, the magnitude of the terms it was formed from (see the module docstring)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if not a.numel():
        return
    a, b = a.double(), b.double()
    err = (a - b).abs()
    bound = b.abs().clamp_min(1.0)
    if scale is not None:
        bound = torch.maximum(bound, scale.double())
    bound = atol * bound
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (f"max error {err.flatten()[worst].item():.3g} at a value of "
                                        f"{b.flatten()[worst].item():.4g} > {atol} x max(1, |value|)")


def sequence(fx):
    tok = Tokenizer(fx["config"]["patch_size"])
    grid = tok.to_tokens(fx["inputs"]["x"])
    return RandomOrdering(grid.shape[-2:]).to_sequence(grid)


def test_state_dict_round_trip(fx):
    ours = fx["model"].state_dict()
    back = to_official_state_dict(ours)
    assert set(back) == set(fx["state_dict"])
    for k, v in fx["state_dict"].items():
        assert torch.equal(back[k], v), k


def test_patchified_tokens(fx):
    close(sequence(fx), fx["outputs"]["tokens"])


@pytest.mark.parametrize("branch", ["", "_uncond"])
def test_encoder_and_decoder(fx, branch):
    model = fx["model"]
    seq, inp = sequence(fx), fx["inputs"]
    B = seq.shape[0]
    uncond = torch.ones(B, dtype=torch.bool) if branch else None
    with torch.no_grad():
        cond = model.condition(inp["labels"], uncond)  # ClassCondition: the class embedding or the fake latent
        enc, idx, _ = model.backbone.forward_encoder(seq, inp["mask"] == 0, cond)
        dec = model.backbone.forward_decoder(enc, idx)
        full = model.backbone(seq, inp["mask"] == 0, cond)
    close(enc, fx["outputs"]["encoder_out" + branch])
    close(dec, fx["outputs"]["decoder_out" + branch])
    close(full, fx["outputs"]["decoder_out" + branch])


def test_head_output_and_training_losses(fx):
    head, d = fx["model"].head, fx["diffusion"]
    with torch.no_grad():
        xt = head.train_diffusion.q_sample(d["target"], d["t"], d["noise"])
        close(xt, d["x_t"])
        close(head.net(xt, d["t"], d["cond"]), d["net_out"])
        losses = head.losses(d["target"], d["cond"], d["t"], d["noise"])
    for key in ("loss", "mse", "vb"):
        close(losses[key], d[key])


def test_cfg_forward(fx):
    head, c = fx["model"].head, fx["diffusion"]["cfg_in"]
    N, C = c["x"].shape[0] // 2, head.token_dim
    out = fx["diffusion"]["cfg_out"]
    with torch.no_grad():
        eps, var = head.guided_output(c["x"][:N], c["t"][:N], head.net.embed_cond(c["c"]), c["scale"])
    close(eps, out[:N, :C])
    close(eps, out[N:, :C])  # the official duplicates the guided eps into both halves
    close(var, out[:N, C:])


def test_sampler_step(fx):
    head, d = fx["model"].head, fx["diffusion"]
    s, sd = d["sample_in"], head.sample_diffusion
    with torch.no_grad():
        c_emb = head.net.embed_cond(s["c"])
        eps, _ = head.guided_output(s["x"], sd.timestep_map[s["t"]], c_emb, 1.0)
        mean, log_var, x0 = head.p_step(s["x"], s["t"], c_emb, 1.0)
        step = head.denoise_step(s["x"], s["t"], c_emb, 1.0, s["noise"], s["temperature"])
    col = lambda name: getattr(sd, name)[s["t"]][:, None]  # (N, 1) float64 table values
    xt = s["x"].double()
    x0_scale = col("sqrt_recip_alphas_cumprod") * xt.abs() + col("sqrt_recipm1_alphas_cumprod") * eps.double().abs()
    mean_scale = col("posterior_mean_coef1") * x0_scale + col("posterior_mean_coef2") * xt.abs()
    close(x0, d["p_xstart"], scale=x0_scale)  # reaches ~6e4 at t=999 (1/sqrt(alpha_bar) ~ 2e4)
    close(mean, d["p_mean"], scale=mean_scale)
    close(log_var, d["p_log_variance"])
    noise_term = (0.5 * log_var.double()).exp() * s["noise"].double().abs() * s["temperature"]
    close(step, d["step_sample"], scale=mean_scale + noise_term)


def test_respacing(fx):
    sd = fx["model"].head.sample_diffusion
    assert sd.timestep_map.tolist() == fx["diffusion"]["respaced_timestep_map"].tolist()
    close(sd.betas, fx["diffusion"]["respaced_betas"].to(torch.float64), atol=1e-12)


@pytest.mark.parametrize("num_iter", [1, 4, 16, 64])
def test_reveal_schedule(fx, num_iter):
    L = fx["outputs"]["tokens"].shape[1]
    expected = fx["mask_schedule"][num_iter]
    assert [n for n, _ in cosine_schedule(L, num_iter)] == list(expected)
    # and the random ordering's plan reveals exactly those counts
    side = int(L ** 0.5)
    plan = RandomOrdering((side, side)).sampling_plan(2, num_iter, torch.Generator().manual_seed(0))
    assert [int(s.predict[0].sum()) for s in plan] == list(expected)
