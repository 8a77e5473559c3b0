"""The KL-16 tokenizer: shapes, scale and posterior sampling (random weights), errors, and parity with the
official LDM autoencoder on the recorded fixture (``official_kl16.pt``)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import fixture_files

from sandbox.errors import UserError
from sandbox.plugins.tokenizers.kl16 import SCALE, KL16Tokenizer, ldm_to_diffusers


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return KL16Tokenizer(checkpoint=None, base_channels=32)


def test_shapes_scale_and_posterior_sampling(small):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert (small.latent_channels, small.stride, small.token_dim, small.moment_channels) == (16, 16, 16, 32)
    with torch.no_grad():
        moments = small.moments(x)  # (2, 32, 4, 4): mean and log-variance
        mean = small.encode(x, sample=False)
        drawn = small.encode(x, torch.Generator().manual_seed(1))
        again = small.encode(x, torch.Generator().manual_seed(1))
        other = small.encode(x, torch.Generator().manual_seed(2))
        decoded = small.decode(mean)
    assert moments.shape == (2, 32, 4, 4) and mean.shape == drawn.shape == (2, 16, 4, 4)
    torch.testing.assert_close(mean, moments[:, :16] * SCALE)  # the mean, scaled by 0.2325
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)  # the generator fixes the sample
    std = (0.5 * moments[:, 16:].clamp(-30, 20)).exp() * SCALE
    assert ((drawn - mean).abs() <= 6 * std).all() and not torch.allclose(drawn, mean)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert not any(p.requires_grad for p in small.parameters())


def test_runs_in_float32_under_autocast(small):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert small.moments(x).dtype == torch.float32
        assert small.decode(small.encode(x)).dtype == torch.float32


def test_missing_checkpoint_names_the_file_and_where_to_put_it(tmp_path):
    with pytest.raises(UserError, match=r"KL-16 weights not found: .*nope/kl16\.ckpt.*put it at"):
        KL16Tokenizer(checkpoint=str(tmp_path / "nope" / "kl16.ckpt"))


# --------------------------------------------------------------------------------------
# Parity with the official KL-16 code (reduced base channels, random weights)
# --------------------------------------------------------------------------------------
KL16_FILES = fixture_files("official_kl16*.pt")


@pytest.fixture(scope="module", params=KL16_FILES or [None], ids=[f.stem for f in KL16_FILES] or ["none"])
def fx(request):
    if request.param is None:
        pytest.skip("no official_kl16*.pt: set SANDBOX_PARITY_FIXTURES or put them in ../shared/fixtures")
    return torch.load(request.param, weights_only=False)  # trusted test data recorded by the project


@pytest.mark.parity
def test_converted_weights_reproduce_the_official_encoder_and_decoder(fx, tmp_path):
    torch.save({"model": fx["state_dict"]}, tmp_path / "kl16.ckpt")  # the official file format
    tok = KL16Tokenizer(checkpoint=str(tmp_path / "kl16.ckpt"), base_channels=fx["config"]["ch"])
    assert fx["config"]["scale_factor_used_by_mar"] == SCALE
    with torch.no_grad():
        mean, logvar = tok.moments(fx["inputs"]["image"]).chunk(2, dim=1)
        decoded = tok.decode(mean * SCALE)  # decode takes scaled latents
    for ours, theirs in ((mean, fx["outputs"]["mean"]), (logvar, fx["outputs"]["logvar"]),
                         (decoded, fx["outputs"]["decoded"])):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parity
def test_checkpoint_of_another_width_is_a_user_error(fx, tmp_path):
    torch.save({"model": fx["state_dict"]}, tmp_path / "kl16.ckpt")  # base channels 32
    with pytest.raises(UserError, match="has base_channels 32"):
        KL16Tokenizer(checkpoint=str(tmp_path / "kl16.ckpt"), base_channels=64)


@pytest.mark.parity
def test_full_size_layout_maps_onto_the_128_channel_model(fx):
    layout = {name: torch.empty(shape, device="meta") for name, shape in fx["full_size_layout"]}
    converted = ldm_to_diffusers(layout)
    with torch.device("meta"):  # the real 66M-parameter architecture, without allocating it
        full = KL16Tokenizer(checkpoint=None)
    ours = {name: tuple(v.shape) for name, v in full.vae.state_dict().items()}
    assert {name: tuple(v.shape) for name, v in converted.items()} == ours  # nothing missing or left over
    assert sum(math.prod(s) for s in ours.values()) == fx["full_size_num_params"] == 66_456_019
