"""scikit-learn's bundled 8x8 handwritten digits: a labelled image set that works offline.

1,797 greyscale 8x8 images (values 0..16) of the digits 0-9, upsampled
bilinearly to ``image_size`` and repeated to 3 channels in [-1, 1]
(background -1, ink +1). Small enough to train a MAR on a laptop CPU in minutes.

With ``captions`` each item also carries a caption from a template ("a handwritten seven", "the digit 7", ...):
every image once with every training template, so an epoch shows each image under each phrasing. The last
``held_out_templates`` templates never caption a training item; ``conditioning`` asks with them, so an
evaluation checks that a text-conditioned model reads the digit rather than memorising the training phrasings.
With ``condition_image`` an item also carries the image itself as the field "image", for a condition that
derives its input from it (``ImageCondition``: a low-resolution copy, the edges).

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


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the digit's name, {digit}: its numeral; the digit stands at many positions, named both ways, so a model
# learns to find it whatever surrounds it. The last ones are held out of training by default. No template uses a
# digit's word for anything else: with "one handwritten {digit}" among them, the held-out "one, handwritten" was
# read as a 1 in 11% of samples (93.4% over all held-out prompts; docs/conditions.md has the measurement).
TEMPLATES = (
    "a handwritten {word}", "the digit {digit}", "{word}", "a picture of the number {word}",
    "{digit}, written by hand", "an image of a {digit}", "the handwritten digit {word} on a dark background",
    "number {digit}", "a small scanned {word}", "{digit}", "a blurry {word}", "the number {word} written with a pen",
    "digit: {digit}", "a single handwritten {digit}", "{word} in white ink", "a sample of the digit {digit}",
    "someone wrote a {word}", "{digit} on black", "the symbol for {word}", "a low resolution {word}",
    # held out
    "a drawing of the digit {word}", "the number {digit}", "{word}, handwritten", "a scan of a {digit}",
)


def caption(template: str, label: int) -> str:
    """A template filled in for the digit ``label``: "a handwritten {word}" -> "a handwritten seven"."""
    return template.format(word=WORDS[label], digit=label)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (offline), upsampled to image_size, 10 classes; optionally with
    captions from templates (some held out for evaluation) and the image itself as a condition field.

    ``split``: "all" trains on every digit (the quickstart's, as measured), "reference" on the scorer's reference
    half only, so the held-out half (``heldout()``, the half the scorer's real-data floor draws from) is data
    the model never saw. With "all", the held-out likelihood is one of digits it trained on, and its ``repr``
    says so in the result.
    """

    num_classes = 10
    contract_args = {"image_size": 8}

    def __init__(
        self,
        image_size: int = 16,  # 16 px: an 8 x 8 grid of 2 x 2 pixel patches
        split: Literal["all", "reference"] = "all",  # "all": the quickstart's data as measured
        captions: bool = False,  # items (image, {"label", "text"}): a caption from each training template
        held_out_templates: int = 4,  # the last 4 of the 24 templates: only evaluation prompts use them
        condition_image: bool = False,  # items also hold the image as the field "image" (image-to-image)
    ):
        if image_size < 8:
            raise ValueError(f"digits image_size must be >= 8, got {image_size}")
        if split not in ("all", "reference"):
            raise ValueError(f"digits split must be 'all' or 'reference', got {split!r}")
        if not 0 < held_out_templates < len(TEMPLATES):
            raise ValueError(f"digits held_out_templates must be in 1..{len(TEMPLATES) - 1}, got {held_out_templates}")
        self.image_size, self.split, self.part = image_size, split, split
        self.images, self.labels = load_digits_tensor(image_size)
        if split == "reference":
            keep = halves(self.labels)[0]
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.captions, self.condition_image = bool(captions), bool(condition_image)
        self.train_templates = TEMPLATES[: len(TEMPLATES) - held_out_templates]
        self.eval_templates = TEMPLATES[len(TEMPLATES) - held_out_templates :]
        self.fields = ("label",) + (("text",) if captions else ()) + (("image",) if condition_image else ())

    def __len__(self) -> int:
        return self.images.shape[0] * (len(self.train_templates) if self.captions else 1)

    def __getitem__(self, index: int) -> tuple[Tensor, int | dict]:
        template, n = divmod(index, self.images.shape[0])  # item = (template, image): each image under each
        image, label = self.images[n], int(self.labels[n])
        if self.fields == ("label",):
            return image, label
        data = {"label": label}
        if self.captions:
            data["text"] = caption(self.train_templates[template], label)
        if self.condition_image:
            data["image"] = image
        return image, data

    def conditioning(self, labels: Tensor):
        """What asks for the digits ``labels``: the k-th request of a digit gets the k-th held-out template (in
        turn) and, with ``condition_image``, the k-th image of that digit (in turn)."""
        if self.fields == ("label",):
            return labels
        labels = labels.cpu().long()
        seen = torch.zeros(self.num_classes, dtype=torch.long)
        turn = []
        for c in labels.tolist():  # the k-th request of each digit
            turn.append(int(seen[c]))
            seen[c] += 1
        data = {"label": labels}
        if self.captions:
            data["text"] = [caption(self.eval_templates[k % len(self.eval_templates)], c)
                            for c, k in zip(labels.tolist(), turn)]
        if self.condition_image:
            by_class = [(self.labels == c).nonzero()[:, 0] for c in range(self.num_classes)]
            rows = [by_class[c][k % len(by_class[c])] for c, k in zip(labels.tolist(), turn)]
            data["image"] = self.images[torch.stack(rows)] if rows else self.images[:0]
        return data

    def __repr__(self) -> str:
        if self.part != "heldout":
            extra = "".join(f", {k}=True" for k in ("captions", "condition_image") if getattr(self, k))
            return f"DigitsDataset(image_size={self.image_size}, split={self.split}{extra})"
        seen = "seen in training: the run trains on all digits" if self.split == "all" else "never trained on"
        return f"DigitsDataset held-out half ({len(self)} digits, {self.image_size} px; {seen})"

    def heldout(self) -> DigitsDataset:
        """The held-out half of the digits (``halves``): the half the scorer's floor draws from."""
        held = DigitsDataset(self.image_size, captions=self.captions, held_out_templates=len(self.eval_templates),
                             condition_image=self.condition_image)
        keep = halves(held.labels)[1]
        held.images, held.labels, held.split, held.part = held.images[keep], held.labels[keep], self.split, "heldout"
        return held

    def scorer(self):
        """The offline sample score for this dataset: a small classifier trained on real digits."""
        from sandbox.plugins.datasets.digits_classifier import DigitsScorer

        return DigitsScorer(self.image_size)
