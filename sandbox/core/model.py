"""The trainable model: the MAR transformer plus the per-token head, and the training loss that joins them.

References:
    MAR sec. 3 (Diffusion Loss as the per-token loss) and official ``MAR.forward`` / ``forward_loss``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from sandbox.core.checks import check_rows
from sandbox.core.contracts import Head, TrainingSplit
from sandbox.core.transformer import MARTransformer


class MAR(nn.Module):
    """What a checkpoint stores: ``transformer`` (tokens -> conditions) and ``head`` (p(token | condition))."""

    def __init__(self, transformer: MARTransformer, head: Head, head_fp32: bool = False):
        super().__init__()
        self.transformer = transformer
        self.head = head
        self.head_fp32 = head_fp32  # run the head in fp32 inside a bf16/fp16 autocast region (train.head_fp32)

    def head_precision(self, like: Tensor):
        """The context of a head call: autocast switched off when ``head_fp32`` is set and an autocast
        region is active."""
        if self.head_fp32 and torch.is_autocast_enabled(like.device.type):
            return torch.autocast(like.device.type, enabled=False)
        return nullcontext()

    def call_head(self, method: str, *args, **kwargs):
        """``head.<method>(*args, **kwargs)`` at the head's precision: in fp32 (autocast off, floating-point
        tensor arguments cast) when ``head_fp32`` is set. Every head call of the cores goes through here."""
        with self.head_precision(args[0]):
            if self.head_fp32:
                args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
            return getattr(self.head, method)(*args, **kwargs)

    def forward(self, seq: Tensor, split: TrainingSplit, labels: Tensor, generator: torch.Generator | None = None
                ) -> Tensor:
        """The training loss of one batch: seq (B,L,C) targets, the ordering's split, labels (B,) -> scalar.

        The head only sees positions with loss weight > 0 (the official runs it on
        all L positions and masks the loss afterwards: the same value), each
        repeated ``head_batch_mul`` times with fresh noise (official
        diffusion_batch_mul).
        """
        cfg = self.transformer.config
        B = seq.shape[0]
        drop = torch.rand(B, device=seq.device, generator=generator) < cfg.label_drop_prob  # (B,) label drop for CFG
        has_loss = split.weight > 0  # (B, L)
        # the positions with loss, row-major (= boolean indexing, whose backward is slower than index_select's)
        rows = has_loss.reshape(-1).nonzero().squeeze(1)  # (N,)
        target = seq.reshape(-1, seq.shape[-1]).index_select(0, rows)  # (N, C)
        weight = split.weight.reshape(-1)[rows]  # (N,)
        counts = has_loss.sum(1)  # (B,)
        if bool((counts == counts[:1]).all()) and len(rows):  # the usual case: ask for the loss rows only
            cond = self.transformer(split.inputs, split.visible, labels, drop, query=has_loss)  # (N, D)
        else:
            z = self.transformer(split.inputs, split.visible, labels, drop)  # (B, L, D)
            cond = z.reshape(-1, z.shape[-1]).index_select(0, rows)  # (N, D)
        mul = cfg.head_batch_mul
        per_row = self.call_head("loss", target.repeat(mul, 1), cond.repeat(mul, 1), generator)  # (mul*N,)
        check_rows(self.head, "loss", per_row, (mul * len(rows),))
        weight = weight.repeat(mul).to(per_row.dtype)
        return (per_row * weight).sum() / weight.sum()
