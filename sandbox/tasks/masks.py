"""Editing masks: a ``--mask`` spec -> pixel mask -> token-grid known mask; compositing; causal prefixes.

A pixel mask is (H, W) bool with True = to be generated (the convention of inpainting masks: white =
fill in). The specs (one mask for the whole batch, so every image has the same unknown positions, which
the sampling plan needs):

    box:x0,y0,x1,y1          pixel rectangle, x0/y0 inclusive, x1/y1 exclusive (PIL's crop box; x = column)
    top|bottom|left|right[:f] that side's band covering fraction f of the image (default 0.5: a half)
    center[:f]               a centred rectangle covering fraction f of the AREA (default 0.25: half the
                             side, the central-hole setting of Context Encoders), the image's shape scaled
                             by sqrt(f) -- a square on square images
    random[:f[:seed]]        fraction f of the TOKENS (default 0.5), drawn uniformly, as their pixel blocks
                             (variations: the other tokens are kept); the seed defaults to the run's generator
    invert:SPEC              the complement of SPEC: ``invert:center:0.25`` keeps the centre and generates
                             around it (outpainting)
    PATH                     a mask image (PNG or any image PIL reads): white (grey >= 128) = generate;
                             an image of another size is resized to the run's with nearest neighbour (no
                             grey edges; another aspect ratio is stretched), and ``PixelMask.note`` says so

Every fraction is a share of the image (or token grid) area, in [0, 1]; a band or box is rounded to whole
pixels. A mask need not follow token borders: a token is known only when every pixel it covers is known
(``token_known``), so the generated region is the mask grown to whole tokens.

References:
    MaskGIT: Chang et al., CVPR 2022, sec. 4.3 (inpainting, outpainting and class-conditional editing by
        masking tokens of a masked generative model).
    Context Encoders: Pathak et al., CVPR 2016 (the central square hole as the inpainting benchmark).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sandbox.core.checks import is_prefix
from sandbox.errors import UserError

__all__ = ["PixelMask", "parse_mask", "token_known", "known_positions", "token_pixels", "composite", "is_prefix",
           "FORMS"]

FORMS = ("box:x0,y0,x1,y1, top|bottom|left|right[:fraction], center[:fraction], random[:fraction[:seed]], "
         "invert:SPEC or a mask image path (white = generate)")
SIDES = ("top", "bottom", "left", "right")
SIDE_FRACTION = 0.5  # a half: the bottom-half inpainting of issue 23's measurements
CENTER_FRACTION = 0.25  # half the side: Context Encoders' central hole (64x64 in 128x128 images)
RANDOM_FRACTION = 0.5  # half the tokens regenerated: variations that keep the layout but change details


@dataclass
class PixelMask:
    """A parsed ``--mask``: which pixels to generate, and what was done to fit the run."""

    generate: Tensor  # (H, W) bool, True = to be generated
    note: str = ""  # e.g. the resize of a mask image of another size; "" when there is nothing to say

    @property
    def empty(self) -> bool:
        """Nothing to generate (the input is the result)."""
        return not bool(self.generate.any())

    @property
    def full(self) -> bool:
        """Everything to generate (plain sampling)."""
        return bool(self.generate.all())


# --------------------------------------------------------------------------------------
# Spec -> pixel mask
# --------------------------------------------------------------------------------------
def parse_mask(spec: str, size: int | tuple[int, int], token_stride: int = 1,
               generator: torch.Generator | None = None) -> PixelMask:
    """A ``--mask`` spec (module docstring) -> the pixel mask of an image of ``size`` (H = W, or (H, W)).

    ``token_stride`` (the tokenizer's pixels per token side) places ``random`` masks on the token grid;
    ``generator`` draws them unless the spec gives a seed. Anything malformed: one UserError line.
    """
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    spec = str(spec).strip()
    name, _, rest = spec.partition(":")
    if name == "invert":
        if not rest:
            raise UserError(f"--mask {spec!r}: invert needs a mask after it, e.g. invert:center:0.25")
        inner = parse_mask(rest, (H, W), token_stride, generator)
        return PixelMask(~inner.generate, inner.note)
    if name == "box":
        return PixelMask(_box(spec, rest, H, W))
    if name in SIDES:
        return PixelMask(_side(name, _fraction(spec, rest, SIDE_FRACTION), H, W))
    if name == "center":
        return PixelMask(_center(_fraction(spec, rest, CENTER_FRACTION), H, W))
    if name == "random":
        return PixelMask(_random_tokens(spec, rest, H, W, token_stride, generator))
    return _image(spec, H, W)


def _fraction(spec: str, text: str, default: float) -> float:
    if not text:
        return default
    try:
        f = float(text)
    except ValueError:
        raise UserError(f"--mask {spec!r}: {text!r} is not a fraction; expected a number in [0, 1]") from None
    if not 0.0 <= f <= 1.0:
        raise UserError(f"--mask {spec!r}: fraction {f} is outside [0, 1]")
    return f


def _pixels(f: float, n: int) -> int:
    """Whole pixels (or tokens) nearest to fraction f of n, halves rounded up."""
    return min(n, math.floor(f * n + 0.5))


def _box(spec: str, text: str, H: int, W: int) -> Tensor:
    parts = text.split(",")
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--mask {spec!r}: a box is box:x0,y0,x1,y1, four integer pixel coordinates") from None
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise UserError(f"--mask {spec!r}: the box must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} "
                        "(x is the column; x0,y0 inclusive, x1,y1 exclusive)")
    out = torch.zeros(H, W, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


def _side(name: str, f: float, H: int, W: int) -> Tensor:
    out = torch.zeros(H, W, dtype=torch.bool)
    rows, cols = _pixels(f, H), _pixels(f, W)
    if name == "top":
        out[:rows] = True
    elif name == "bottom":
        out[H - rows :] = True
    elif name == "left":
        out[:, :cols] = True
    else:
        out[:, W - cols :] = True
    return out


def _center(f: float, H: int, W: int) -> Tensor:
    rows, cols = _pixels(math.sqrt(f), H), _pixels(math.sqrt(f), W)  # area f: each side scaled by sqrt(f)
    out = torch.zeros(H, W, dtype=torch.bool)
    top, left = (H - rows) // 2, (W - cols) // 2
    out[top : top + rows, left : left + cols] = True
    return out


def _random_tokens(spec: str, text: str, H: int, W: int, token_stride: int,
                   generator: torch.Generator | None) -> Tensor:
    frac_text, _, seed_text = text.partition(":")
    f = _fraction(spec, frac_text, RANDOM_FRACTION)
    if seed_text:
        try:
            generator = torch.Generator().manual_seed(int(seed_text))
        except ValueError:
            raise UserError(f"--mask {spec!r}: the seed {seed_text!r} is not an integer") from None
    h, w = _grid(H, W, token_stride)
    picks = torch.randperm(h * w, generator=generator)[: _pixels(f, h * w)]  # tokens to regenerate
    tokens = torch.zeros(h * w, dtype=torch.bool)
    tokens[picks] = True
    return token_pixels(tokens.view(h, w), token_stride)  # (H, W) the picked tokens' pixels


def _image(spec: str, H: int, W: int) -> PixelMask:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--mask {spec!r} is neither a mask spec nor an existing file; use {FORMS}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = img.convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--mask {spec!r}: cannot read it as an image ({e})") from None
    note = ""
    if grey.size != (W, H):
        note = (f"mask {path.name} is {grey.size[0]}x{grey.size[1]} px; resized to the run's {W}x{H} with "
                "nearest neighbour")
        grey = grey.resize((W, H), Image.NEAREST)
    return PixelMask(torch.from_numpy(np.asarray(grey) >= 128), note)  # white (>= mid grey) = generate


# --------------------------------------------------------------------------------------
# Pixel mask <-> token grid
# --------------------------------------------------------------------------------------
def _grid(H: int, W: int, token_stride: int) -> tuple[int, int]:
    if H % token_stride or W % token_stride:
        raise UserError(f"a {W}x{H} px mask does not divide into tokens of {token_stride}x{token_stride} px "
                        "(the tokenizer's stride x patch_size)")
    return H // token_stride, W // token_stride


def token_known(generate: Tensor, token_stride: int) -> Tensor:
    """Pixel mask (..., H, W) bool, True = generate -> token grid (..., h, w) bool, True = KNOWN.

    A token is known only when every pixel of its token_stride x token_stride block is known, for every
    tokenizer alike. For pixels that is exact: a known token holds exactly the input's pixels. A latent
    tokenizer's encoder and decoder see beyond a token's block (their receptive field), so a known token
    next to the mask carries a little of the masked input, and the decoded pixels next to the mask mix
    in the generated tokens: the border is soft. ``composite`` (``--paste true``) puts the input's pixels
    back outside the mask.
    """
    *lead, H, W = generate.shape
    h, w = _grid(H, W, token_stride)
    blocks = generate.reshape(*lead, h, token_stride, w, token_stride)
    return ~blocks.any(dim=-1).any(dim=-2)  # (..., h, w)


def known_positions(generate: Tensor, tokenizer, ordering, batch: int) -> Tensor:
    """Pixel mask (H, W) or (B, H, W) bool, True = generate -> the sequence positions it fixes (B, L) bool,
    for any tokenizer (its ``token_stride``) and ordering (its ``known_from_grid``): what a sampling plan's
    ``known`` takes."""
    grid = token_known(generate, tokenizer.token_stride)  # (h, w) or (B, h, w)
    return ordering.known_from_grid(grid.expand(batch, *grid.shape[-2:]))  # (B, L)


def token_pixels(grid: Tensor, token_stride: int) -> Tensor:
    """Token grid (..., h, w) -> pixels (..., h*s, w*s): each token's value over its block (e.g. the
    generated region a known-token grid leaves: ``~token_pixels(known, s)``, the mask grown to tokens)."""
    return grid.repeat_interleave(token_stride, dim=-2).repeat_interleave(token_stride, dim=-1)


def composite(original: Tensor, generated: Tensor, generate: Tensor) -> Tensor:
    """``--paste true``: the original pixels outside the mask, the generated ones inside.

    original, generated (B, 3, H, W); generate (H, W) or (B, H, W) bool, the pixel mask as given (not grown
    to tokens), so the pixels the user kept are the input's exactly; with a latent tokenizer a seam may show
    where the soft border met the pasted pixels.
    """
    if original.shape != generated.shape or tuple(generate.shape[-2:]) != tuple(original.shape[-2:]):
        raise ValueError(f"composite: images {tuple(original.shape)} and {tuple(generated.shape)} and mask "
                         f"{tuple(generate.shape)} do not match")
    where = generate.to(original.device).unsqueeze(-3)  # (1 or B, 1, H, W)
    return torch.where(where, generated, original)  # (B, 3, H, W)


# --------------------------------------------------------------------------------------
# Causal backbones: what a known mask can mean for them
# --------------------------------------------------------------------------------------
# ``is_prefix`` (sandbox.core.checks) says whether a known mask is, in every row, the first k positions of a
# generation order. A causal (decoder-only) backbone predicts one token per step in the ordering's order, each
# conditioned on the tokens before it, so it can only continue a known prefix: in raster order the known region
# must be the first rows (and the start of the next row) -- a ``bottom:`` mask aligned to tokens; a random-order
# model can put any known set first, since its order is drawn per image. ``Backbone.check_known`` refuses the
# rest with one line for a backbone that declares ``known_prefix_only``.
