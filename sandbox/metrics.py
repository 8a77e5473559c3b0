"""Image-quality numbers shared by commands: PSNR of reconstructions (train-tokenizer, tokenizer evaluations).

References:
    PSNR as in the LDM / MAR tokenizer tables: images in [0, 1], peak 1, per image, then averaged (torchmetrics).
"""
from __future__ import annotations

from torch import Tensor


def psnr(reference: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB of (N,3,H,W) images in [-1,1] against ``reference``, on the [0,1] scale (peak 1) -> (N,).

    torchmetrics' PSNR, per image (``dim=(1, 2, 3)``): the same numbers as ``sandbox eval-tokenizer``.
    A perfect reconstruction gives inf.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a = (reference.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
    b = (images.float().clamp(-1, 1) + 1) / 2
    return peak_signal_noise_ratio(b, a, data_range=1.0, dim=(1, 2, 3), reduction="none")  # (N,)
