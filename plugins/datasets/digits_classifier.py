"""A small CNN trained on the real digits, used to score generated digits offline.

Reports the classifier's accuracy on class-conditional samples (does the image
show the asked digit?) and the Frechet distance between sample and real-digit
features of its penultimate layer (are samples as varied and clean as real
ones?), next to the real-vs-real floor. Trained once per image size with a
fixed seed (~20 seconds on a CPU) and cached under ``$SANDBOX_CACHE``
(default ``~/.cache/mar-sandbox``).

The floor is comparable to the score: a Frechet distance is biased upwards by
the finite number of images on each side, so the floor is measured the way a
sample set is -- the same number of images, with the same labels, against the
same reference. The real digits are split once (seeded, per class) into a
reference half, which every score is measured against, and a held-out half,
from which the floor draws "perfect samples" (without replacement while a
class has enough, so a 1,000-image floor repeats as few digits as possible).

References:
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule..." (FID formula), NeurIPS 2017;
    Chong & Forsyth, "Effectively Unbiased FID and Inception Score..." CVPR 2020 (FID's bias depends on N).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.errors import UserError
from sandbox.plugins.datasets.digits import halves, load_digits_tensor
from sandbox.run.checkpoints import load_cached
from sandbox.weights import cache_dir

SEED = 0  # fixes the split, the initialisation and the data order: one classifier per image size
HOLDOUT = 0.2  # fraction of real digits kept out of training to report the classifier's own accuracy
EPOCHS = 20  # one-cycle schedule; measured 99.7% held-out accuracy on 16 px digits (~20 s on 2 CPU cores)
MAX_SHIFT = 2  # random translation of up to 2 px (at 16 px): digits vary in position, samples will too
FLOOR_DRAWS = 3  # the floor is a mean over 3 draws of real "samples": its spread is ~5% with 1,000 images
VERSION = 2  # bump when the network or its training changes: the cache key includes it


class DigitsNet(nn.Module):
    """(B,3,S,S) in [-1,1] -> logits (B,10); ``features`` gives the 128-dim penultimate layer."""

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveMaxPool2d(4), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 16, 128), nn.ReLU(),
        )
        self.fc = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.mean(dim=1, keepdim=True))  # (B, 128); grey input: the digits are greyscale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))  # (B, 10)


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate each image by up to MAX_SHIFT px (scaled with size), filling with background (-1)."""
    B, _, H, W = x.shape
    s = max(1, MAX_SHIFT * H // 16)
    dy, dx = torch.randint(0, 2 * s + 1, (2, B), generator=g)
    padded = F.pad(x, (s, s, s, s), value=-1.0)  # (B, C, H+2s, W+2s)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(-1, x.shape[1], -1, W + 2 * s)
    out = padded.gather(2, rows)  # (B, C, H, W+2s)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(-1, x.shape[1], H, -1)
    return out.gather(3, cols)  # (B, C, H, W)


def train_classifier(image_size: int) -> tuple[DigitsNet, float]:
    """Train on 80% of the digits; return the net and its accuracy on the held-out 20%."""
    g = torch.Generator().manual_seed(SEED)
    x, y = load_digits_tensor(image_size)
    perm = torch.randperm(len(x), generator=g)
    n_val = int(len(x) * HOLDOUT)
    val, tr = perm[:n_val], perm[n_val:]
    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the init and dropout draw from the global RNG; keep it seeded and isolated
        net = DigitsNet()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        total = EPOCHS * math.ceil(len(tr) / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
        for _ in range(EPOCHS):
            net.train()
            order = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[val]).argmax(1) == y[val]).float().mean().item()
    return net, acc


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between two feature sets (N,F) (float64)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    # Tr((S1 S2)^1/2) = sum of sqrt of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD)
    e1, v1 = torch.linalg.eigh(s1)
    r1 = (v1 * e1.clamp(min=0).sqrt()) @ v1.T
    ev = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * ev.sqrt().sum())


class DigitsScorer:
    """Scores generated digits with a classifier trained on real ones (cached per image size)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        path = cache_dir() / f"digits_classifier_v{VERSION}_{image_size}px_seed{SEED}.pt"
        state = load_cached(path)  # a corrupt cache is rebuilt, never trusted; a planted pickle is refused
        if not (isinstance(state, dict) and "net" in state and "real_accuracy" in state):
            state = None
        self.net = DigitsNet()
        if state is None:
            net, acc = train_classifier(image_size)
            state = {"net": net.state_dict(), "real_accuracy": acc}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.real_accuracy = float(state["real_accuracy"])
        self.real_images, self.real_labels = load_digits_tensor(image_size)
        self.real_feats, _ = self.features(self.real_images)  # (1797, 128)
        self.ref, self.held = self._split()

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = torch.cat([self.net.features(b) for b in images.float().cpu().split(256)])
        return feats, self.net.fc(feats)

    def _split(self) -> tuple[Tensor, Tensor]:
        """Indices of the reference half and the held-out half of the real digits (seeded, split per class)."""
        return halves(self.real_labels, SEED)

    def real_like(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Indices of held-out real digits with the given labels: a "perfect sample set" of the same size
        and classes (each class's digits in a random order, repeated only when more are needed)."""
        labels = labels.cpu()
        out = torch.empty(len(labels), dtype=torch.long)
        held_labels = self.real_labels[self.held]
        for c in labels.unique().tolist():
            pool = self.held[held_labels == c]
            want = (labels == c).nonzero()[:, 0]
            reps = -(-len(want) // len(pool))  # ceil
            order = torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(reps)])
            out[want] = order[: len(want)]
        return out

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """images (N,3,S,S) in [-1,1] (resized if needed), labels (N,) -> accuracy, FD and the real floor."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="area")
        labels = labels.cpu().long()
        if len(images) < 2:
            raise UserError("the digits score (a Frechet distance) needs at least 2 images")
        feats, logits = self.features(images.clamp(-1, 1))
        reference = self.real_feats[self.ref]
        g = torch.Generator().manual_seed(SEED)
        floors = [frechet_distance(self.real_feats[self.real_like(labels, g)], reference) for _ in range(FLOOR_DRAWS)]
        return {
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "frechet_distance": frechet_distance(feats, reference),
            "real_accuracy": self.real_accuracy,
            "real_frechet_floor": sum(floors) / len(floors),
            "num_images": int(len(images)),
            "num_reference": int(len(self.ref)),
        }
