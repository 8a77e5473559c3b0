"""Editing masks (sandbox.tasks.masks): --mask specs -> pixel masks -> token-grid known masks -> sampling plans,
compositing (--paste), and what a causal backbone can take (a known prefix of its order)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox.core.contracts import Tokenizer
from sandbox.errors import UserError
from sandbox.plugins.orderings.multiscale import MultiscaleOrdering
from sandbox.plugins.orderings.random import RandomOrdering, random_orders
from sandbox.plugins.orderings.raster import RasterOrdering
from sandbox.plugins.tokenizers.pixels import PixelTokenizer
from sandbox.tasks.masks import composite, is_prefix, known_positions, parse_mask, token_known, token_pixels

ORDERINGS = {
    "random": lambda grid: RandomOrdering(grid),
    "raster": lambda grid: RasterOrdering(grid),
    "multiscale": lambda grid: MultiscaleOrdering(grid, scale_steps=None),
    "multiscale-split": lambda grid: MultiscaleOrdering(grid, scales=[1, 2, 4], scale_steps=[1, 3, 5]),
    "multiscale-residual": lambda grid: MultiscaleOrdering(grid, scales=[1, 2, 4], residual=True),
}


class _LatentTokenizer(Tokenizer):
    """(Leading underscore: a stand-in, never registered.) A latent tokenizer's geometry: stride 8, 2x2 patches."""

    stride = 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Specs -> pixel masks
# --------------------------------------------------------------------------------------
def test_box_is_inclusive_exclusive_with_x_the_column():
    m = parse_mask("box:2,1,5,3", 8).generate
    assert m.shape == (8, 8) and m.dtype == torch.bool
    assert m[1:3, 2:5].all() and int(m.sum()) == 3 * 2  # rows y 1..2, columns x 2..4


@pytest.mark.parametrize("spec, rows, cols", [
    ("top", slice(0, 4), slice(None)), ("bottom", slice(4, 8), slice(None)), ("bottom:0.25", slice(6, 8), slice(None)),
    ("left:0.75", slice(None), slice(0, 6)), ("right", slice(None), slice(4, 8)), ("top:1", slice(None), slice(None)),
])
def test_sides_cover_their_fraction_default_a_half(spec, rows, cols):
    m = parse_mask(spec, 8).generate
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[rows, cols] = True
    assert torch.equal(m, expect)


def test_center_covers_a_fraction_of_the_area():
    m = parse_mask("center", 16).generate  # default 0.25 of the area: half the side
    assert m[4:12, 4:12].all() and int(m.sum()) == 64
    assert int(parse_mask("center:0.5", 16).generate.sum()) == 11 * 11  # sqrt(0.5) * 16 = 11.3 -> 11
    assert parse_mask("center:1", 16).full and parse_mask("center:0", 16).empty
    wide = parse_mask("center:0.25", (8, 16)).generate  # another shape: its own shape, scaled
    assert wide[2:6, 4:12].all() and int(wide.sum()) == 32


def test_random_picks_a_fraction_of_whole_tokens_seeded():
    m = parse_mask("random:0.25", 16, token_stride=4, generator=gen(0)).generate
    tokens = ~token_known(m, 4)  # (4, 4) generated tokens
    assert int(tokens.sum()) == 4  # a quarter of the 16 tokens
    assert torch.equal(token_pixels(tokens, 4), m)  # whole token blocks only
    assert torch.equal(m, parse_mask("random:0.25", 16, 4, gen(0)).generate)  # the generator fixes it
    assert torch.equal(parse_mask("random:0.25:7", 16, 4, gen(1)).generate,
                       parse_mask("random:0.25:7", 16, 4, gen(2)).generate)  # a seed in the spec wins
    assert int((~token_known(parse_mask("random", 16, 4, gen(0)).generate, 4)).sum()) == 8  # default: a half


def test_invert_is_the_complement():
    assert torch.equal(parse_mask("invert:center:0.25", 16).generate, ~parse_mask("center:0.25", 16).generate)


