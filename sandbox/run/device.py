"""Where a run computes and at which precision."""
from __future__ import annotations

import torch

from sandbox.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; a CUDA device without CUDA is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available; use --train.device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
