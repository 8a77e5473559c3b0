"""An image as condition tokens: a low-resolution copy or the edges of an image, through a small trainable
convolutional encoder, as a grid of prefix tokens.

The condition reads a full-size image from the batch's field "image" and derives its input itself (``reduce``):
"lowres" averages ``factor`` x ``factor`` pixel blocks (super-resolution: generate the image from its thumbnail),
"edges" takes the Sobel gradient magnitude (edge-to-image), "none" keeps the image (any paired image a dataset
gives). Deriving it here, from the image the dataset gives, keeps training and sampling on one path: sampling
is asked with full-size images too (a thumbnail from elsewhere is upsampled to the image size first).

The encoder -- two 3 x 3 convolutions, an average pool to a ``tokens`` x ``tokens`` grid, a linear map to the
backbone's width, a learned position per token -- gives T = tokens^2 tokens, all real (no mask). The null
condition is a learned grid of T tokens (MAR's "fake latent", one per token): what label drop in training and
the unconditional branch of guidance use.

References:
    MAR sec. 5.1 and official models/mar.py (the learned fake latent as the null condition, label drop 0.1);
    Sobel & Feldman, "A 3x3 isotropic gradient operator for image processing", 1968 (the edge filter).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.core.contracts import Condition, ConditionTokens
from sandbox.errors import UserError

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_edges(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> the gradient magnitude of their grey level (B, 3, H, W), scaled into [-1, 1]."""
    grey = images.mean(1, keepdim=True)  # (B, 1, H, W)
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(images)  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel)  # (B, 2, H, W)
    magnitude = grad.pow(2).sum(1, keepdim=True).sqrt() / 8.0  # a step of 2 (ink on background) -> ~1
    return (magnitude.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)  # (B, 3, H, W)


class ImageCondition(Condition):
    """A low-resolution copy / the edges of an image -> a small conv encoder -> tokens x tokens condition tokens;
    a learned null grid."""

    field = "image"
    contract_args = {"tokens": 2, "channels": 8, "factor": 2}

    def __init__(
        self,
        width: int,
        num_classes: int,
        reduce: Literal["lowres", "edges", "none"] = "lowres",  # what the condition keeps of the image
        factor: int = 4,  # lowres: average factor x factor blocks (16 px digits -> 4 px)
        tokens: int = 4,  # a tokens x tokens grid of condition tokens: 16, as many as a 4 px thumbnail's pixels
        channels: int = 64,  # the encoder's width: two convolutions on a thumbnail need little
    ):
        super().__init__(width, num_classes)
        if reduce not in ("lowres", "edges", "none"):
            raise UserError(f"ImageCondition reduce must be lowres, edges or none, got {reduce!r}")
        for name, value in (("factor", factor), ("tokens", tokens), ("channels", channels)):
            if value < 1:
                raise UserError(f"ImageCondition {name} must be >= 1, got {value}")
        self.reduce, self.factor, self.grid = reduce, int(factor), int(tokens)
        self.max_tokens = self.grid**2
        self.encoder = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(self.grid))  # (B, channels, g, g)
        self.proj = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, self.max_tokens, width))
        self.null_tokens = nn.Parameter(torch.zeros(1, self.max_tokens, width))
        nn.init.normal_(self.pos, std=0.02)  # as MAR's position embeddings and fake latent
        nn.init.normal_(self.null_tokens, std=0.02)

    def derive(self, images: Tensor) -> Tensor:
        """Full-size images (B, 3, H, W) -> what the encoder reads: a thumbnail, the edges, or the images."""
        if self.reduce == "lowres":
            if min(images.shape[-2:]) < self.factor:
                raise UserError(f"ImageCondition reads full-size images; {tuple(images.shape[-2:])} is smaller than "
                                f"its factor {self.factor}")
            return F.avg_pool2d(images, self.factor)  # (B, 3, H/f, W/f)
        return sobel_edges(images) if self.reduce == "edges" else images

    def forward(self, data, drop: Tensor | None = None, batch: int | None = None) -> ConditionTokens:
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, g*g, W); dropped rows (all, without data) get the null."""
        if data is None:
            return ConditionTokens(self.null_tokens.expand(batch, -1, -1))  # (B, T, W)
        images = self.select(data)
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shown = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise UserError(f"ImageCondition reads images (B, 3, H, W) in the field 'image', got {shown}")
        x = self.encoder(self.derive(images.to(self.pos.dtype)))  # (B, C, g, g)
        tokens = self.proj(x.flatten(2).transpose(1, 2)) + self.pos  # (B, T, W)
        if drop is not None:
            tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype), tokens)
        return ConditionTokens(tokens)

    def example(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``batch`` random 16 px images in [-1, 1]."""
        return torch.rand(batch, 3, 16, 16, generator=generator) * 2 - 1
