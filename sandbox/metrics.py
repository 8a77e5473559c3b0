"""Image-quality numbers shared by commands: PSNR of reconstructions (train-tokenizer, tokenizer evaluations).

References:
    PSNR as in the LDM / MAR tokenizer tables: images in [0, 1], peak 1, per image, then averaged.
"""
from __future__ import annotations

import torch
from torch import Tensor


def psnr(reference: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB of (N,3,H,W) images in [-1,1] against ``reference``, on the [0,1] scale (peak 1) -> (N,).

    Hand-written (two lines): torchmetrics' ``peak_signal_noise_ratio(..., data_range=1.0, dim=(1, 2, 3),
    reduction="none")`` gives the same numbers but is not a dependency here. A perfect reconstruction gives inf.
    """
    mse = (((images.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)  # (N,)
    return 10 * torch.log10(1.0 / mse)
