"""scikit-learn's bundled 8x8 handwritten digits: a labelled image set that works offline.

1,797 greyscale 8x8 images (values 0..16) of the digits 0-9, upsampled
bilinearly to ``image_size`` and repeated to 3 channels in [-1, 1]
(background -1, ink +1). Small enough to train a MAR on a laptop CPU in minutes.

References:
    UCI "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak), as shipped by sklearn.datasets.load_digits.
"""
from __future__ import annotations

from typing import Literal

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


def halves(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of a reference half and a held-out half of the digits, split per class with a seeded shuffle (the
    first half of each class's shuffle is the reference). The digits scorer measures every Frechet distance
    against the reference half and draws its real-data floor from the held-out half; ``DigitsDataset.heldout``
    is that held-out half."""
    g = torch.Generator().manual_seed(seed)
    ref, held = [], []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        ref.append(idx[: len(idx) // 2])
        held.append(idx[len(idx) // 2 :])
    return torch.cat(ref), torch.cat(held)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (offline), upsampled to image_size, 10 classes.

    ``split``: "all" trains on every digit (the quickstart's, as measured), "reference" on the scorer's reference
    half only, so the held-out half (``heldout()``, the half the scorer's real-data floor draws from) is data
    the model never saw. With "all", the held-out likelihood is one of digits it trained on, and its ``repr``
    says so in the result.
    """

    num_classes = 10
    contract_args = {"image_size": 8}

    # 16 px: an 8 x 8 grid of 2 x 2 pixel patches; split "all": the quickstart's data as measured
    def __init__(self, image_size: int = 16, split: Literal["all", "reference"] = "all"):
        if image_size < 8:
            raise ValueError(f"digits image_size must be >= 8, got {image_size}")
        if split not in ("all", "reference"):
            raise ValueError(f"digits split must be 'all' or 'reference', got {split!r}")
        self.image_size, self.split, self.part = image_size, split, split
        self.images, self.labels = load_digits_tensor(image_size)
        if split == "reference":
            keep = halves(self.labels)[0]
            self.images, self.labels = self.images[keep], self.labels[keep]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        if self.part != "heldout":
            return f"DigitsDataset(image_size={self.image_size}, split={self.split})"
        seen = "seen in training: the run trains on all digits" if self.split == "all" else "never trained on"
        return f"DigitsDataset held-out half ({len(self)} digits, {self.image_size} px; {seen})"

    def heldout(self) -> DigitsDataset:
        """The held-out half of the digits (``halves``): the half the scorer's floor draws from."""
        held = DigitsDataset(self.image_size)
        keep = halves(held.labels)[1]
        held.images, held.labels, held.split, held.part = held.images[keep], held.labels[keep], self.split, "heldout"
        return held

    def scorer(self):
        """The offline sample score for this dataset: a small classifier trained on real digits."""
        from sandbox.plugins.datasets.digits_classifier import DigitsScorer

        return DigitsScorer(self.image_size)
