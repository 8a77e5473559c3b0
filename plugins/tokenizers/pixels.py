"""Raw pixels as the latent: the tokenizer-free setting (stride 1, no scaling).

With patch size p a token is a p x p RGB patch, C = 3 p^2 (p=2: 12, p=4: 48, p=16: 768 as in JiT). With
``channels=1`` a token is a grey patch, C = p^2: for greyscale data (the digits: three equal channels) the other
two channels are copies, so a head that models them spends two thirds of its output on dimensions the data does
not have -- and draws independent noise into each, which the eye reads as colour speckle. Grey tokens encode the
channel mean and decode by repeating it, exact for data whose channels are equal.

References:
    MAR sec. 5 (pixel-space MAR is discussed as future work); JiT: Li & He, "Back to Basics: Let Denoising
    Generative Models Denoise", 2025 (large pixel patches with x-prediction).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sandbox.core.contracts import Tokenizer
from sandbox.errors import UserError


class PixelTokenizer(Tokenizer):
    """Identity tokenizer: pixels in [-1, 1] are the latent; tokens are p x p RGB (or grey) patches."""

    latent_channels = 3
    stride = 1

    def __init__(
        self,
        patch_size: int = 2,  # 2: a 16 px image becomes an 8 x 8 grid of 12-dim tokens
        channels: Literal[1, 3] = 3,  # 3: RGB, any data; 1: grey tokens (the channel mean) for greyscale data
    ):
        super().__init__(patch_size)
        if channels not in (1, 3):
            raise UserError(f"PixelTokenizer channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.latent_channels = int(channels)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return images if self.latent_channels == 3 else images.mean(dim=1, keepdim=True)

    def decode(self, latent: Tensor) -> Tensor:
        return latent if self.latent_channels == 3 else latent.repeat(1, 3, 1, 1)
