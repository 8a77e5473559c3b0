"""A latent cache written by ``sandbox cache``: trains from stored posterior moments, no encoder pass.

Each item holds the moments of an image and of its horizontal flip; ``augment``
picks one view per row with the trainer's generator (the official random flip),
and the core draws the latent from the moments with the tokenizer
(``Tokenizer.latent_from_moments``), so posterior sampling stays fresh every
epoch. The recipe's tokenizer must be the one that made the cache: it is
checked on a stored probe image. A cache of a captioned dataset also holds the
captions, and what the recipe's condition cached of them (a frozen text
encoder's features): items are then ``(views, {"label", "text", ...})``, and a
recipe's condition must give the same cached features as the one that made it
(checked on its example data).

References:
    MAR official util/loader.py CachedFolder (moments / moments_flip chosen at random) and engine_mar.py.
"""
from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import Tensor

from sandbox.core.contracts import Condition, Dataset, Tokenizer
from sandbox.errors import UserError
from sandbox.lab.latent_cache import LatentCache, condition_probe, probe_images, write_cache


class CachedDataset(Dataset):
    """Tokenizer moments of each image and its flip, from `sandbox cache` (memory-mapped shards); random view."""

    provides = "moments"

    @classmethod
    def contract_args(cls) -> dict:  # a tiny cache of the image-folder example, with raw-pixel "moments"
        from sandbox.plugins.datasets.imagefolder import (
            ImageFolderDataset,
            write_example_folder,
        )
        from sandbox.plugins.tokenizers.pixels import PixelTokenizer

        root = tempfile.mkdtemp(prefix="cached-contract-")
        images = ImageFolderDataset(str(write_example_folder(f"{root}/images", corrupt=False)), image_size=8)
        write_cache(images, PixelTokenizer(1), f"{root}/cache", recipe={}, shard_size=3, progress=False)
        return {"path": f"{root}/cache"}

    def __init__(
        self,
        path: str,  # the --out directory of `sandbox cache`
        random_flip: bool = True,  # the official augmentation: the flipped view with probability 1/2
    ):
        self.cache = LatentCache(path)
        self.random_flip = random_flip
        self.image_size = int(self.cache.index["image_size"])
        self.num_classes = int(self.cache.index["num_classes"])
        self.fields = self.cache.fields

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[Tensor, int | dict]:
        return self.cache[index]  # (2, P, h, w): the image's moments, then its flip's; the label or the fields

    def conditioning(self, labels: Tensor):
        """With captions: the k-th request of a class gets the k-th stored caption of that class (in turn)."""
        if self.cache.texts is None:
            return labels
        labels = labels.cpu().long()
        stored = torch.from_numpy(np.array(self.cache.labels))  # a copy: the memory map is read-only
        texts, seen = [], {}
        for c in labels.tolist():
            rows = (stored == c).nonzero()[:, 0]
            k = seen[c] = seen.get(c, -1) + 1
            texts.append(self.cache.texts[int(rows[k % len(rows)])] if len(rows) else "")
        return {"label": labels, "text": texts}

    def check_condition(self, condition: Condition) -> None:
        """The condition's field is stored; features the cache holds for it came from the same (frozen) encoder."""
        super().check_condition(condition)
        stored = self.cache.condition_probe()
        if not stored:
            return
        now = condition_probe(condition, self.cache.index["dtype"])
        if not set(stored) & set(now):  # cached by another kind of condition: unused here
            return
        same = set(stored) == set(now) and all(
            stored[k].shape == now[k].shape and np.allclose(stored[k].astype(np.float32), now[k].astype(np.float32),
                                                            atol=1e-2 * max(float(np.abs(stored[k]).max()), 1e-6))
            for k in stored)
        if not same:
            raise UserError(f"latent cache {self.cache.root} holds condition features made by another encoder than "
                            f"condition {type(condition).__name__}'s ({', '.join(sorted(stored))} of a probe differ); "
                            "use the condition that made it or rebuild the cache")

    def augment(self, views: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B = views.shape[0]  # views: (B, 2, P, h, w)
        if self.random_flip:
            pick = (torch.rand(B, device=views.device, generator=generator) < 0.5).long()  # (B,) 1 = flipped
        else:
            pick = torch.zeros(B, dtype=torch.long, device=views.device)
        return views[torch.arange(B, device=views.device), pick]  # (B, P, h, w)

    def latents(self, items: Tensor, tokenizer: Tokenizer, generator: torch.Generator | None = None,
                sample: bool = True) -> Tensor:
        """Latents from the stored moments of each row's view (drawn, or their mean): no encoder pass."""
        return tokenizer.latent_from_moments(self.augment(items, generator), generator, sample=sample)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        made_by = self.cache.index["recipe"].get("tokenizer", {})
        name = made_by.get("class_path", "?") if isinstance(made_by, dict) else "?"
        shape = (tokenizer.moment_channels, self.image_size // tokenizer.stride, self.image_size // tokenizer.stride)
        if tuple(self.cache.moment_shape) != shape:
            raise UserError(f"latent cache {self.cache.root} holds moments of shape {tuple(self.cache.moment_shape)} "
                            f"(made with {name}) but tokenizer {type(tokenizer).__name__} gives {shape}; "
                            "use the tokenizer that made the cache or rebuild it")
        # same architecture is not enough: the weights must match too (a fixed random image's moments)
        stored = torch.from_numpy(self.cache.probe())
        device = next(iter(tokenizer.parameters()), stored).device
        with torch.no_grad():
            now = tokenizer.moments(probe_images(self.image_size).to(device)).float().cpu()
        err = (now - stored).abs().max().item() / max(stored.abs().max().item(), 1e-6)
        if err > 1e-2:  # a GPU-made cache differs from a CPU check by TF32 rounding, ~1e-3; other weights by ~1
            raise UserError(f"latent cache {self.cache.root} was made by a different tokenizer ({name}; relative "
                            f"probe difference {err:.2g}); use the tokenizer that made it or rebuild the cache")
