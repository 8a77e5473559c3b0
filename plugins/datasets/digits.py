"""scikit-learn's bundled 8x8 handwritten digits: a labelled image set that works offline.

1,797 greyscale 8x8 images (values 0..16) of the digits 0-9, upsampled
bilinearly to ``image_size`` and repeated to 3 channels in [-1, 1]
(background -1, ink +1). Small enough to train a MAR on a laptop CPU in minutes.

References:
    UCI "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak), as shipped by sklearn.datasets.load_digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.core.contracts import Dataset


def load_digits_tensor(image_size: int) -> tuple[Tensor, Tensor]:
    """All digits as (N, 3, S, S) float in [-1, 1] and labels (N,) long."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    return x, torch.tensor(bunch.target, dtype=torch.long)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (offline), upsampled to image_size, 10 classes."""

    num_classes = 10
    contract_args = {"image_size": 8}

    def __init__(self, image_size: int = 16):  # 16 px: an 8 x 8 grid of 2 x 2 pixel patches
        if image_size < 8:
            raise ValueError(f"digits image_size must be >= 8, got {image_size}")
        self.image_size = image_size
        self.images, self.labels = load_digits_tensor(image_size)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def scorer(self):
        """The offline sample score for this dataset: a small classifier trained on real digits."""
        from sandbox.plugins.datasets.digits_classifier import DigitsScorer

        return DigitsScorer(self.image_size)
