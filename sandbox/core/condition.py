"""MAR's class condition: a learned embedding per class, and a learned "fake latent" for no class.

Classifier-free guidance needs an unconditional model: training replaces a row's class embedding with the fake
latent with probability ``model.label_drop_prob`` (0.1), and sampling runs both. MAR repeats the one condition
token over its 64 buffer tokens (sandbox/core/transformer.py).

Parameter names follow the official implementation (``class_emb``, ``fake_latent``), so its checkpoints load.

References:
    MAR sec. 5.1 and official models/mar.py (class_emb, fake_latent, label_drop_prob 0.1);
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sandbox.core.contracts import Condition, ConditionTokens


class ClassCondition(Condition):
    """Class label -> one learned token (MAR's class embedding); the learned fake latent is the null condition."""

    field = "label"
    max_tokens = 1

    def __init__(self, width: int, num_classes: int):
        super().__init__(width, num_classes)
        self.class_emb = nn.Embedding(num_classes, width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # official MAR init: N(0, 0.02) for both
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.fake_latent, std=0.02)

    def forward(self, data, drop: Tensor | None = None, batch: int | None = None) -> ConditionTokens:
        """labels (B,) -> one token per row (B, 1, W); rows where ``drop`` is True (or all, without labels) get
        the fake latent."""
        if data is None:
            return ConditionTokens(self.fake_latent.expand(batch, -1)[:, None])  # (B, 1, W)
        cls = self.class_emb(self.select(data))  # (B, W)
        if drop is not None:
            cls = torch.where(drop[:, None], self.fake_latent.to(cls.dtype), cls)
        return ConditionTokens(cls[:, None])  # (B, 1, W)
