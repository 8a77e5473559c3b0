"""The trainable model: the condition, the backbone (MAR's transformer by default) and the per-token head, and
the training loss that joins them.

References:
    MAR sec. 3 (Diffusion Loss as the per-token loss) and official ``MAR.forward`` / ``forward_loss``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from sandbox.core.checks import check_rows
from sandbox.core.contracts import Backbone, Condition, ConditionTokens, Head, TrainingSplit
from sandbox.core.transformer import MARConfig

# checkpoint keys of 0.1-0.2 (before the condition and backbone kinds) -> today's: the class embedding and the
# fake latent were the transformer's, and the transformer was `transformer`
_RENAMED = (("transformer.class_emb.", "condition.class_emb."), ("transformer.fake_latent", "condition.fake_latent"),
            ("transformer.", "backbone."))


def upgrade_key(name: str) -> str:
    """A parameter name as a 0.1-0.2 checkpoint stored it -> its name today."""
    for old, new in _RENAMED:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class MAR(nn.Module):
    """What a checkpoint stores: ``condition`` (class / caption / image -> condition tokens), ``backbone`` (tokens
    -> a condition per position) and ``head`` (p(token | condition)); ``config`` holds the model-wide settings
    (label drop, head_batch_mul)."""

    def __init__(self, condition: Condition, backbone: Backbone, head: Head, config: MARConfig,
                 head_fp32: bool = False):
        super().__init__()
        self.condition = condition
        self.backbone = backbone
        self.head = head
        self.config = config
        self.head_fp32 = head_fp32  # run the head in fp32 inside a bf16/fp16 autocast region (train.head_fp32)
        self._register_load_state_dict_pre_hook(_upgrade_state_dict)

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

    def conditions(self, data, batch: int, drop: Tensor | None = None, guided: bool = False) -> ConditionTokens:
        """The condition tokens of ``batch`` rows of conditioning ``data`` (None: unconditional); with ``guided``,
        2 x batch rows: the conditional ones, then the same data with the null condition (classifier-free
        guidance runs both branches in one batch)."""
        if data is None:
            return self.condition(None, batch=batch * (2 if guided else 1))
        if guided:
            data, drop = repeat_data(data, 2), torch.arange(2 * batch, device=self.device) >= batch
        return self.condition(data, drop)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, seq: Tensor, split: TrainingSplit, labels, generator: torch.Generator | None = None
                ) -> Tensor:
        """The training loss of one batch: seq (B,L,C) targets, the split, the conditioning data (labels (B,) or
        a dict of fields) -> scalar.

        The head only sees positions with loss weight > 0 (the official runs it on
        all L positions and masks the loss afterwards: the same value), each
        repeated ``head_batch_mul`` times with fresh noise (official
        diffusion_batch_mul).
        """
        cfg = self.config
        B = seq.shape[0]
        drop = torch.rand(B, device=seq.device, generator=generator) < cfg.label_drop_prob  # (B,) label drop for CFG
        cond = self.condition(labels, drop)  # B rows of condition tokens
        has_loss = split.weight > 0  # (B, L)
        # the positions with loss, row-major (= boolean indexing, whose backward is slower than index_select's)
        rows = has_loss.reshape(-1).nonzero().squeeze(1)  # (N,)
        target = seq.reshape(-1, seq.shape[-1]).index_select(0, rows)  # (N, C)
        weight = split.weight.reshape(-1)[rows]  # (N,)
        counts = has_loss.sum(1)  # (B,)
        if bool((counts == counts[:1]).all()) and len(rows):  # the usual case: ask for the loss rows only
            z = self.backbone(split.inputs, split.visible, cond, query=has_loss, order=split.order)  # (N, D)
        else:
            z = self.backbone(split.inputs, split.visible, cond, order=split.order)  # (B, L, D)
            z = z.reshape(-1, z.shape[-1]).index_select(0, rows)  # (N, D)
        mul = cfg.head_batch_mul
        per_row = self.call_head("loss", target.repeat(mul, 1), z.repeat(mul, 1), generator)  # (mul*N,)
        check_rows(self.head, "loss", per_row, (mul * len(rows),))
        weight = weight.repeat(mul).to(per_row.dtype)
        return (per_row * weight).sum() / weight.sum()


def repeat_data(data, times: int):
    """Conditioning data (a (B,) tensor, a list, or a dict of them) repeated ``times`` times along the batch."""
    if isinstance(data, dict):
        return {k: repeat_data(v, times) for k, v in data.items()}
    if isinstance(data, Tensor):
        return torch.cat([data] * times)
    return list(data) * times


def _upgrade_state_dict(state_dict: dict, prefix: str, *args) -> None:
    """Load-time rename of a 0.1-0.2 checkpoint's keys (``upgrade_key``), in place."""
    for name in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + upgrade_key(name[len(prefix):])
        if new != name:
            state_dict[new] = state_dict.pop(name)
