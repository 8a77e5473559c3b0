"""The trainable model: the MAR transformer plus the per-token head, and the training loss that joins them.

References:
    MAR sec. 3 (Diffusion Loss as the per-token loss) and official ``MAR.forward`` / ``forward_loss``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from sandbox.errors import UserError
from sandbox.guards import check_rows
from sandbox.kinds import Head, TrainingSplit
from sandbox.mar import MARTransformer


class MAR(nn.Module):
    """What a checkpoint stores: ``transformer`` (tokens -> conditions) and ``head`` (p(token | condition))."""

    def __init__(self, transformer: MARTransformer, head: Head, head_fp32: bool = False):
        super().__init__()
        self.transformer = transformer
        self.head = head
        self.head_fp32 = head_fp32  # run the head in fp32 inside a bf16/fp16 autocast region (train.head_fp32)

    def head_precision(self, like: Tensor):
        """The context of every head call: autocast switched off when ``head_fp32`` is set and an
        autocast region is active (the caller casts the head's inputs with ``.float()``)."""
        if self.head_fp32 and torch.is_autocast_enabled(like.device.type):
            return torch.autocast(like.device.type, enabled=False)
        return nullcontext()

    def forward(self, seq: Tensor, split: TrainingSplit, labels: Tensor, generator: torch.Generator | None = None
                ) -> Tensor:
        """The training loss of one batch: seq (B,L,C) targets, the ordering's split, labels (B,) -> scalar.

        The head only sees positions with loss weight > 0 (the official runs it on
        all L positions and masks the loss afterwards: same value, ~15% more work),
        each repeated ``head_batch_mul`` times with fresh noise (official
        diffusion_batch_mul).
        """
        cfg = self.transformer.config
        B = seq.shape[0]
        drop = torch.rand(B, device=seq.device, generator=generator) < cfg.label_drop_prob  # (B,) label drop for CFG
        has_loss = split.weight > 0  # (B, L)
        # the positions with loss, row-major (= boolean indexing; index_select's backward is ~8x cheaper on the CPU)
        rows = has_loss.reshape(-1).nonzero().squeeze(1)  # (N,)
        target = seq.reshape(-1, seq.shape[-1]).index_select(0, rows)  # (N, C)
        weight = split.weight.reshape(-1)[rows]  # (N,)
        counts = has_loss.sum(1)  # (B,)
        if bool((counts == counts[:1]).all()) and len(rows):  # the usual case: the last decoder block works only where the loss is
            cond = self.transformer(split.inputs, split.visible, labels, drop, query=has_loss)  # (N, D)
        else:
            z = self.transformer(split.inputs, split.visible, labels, drop)  # (B, L, D)
            cond = z.reshape(-1, z.shape[-1]).index_select(0, rows)  # (N, D)
        mul = cfg.head_batch_mul
        with self.head_precision(cond):
            if self.head_fp32:
                target, cond = target.float(), cond.float()
            per_row = self.head.loss(target.repeat(mul, 1), cond.repeat(mul, 1), generator)  # (mul*N,)
        check_rows(self.head, "loss", per_row, (mul * len(rows),))
        weight = weight.repeat(mul).to(per_row.dtype)
        return (per_row * weight).sum() / weight.sum()


def check_compiler(device: torch.device | str) -> None:
    """``torch.compile`` on the CPU builds C++ (inductor's CPU backend): one clear line, before any work, when
    no C++ compiler works, instead of a traceback at the first compiled call."""
    if torch.device(device).type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: let torch.compile report it itself
        return
    try:
        get_cpp_compiler()
    except Exception:
        raise UserError("torch.compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX naming one); "
                        "install one, or run without --compile") from None


def compile_blocks(model: MAR, sampling: bool = True) -> None:
    """``torch.compile`` the repeated blocks in place (transformer blocks, the head's network), not the whole
    model, and (``sampling``) the head's sampling step (``Head.compile_sampling``).

    The whole forward has data-dependent shapes (how many tokens are visible, how many carry loss),
    which would break the graph at every boolean index; the blocks see only dynamic sizes, which
    ``dynamic=True`` handles without recompiling per mask ratio. In place (``Module.compile``), so
    parameter names and checkpoints do not change.
    """
    check_compiler(next(model.parameters()).device)
    for blk in list(model.transformer.encoder_blocks) + list(model.transformer.decoder_blocks):
        blk.compile(dynamic=True)
    net = getattr(model.head, "net", None)
    if isinstance(net, nn.Module):
        for block in getattr(net, "res_blocks", []):
            block.compile(dynamic=True)
    if sampling:
        model.head.compile_sampling()  # the compiler was checked above


def compile_sampling(model: MAR) -> None:
    """The head's sampling steps under ``torch.compile`` (``Head.compile_sampling``)."""
    check_compiler(next(model.parameters()).device)
    model.head.compile_sampling()
