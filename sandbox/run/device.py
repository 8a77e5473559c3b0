"""Where a run computes and at which precision."""
from __future__ import annotations

import torch

from sandbox.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU. Anything else must be a device this machine has: a name torch
    does not know, a device without storage (``meta``) or a missing accelerator is one clear error, raised before
    a command writes anything."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != _accelerator():
        have = f"this machine has cpu and {_accelerator()}" if _accelerator() else "this machine has only the cpu"
        raise UserError(f"device {name!r} cannot run a model here ({have}); use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _accelerator() -> str | None:
    """The accelerator this machine has (cuda, mps, xpu, ...) or None."""
    if torch.cuda.is_available():
        return "cuda"
    current = getattr(torch, "accelerator", None)  # torch >= 2.6 names any kind of accelerator
    if current is not None and current.is_available():
        return current.current_accelerator().type
    return None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