def test_a_mask_image_white_generates_and_another_size_is_resized_nearest(tmp_path):
    arr = np.zeros((4, 4), dtype=np.uint8)
    arr[2:, 1:3] = 255  # white: generate
    arr[0, 0] = 100  # dark grey: keep
    Image.fromarray(arr).save(tmp_path / "m.png")
    same = parse_mask(str(tmp_path / "m.png"), 4)
    assert torch.equal(same.generate, torch.from_numpy(arr >= 128)) and same.note == ""
    big = parse_mask(str(tmp_path / "m.png"), 8)  # 4x4 -> 8x8: each mask pixel becomes a 2x2 block
    assert torch.equal(big.generate, token_pixels(torch.from_numpy(arr >= 128), 2))
    assert "resized" in big.note and "nearest" in big.note and "4x4" in big.note
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(tmp_path / "rgb.png")
    assert parse_mask(str(tmp_path / "rgb.png"), 4).full


@pytest.mark.parametrize("spec, words", [
    ("box:1,2,3", "four integer"), ("box:a,b,c,d", "four integer"), ("box:4,0,2,8", "x0 < x1"),
    ("box:0,0,9,4", "x1 <= 8"), ("top:1.5", "outside [0, 1]"), ("left:half", "not a fraction"),
    ("random:0.5:abc", "not an integer"), ("invert:", "invert needs"), ("bottm:0.5", "neither a mask spec"),
    ("center:-0.1", "outside"), ("no/such/file.png", "neither a mask spec"),
])
def test_malformed_specs_are_one_user_error_line(spec, words):
    with pytest.raises(UserError, match=re.escape(words)) as e:
        parse_mask(spec, 8, token_stride=2, generator=gen(0))
    assert "\n" not in str(e.value) and spec.split(":")[0] in str(e.value)


def test_unreadable_image_and_tokens_that_do_not_divide_are_user_errors(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot read it as an image"):
        parse_mask(str(tmp_path / "bad.png"), 8)
    with pytest.raises(UserError, match="does not divide into tokens of 3x3"):
        parse_mask("random:0.5", 8, token_stride=3, generator=gen(0))


# --------------------------------------------------------------------------------------
# Pixel mask -> token grid, for any tokenizer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", [PixelTokenizer(patch_size=1), PixelTokenizer(patch_size=2),
                                       _LatentTokenizer(patch_size=2)], ids=["pixels-p1", "pixels-p2", "latent-s16"])
