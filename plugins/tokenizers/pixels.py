"""Raw pixels as the latent: the tokenizer-free setting (stride 1, 3 channels, no scaling).

With patch size p a token is a p x p RGB patch, C = 3 p^2 (p=2: 12, p=4: 48, p=16: 768 as in JiT).

References:
    MAR sec. 5 (pixel-space MAR is discussed as future work); JiT: Li & He, "Back to Basics: Let Denoising
    Generative Models Denoise", 2025 (large pixel patches with x-prediction).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sandbox.core.contracts import Tokenizer


class PixelTokenizer(Tokenizer):
    """Identity tokenizer: pixels in [-1, 1] are the latent; tokens are p x p RGB patches."""

    latent_channels = 3
    stride = 1

    def __init__(self, patch_size: int = 2):  # 2: a 16 px image becomes an 8 x 8 grid of 12-dim tokens
        super().__init__(patch_size)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return images

    def decode(self, latent: Tensor) -> Tensor:
        return latent
