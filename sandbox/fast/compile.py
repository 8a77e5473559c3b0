"""``torch.compile`` for a built model: the repeated blocks one by one, and the head's sampling steps.

The whole forward has data-dependent shapes (how many tokens are visible, how many carry loss), which would
break the graph at every boolean index; the blocks see only dynamic sizes, which ``dynamic=True`` handles
without recompiling per mask ratio. In place (``Module.compile``), so parameter names and checkpoints do not
change. Every module that declares ``repeated_blocks()`` (the transformer, a head) says what is compiled.
Numbers (compile time, speed) in docs/performance.md ("Compiled").
"""
from __future__ import annotations

import torch
from torch import nn

from sandbox.errors import UserError


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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compile_blocks(model: nn.Module, sampling: bool = True) -> None:
    """Compile every ``repeated_blocks()`` of ``model``'s modules in place and (``sampling``) the head's sampling
    steps (``Head.compile_sampling``)."""
    check_compiler(_device(model))
    for module in list(model.modules()):
        if callable(getattr(module, "repeated_blocks", None)):
            for block in module.repeated_blocks():
                block.compile(dynamic=True)
    if sampling:
        compile_sampling(model, checked=True)


def compile_sampling(model: nn.Module, checked: bool = False) -> None:
    """The head's sampling steps under ``torch.compile`` (``Head.compile_sampling``)."""
    if not checked:
        check_compiler(_device(model))
    model.head.compile_sampling()
