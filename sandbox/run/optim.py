"""The optimizer and its schedules: AdamW with the official no-decay groups, the lr (linear scaling, warmup,
constant or cosine), and the EMA of the weights.

References:
    MAR official main_mar.py (param groups: no weight decay on biases, 1-D parameters and the head; lr =
    blr x global batch / 256; 100 warmup epochs then constant), engine_mar.py (EMA after each step);
    Goyal et al. 2017, "Accurate, Large Minibatch SGD" (linear lr scaling).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sandbox.config.schema import TrainConfig


def decays(name: str, ndim: int) -> bool:
    """Official MAR groups: no weight decay on biases, 1-D parameters (norms, embeddings' vectors) and the head."""
    return not (ndim <= 1 or name.endswith(".bias") or name.startswith("head.") or ".head." in name)


def grouped_names(named) -> list[str]:
    """Parameter names (from (name, tensor) pairs) in the optimizer's index order: the decay group, then the rest."""
    named = list(named)
    return [n for n, p in named if decays(n, p.ndim)] + [n for n, p in named if not decays(n, p.ndim)]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups (``decays``) over the trainable parameters, in ``grouped_names`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(n, p.ndim)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p.ndim)], "weight_decay": 0.0}]


def optimizer_names(model: nn.Module) -> list[str]:
    """The names of ``param_groups``' parameters in the optimizer's index order (what a checkpoint stores, so its
    optimizer state maps back by name whatever the module layout)."""
    return grouped_names((n, p) for n, p in model.named_parameters() if p.requires_grad)


def remap_optimizer_state(state: dict, saved: list[str], names: list[str]) -> dict:
    """An optimizer ``state_dict`` whose parameters were ``saved`` (names in index order) -> the same state for a
    model whose parameters are ``names``; ValueError when the two do not name the same parameters."""
    if sorted(saved) != sorted(names):
        missing, extra = sorted(set(names) - set(saved))[:3], sorted(set(saved) - set(names))[:3]
        raise ValueError(f"the optimizer state does not fit: missing {missing}, not in the model {extra}")
    index = {name: i for i, name in enumerate(names)}
    moved = {index[saved[i]]: v for i, v in state["state"].items()}
    groups, at = [], 0
    for group in state["param_groups"]:  # the same group sizes: the same names fall into the same groups
        groups.append({**group, "params": list(range(at, at + len(group["params"])))})
        at += len(group["params"])
    return {"state": moved, "param_groups": groups}


def make_adamw(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel over all parameters) on CPU and CUDA: the same update
    within float rounding (~1e-8), several times faster on the CPU, where the default loops over the tensors
    (docs/performance.md)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def base_lr(tc: TrainConfig, world_size: int = 1) -> float:
    """lr = blr * global batch / 256 unless an absolute lr is given."""
    if tc.lr is not None:
        return tc.lr
    return tc.blr * tc.batch_size * tc.grad_accum * world_size / 256


def lr_at(step: int, tc: TrainConfig, peak: float) -> float:
    """Linear warmup to ``peak``, then constant (official) or cosine down to ``min_lr``."""
    if step < tc.warmup_steps:
        return peak * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return peak
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.min_lr + (peak - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def ema_decay_at(step: int, tc: TrainConfig) -> float:
    return min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
