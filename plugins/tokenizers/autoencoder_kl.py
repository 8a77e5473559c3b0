"""Shared base of the tokenizers built on a diffusers ``AutoencoderKL`` (a KL-regularised VAE).

The encoder gives posterior moments (mean and log-variance, 2c channels); the
latent is a posterior sample during training and the mean when asked, then
shifted and scaled to roughly unit variance. A subclass only builds (and
loads) the ``AutoencoderKL`` and names its scale: ``KL16Tokenizer`` the LDM
KL-16 that MAR uses; any other diffusers VAE fits the same way.

References:
    Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (KL autoencoders);
    diffusers ``AutoencoderKL`` and ``DiagonalGaussianDistribution`` (the model and posterior used here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sandbox.core.contracts import Tokenizer

if TYPE_CHECKING:  # diffusers is imported on first use: it adds seconds to every CLI start otherwise
    from diffusers import AutoencoderKL


class AutoencoderKLTokenizer(Tokenizer):
    """A diffusers AutoencoderKL as a tokenizer: posterior sample (training) or mean, shifted and scaled."""

    __abstract_plugin__ = True  # a base for concrete VAEs, not a recipe choice by itself

    def __init__(self, vae: AutoencoderKL, scale: float, shift: float = 0.0, patch_size: int = 1):
        super().__init__(patch_size)
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)
        self.latent_channels = int(vae.config.latent_channels)
        self.stride = 2 ** (len(vae.config.block_out_channels) - 1)  # one 2x downsampling per level but the last

    @property
    def moment_channels(self) -> int:
        return 2 * self.latent_channels  # mean and log-variance

    # The VAE runs in float32 even inside the trainer's autocast: LDM VAEs overflow in fp16 (diffusers marks
    # them force_upcast), and the latents are the training targets, so they should not carry bf16 rounding.
    def moments(self, images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self.vae.encode(images.float()).latent_dist.parameters  # (B, 2c, H/s, W/s)

    def latent_from_moments(self, moments: Tensor, generator: torch.Generator | None = None,
                            sample: bool = True) -> Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments.float())  # log-variance clamped to [-30, 20] as in LDM
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, c, h, w)
        return (z - self.shift) * self.scale

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return self.latent_from_moments(self.moments(images), generator, sample)  # (B, c, H/s, W/s)

    def decode(self, latent: Tensor) -> Tensor:
        with torch.autocast(latent.device.type, enabled=False):
            return self.vae.decode(latent.float() / self.scale + self.shift).sample  # (B, 3, H, W)
