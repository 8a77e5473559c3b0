"""Cheap checks the cores make on plugins: a plugin that breaks its kind's contract stops the run with one
error line that names it (exit code 2), not a traceback deep inside the core, and never silently wrong images.

Two moments: when a plugin class registers (``check_class``: the methods its kind needs are implemented, with
at least the base's arguments, and the constructor takes the arguments the core injects first) and while the
cores run (``check_*``: shapes, which cost nothing, and one count per sampled batch). The full contract
(determinism, randomness from the generator, round trips, ...) is the contract kit's job:
``sandbox.testing.check_plugin`` (docs/writing-plugins.md).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from sandbox.errors import UserError

# what each kind must implement itself; the base class only raises NotImplementedError for these
REQUIRED = {
    "tokenizer": ("encode", "decode"),
    "ordering": ("training_split", "sampling_plan"),
    "head": ("loss", "sample"),
    "dataset": ("__len__", "__getitem__"),
}
# how many leading constructor arguments the core injects, per kind (sandbox.kinds documents them)
INJECTED_ARGS = {"tokenizer": 0, "ordering": 1, "head": 2, "dataset": 0}


def a(word: str) -> str:
    """'a head', 'an ordering'."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def broken(plugin, kind: str, problem: str) -> UserError:
    """The error for a plugin (class or instance) that breaks its kind's contract."""
    from sandbox.registry import source_of

    cls = plugin if isinstance(plugin, type) else type(plugin)
    return UserError(f"{kind} {cls.__name__} ({source_of(cls)}) {problem}; sandbox.testing.check_plugin("
                     f"{cls.__name__}) checks the whole contract (docs/writing-plugins.md)")


# --------------------------------------------------------------------------------------
# When a class registers
# --------------------------------------------------------------------------------------
def _positional(fn) -> tuple[list[inspect.Parameter], bool]:
    """(positional parameters after self, whether it takes *args)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    star = any(p.kind is p.VAR_POSITIONAL for p in params)
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)], star


def check_class(kind: str, cls: type, base: type) -> None:
    """A plugin class implements what its kind needs, callable the way the core calls it."""
    for name in REQUIRED[kind]:
        mine, theirs = getattr(cls, name), getattr(base, name)
        if mine is theirs:
            raise broken(cls, kind, f"does not implement {name}(); {a(kind)} implements "
                                    f"{' and '.join(REQUIRED[kind])} (or set __abstract_plugin__ = True on a "
                                    "base class that is not a recipe choice)")
        need, _ = _positional(theirs)
        have, star = _positional(mine)
        if not star and len(have) < len(need):
            raise broken(cls, kind, f"defines {name}{inspect.signature(mine)}, but the core calls it as "
                                    f"{base.__name__}.{name}{inspect.signature(theirs)}")
    n = INJECTED_ARGS[kind]
    if n:
        injected = list(inspect.signature(base.__init__).parameters)[1 : 1 + n]
        params, star = _positional(cls.__init__)
        if not star and (len(params) < n or any(p.default is not p.empty for p in params[:n])):
            raise broken(cls, kind, f"has __init__{inspect.signature(cls.__init__)}; the core builds {a(kind)} "
                                    f"as {cls.__name__}({', '.join(injected)}, **init_args), so __init__ must "
                                    f"take {', '.join(injected)} first, without defaults")


# --------------------------------------------------------------------------------------
# While the cores run
# --------------------------------------------------------------------------------------
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_split(ordering, split, seq: Tensor) -> None:
    """``training_split(seq (B, L, C))`` gave inputs (B, L, C), visible (B, L) bool and weight (B, L)."""
    B, L, C = seq.shape
    for what, x, shape, dtype in (("inputs", split.inputs, (B, L, C), None), ("visible", split.visible, (B, L), torch.bool),
                                  ("weight", split.weight, (B, L), None)):
        if not isinstance(x, Tensor) or tuple(x.shape) != shape or (dtype is not None and x.dtype != dtype):
            raise broken(ordering, "ordering", f"training_split gave {what} {_shape(x)}"
                                               f"{'' if not isinstance(x, Tensor) else ' ' + str(x.dtype)}; "
                                               f"expected {shape}{' bool' if dtype is torch.bool else ''}")


def check_images(dataset, images: Tensor, size: int) -> None:
    """A batch of a dataset that provides images is (B, 3, H, W) at the recipe's image size."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise broken(dataset, "dataset", f"gave a batch of images {_shape(images)}; expected (B, 3, {size}, {size}): "
                                         "RGB in [-1, 1] at its image_size")


def check_labels(dataset, labels: Tensor) -> None:
    """A batch's labels (B,) are integers in [0, num_classes) (checked on the CPU, before they move)."""
    k = int(dataset.num_classes)
    bad = labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool
    if not bad and len(labels):
        low, high = int(labels.min()), int(labels.max())
        bad = low < 0 or high >= k
    if bad:
        shown = labels.flatten()[:8].tolist() if isinstance(labels, Tensor) else labels
        raise broken(dataset, "dataset", f"gave labels {shown} ({labels.dtype}, shape {tuple(labels.shape)}); "
                                         f"expected integer class indices in [0, num_classes={k})")


def check_rows(head, what: str, out, shape: tuple) -> None:
    """A head's ``loss`` (N,) or ``sample`` (N, C) returned one row per input row."""
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        letters = "(N,): the per-row loss" if len(shape) == 1 else "(N, C): one token per row"
        raise broken(head, "head", f"{what} returned {_shape(out)}; expected {letters}, here {shape}")


def check_step(ordering, step, batch: int, length: int) -> None:
    """A sampling step predicts a (B, L) bool mask."""
    p = step.predict
    if not isinstance(p, Tensor) or tuple(p.shape) != (batch, length) or p.dtype != torch.bool:
        raise broken(ordering, "ordering", f"sampling_plan gave a step whose predict is {_shape(p)} "
                                           f"{getattr(p, 'dtype', '')}; expected ({batch}, {length}) bool")


def check_plan_covered(ordering, times: Tensor) -> None:
    """After sampling: ``times`` (B, L), how often each position was predicted, is 1 everywhere (one sync)."""
    never, twice = int((times == 0).sum()), int((times > 1).sum())
    if never or twice:
        raise broken(ordering, "ordering", f"sampling_plan left {never} (image, position) pairs never predicted "
                                           f"and predicted {twice} more than once; a plan predicts every "
                                           "position exactly once")


def check_visible_counts(nonzero_rows: int, batch: int, per_row: int) -> None:
    """Every row of a visible mask shows the same number of positions (the encoder packs them as (B, n))."""
    if nonzero_rows != batch * per_row:
        raise UserError(f"the ordering's visible mask shows different numbers of positions in different rows "
                        f"({nonzero_rows} in {batch} rows, {per_row} in the first); training_split and "
                        "step_inputs must show the same number in every row (sandbox.testing.check_ordering "
                        "names the step)")