def test_a_token_is_known_only_when_every_pixel_it_covers_is_known(tokenizer):
    s = tokenizer.token_stride
    H = 4 * s
    m = torch.zeros(H, H, dtype=torch.bool)
    m[s + s // 2, 2 * s] = True  # one pixel inside token (1, 2)
    m[3 * s - 1, 0] = True  # the last pixel row of token (2, 0)
    known = token_known(m, s)
    expect = torch.ones(4, 4, dtype=torch.bool)
    expect[1, 2] = expect[2, 0] = False
    assert torch.equal(known, expect)
    assert torch.equal(~token_pixels(known, s) | m, ~token_pixels(known, s))  # the mask grown to whole tokens
    batched = token_known(torch.stack([m, torch.zeros_like(m)]), s)  # (B, H, W) works the same
    assert torch.equal(batched[0], expect) and batched[1].all()


def test_composite_puts_the_original_back_outside_the_mask():
    original, generated = torch.rand(2, 3, 8, 8, generator=gen(0)), torch.rand(2, 3, 8, 8, generator=gen(1))
    m = parse_mask("box:1,1,6,4", 8).generate
    out = composite(original, generated, m)
    assert torch.equal(out[..., ~m], original[..., ~m]) and torch.equal(out[..., m], generated[..., m])
    per_image = torch.stack([m, ~m])  # (B, H, W)
    out = composite(original, generated, per_image)
    assert torch.equal(out[1][:, m], original[1][:, m])
    with pytest.raises(ValueError, match="do not match"):
        composite(original, generated, torch.zeros(4, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# Pixel mask -> sampling plan, through each ordering
# --------------------------------------------------------------------------------------
def plan_for(ordering, spec: str, B: int = 3, num_iter: int = 4, seed: int = 0):
    tokenizer = PixelTokenizer(patch_size=2)  # 8 px images -> the 4x4 token grid of the orderings below
    generate = parse_mask(spec, 8, tokenizer.token_stride, gen(5)).generate  # (H, W) one mask for the batch
    known = known_positions(generate, tokenizer, ordering, B)  # (B, L)
    assert torch.equal(known, ordering.known_from_grid(token_known(generate, 2).expand(B, -1, -1)))
    return known, ordering.sampling_plan(B, num_iter, gen(seed), known=known)


@pytest.mark.parametrize("name", ORDERINGS)
@pytest.mark.parametrize("spec", ["bottom", "box:1,3,7,6", "invert:center:0.25", "random:0.3", "right:0.25"])
def test_every_position_outside_the_known_set_is_predicted_exactly_once(name, spec):
    ordering = ORDERINGS[name]((4, 4))
    known, plan = plan_for(ordering, spec)
    times = torch.stack([s.predict for s in plan]).sum(0)  # (B, L)
    assert torch.equal(times, (~known).long())  # unknown: once; known: never
    assert all(s.predict.sum(1).unique().numel() == 1 for s in plan)
    progress = [s.progress for s in plan]
    assert progress == sorted(progress) and progress[-1] >= 1 - 1 / ordering.seq_len


@pytest.mark.parametrize("name", ORDERINGS)
def test_an_empty_mask_plans_nothing_and_a_full_mask_is_the_plain_plan(name):
    ordering = ORDERINGS[name]((4, 4))
    known, plan = plan_for(ordering, "center:0")
    assert known.all() and plan == []
    known, plan = plan_for(ordering, "top:1")
    plain = ordering.sampling_plan(3, 4, gen(0))
    assert not known.any() and len(plan) == len(plain)
    assert all(torch.equal(a.predict, b.predict) and a.progress == b.progress for a, b in zip(plan, plain))


@pytest.mark.parametrize("name", ["random", "raster", "multiscale", "multiscale-split"])
def test_pixel_tokenizer_keeps_known_pixels_bit_identical(name):
    """Whatever fills the unknown positions, the pixels of known tokens decode to the input exactly
    (pixel tokenizer, orderings whose decoded grid is the finest scale)."""
    tok, ordering = PixelTokenizer(patch_size=2), ORDERINGS[name]((4, 4))
    images = torch.rand(2, 3, 8, 8, generator=gen(0)) * 2 - 1
    generate = parse_mask("box:1,3,7,6", 8).generate
    known = ordering.known_from_grid(token_known(generate, 2).expand(2, -1, -1))  # (B, L)
    seq = ordering.to_sequence(tok.to_tokens(tok.encode(images)))  # (B, L, C)
    filled = torch.where(known[..., None], seq, torch.randn(seq.shape, generator=gen(1)))  # the "samples"
    out = tok.decode(tok.from_tokens(ordering.to_grid(filled)))
    kept = token_pixels(token_known(generate, 2), 2)  # (H, W) pixels of known tokens
    assert torch.equal(out[..., kept], images[..., kept]) and not torch.equal(out, images)
    assert kept.any() and not (kept & generate).any()  # known pixels exist and lie outside the mask


# --------------------------------------------------------------------------------------
# Causal backbones: a known prefix of the order
# --------------------------------------------------------------------------------------
def test_is_prefix_of_the_generation_order():
    raster = torch.arange(16)  # (L,)
    top_known = token_known(parse_mask("bottom", 8).generate, 2).flatten().expand(2, -1)  # top rows known
    assert is_prefix(top_known, raster)
    assert not is_prefix(token_known(parse_mask("top", 8).generate, 2).flatten().expand(2, -1), raster)
    assert is_prefix(torch.zeros(2, 16, dtype=torch.bool), raster) and is_prefix(torch.ones(2, 16, dtype=torch.bool),
                                                                                  raster)
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :3] = True  # a prefix in each row, but of different lengths
    assert not is_prefix(uneven, raster)
    # a random order can put any known set first: then every mask is a prefix of it
    known = token_known(parse_mask("random:0.4", 8, 2, gen(0)).generate, 2).flatten().expand(3, -1)
    assert is_prefix(known, random_orders(3, 16, gen(1), "cpu", last=~known))
    assert not is_prefix(known, raster)
