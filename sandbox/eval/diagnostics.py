"""Latent statistics of a recipe, and the warnings a run prints once when its tokens look hard to model.

Two checks, both generic over plugins:
- the latent scale: MAR's head and mask-token statistics assume roughly unit-variance latents; the official
  KL-16 scale 0.2325 is 1 / std of its ImageNet latents (one posterior sample per image, all elements, no
  mean shift: LTH14/mar#2, #62, #100). ``measure_latents`` estimates it on a seeded sample of a dataset.
- the token dimension against the head's width: a per-token head has to model a C-dimensional distribution
  with a W-wide network. Reported in the official repository (LTH14/mar#102): MAR-B (head width 1024) on a
  Flux VAE with patch 2 (64-dim tokens) reached FID 30 after 150 epochs against 3.53 with KL-16 (16-dim
  tokens); the author's advice was a larger diffusion head, and that KL-8 with patch 2 (16 dims) works.

References:
    LTH14/mar GitHub issues #2, #62, #100 (how 0.2325 was computed) and #102 (Flux VAE tokens, head width).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox.core.contracts import Dataset, Head, Tokenizer

# the latent std is "far from 1" outside [1/2, 2]: the factor-of-4 variance error MAR's defaults were not tuned for
# (an uncalibrated KL-16 has std ~4.3, pixel digits in [-1, 1] ~0.65)
STD_RANGE = (0.5, 2.0)
# tokens are "large for the head" when C >= 32 and W / C < 32: the reported failure had C = 64, W / C = 16; the
# paper's working settings have C = 16 and W / C = 64..96 (MAR-B/L/H). Small tokens (pixel patches of 12 dims on
# a 128-wide head) train well here, so the ratio alone would cry wolf.
LARGE_TOKEN_DIM = 32
MIN_WIDTH_PER_DIM = 32


@torch.no_grad()
def latents_of(tokenizer: Tokenizer, dataset: Dataset, items: Tensor, generator: torch.Generator | None,
               sample: bool = True) -> Tensor:
    """A batch of dataset items (images, or a latent cache's moments) -> scaled latents (B,c,h,w), as training sees them."""
    return dataset.latents(items, tokenizer, generator, sample=sample)


@torch.no_grad()
def measure_latents(tokenizer: Tokenizer, dataset: Dataset, num_images: int = 1024, batch_size: int = 64,
                    seed: int = 0, device: torch.device | str = "cpu", sample: bool = True) -> dict:
    """Mean and std over every element of the (scaled) latents of ``num_images`` seeded random dataset items.

    One posterior sample per image (``sample``), as the official scale was computed. Returns
    {"mean", "std", "num_images", "num_values"}; accumulated in float64 so large samples stay exact.
    """
    n = min(num_images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    g = torch.Generator(device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for lo in range(0, n, batch_size):
        items = torch.stack([dataset[i][0] for i in order[lo : lo + batch_size]]).to(device)
        z = latents_of(tokenizer, dataset, items, g, sample).double()  # (b, c, h, w)
        total, total_sq, count = total + float(z.sum()), total_sq + float((z * z).sum()), count + z.numel()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)  # unbiased, as torch.std
    return {"mean": mean, "std": math.sqrt(var), "num_images": n, "num_values": count}


# --------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------
def latent_std_warning(std: float, num_images: int) -> str | None:
    lo, hi = STD_RANGE
    if lo <= std <= hi:
        return None
    return (f"warning: the latents of this run have std {std:.3g} (measured on {num_images} images), far from 1; "
            "MAR expects roughly unit-variance latents. Set the tokenizer's scale with "
            "`sandbox calibrate-scale --config RECIPE` (it writes the measured scale into the recipe)")


def head_width_warning(token_dim: int, head: Head) -> str | None:
    """A warning when C is large for the head's width (``Head.width``; heads without one are not checked)."""
    width = getattr(head, "width", None)
    if not width or token_dim < LARGE_TOKEN_DIM or width >= MIN_WIDTH_PER_DIM * token_dim:
        return None
    return (f"warning: {token_dim}-dim tokens are large for a head of width {width} ({width / token_dim:.0f} per "
            f"token dim). Reported in LTH14/mar#102: 64-dim Flux-VAE tokens gave FID 30 with MAR-B's 1024-wide "
            "head against 3.5 with 16-dim KL-16 tokens; widen the head (e.g. >= "
            f"{MIN_WIDTH_PER_DIM * token_dim}) or use a smaller patch or fewer latent channels")


# images the trainer encodes for its latent-std check: a factor-2 threshold needs no precision, and on a CPU a
# full-size KL-16 encodes a 256 px image in about a second (a latent cache's moments cost nothing)
WARNING_IMAGES = 16


def run_warnings(exp, seed: int, device: torch.device | str, num_images: int = WARNING_IMAGES) -> list[str]:
    """The warnings for a built experiment (``sandbox.config.build.Experiment`` with a dataset): printed once by the trainer."""
    out = [head_width_warning(exp.tokenizer.token_dim, exp.model.head)]
    if exp.dataset is not None:
        stats = measure_latents(exp.tokenizer, exp.dataset, num_images, num_images, seed, device)
        out.append(latent_std_warning(stats["std"], stats["num_images"]))
    return [w for w in out if w]
