"""Cheap checks the cores make on plugins: a plugin that breaks its kind's contract stops the run with one
error line that names it (exit code 2), not a traceback deep inside the core, and never silently wrong images.

Two moments: when a recipe names a plugin class (``check_class``: the methods its kind needs are implemented,
callable the way the core calls them, and the constructor takes the arguments the core injects first) and while
the cores run (``check_*``: shapes, which cost nothing, and one count per sampled batch). The full contract
(determinism, randomness from the generator, round trips, ...) is the contract kit's job:
``sandbox.testing.check_plugin`` (docs/writing-plugins.md).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from sandbox.errors import UserError

# what each kind must implement itself (the base class only raises NotImplementedError), and how the core
# calls it: (positional arguments after self, keyword arguments)
REQUIRED = {
    "tokenizer": {"encode": (2, ("sample",)), "decode": (1, ())},
    "ordering": {"training_split": (2, ()), "sampling_plan": (4, ())},
    "condition": {"forward": (2, ("batch",))},
    "backbone": {"forward": (3, ("query", "order"))},
    "head": {"loss": (3, ()), "sample": (5, ())},
    "dataset": {"__len__": (0, ()), "__getitem__": (1, ())},
}
# how many leading constructor arguments the core injects, per kind (sandbox.core.contracts documents them)
INJECTED_ARGS = {"tokenizer": 0, "ordering": 1, "condition": 2, "backbone": 4, "head": 2, "dataset": 0}


def with_article(word: str) -> str:
    """'a head', 'an ordering'."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def broken(plugin, kind: str, problem: str) -> UserError:
    """The error for a plugin (class or instance) that breaks its kind's contract."""
    from sandbox.config.registry import source_of

    cls = plugin if isinstance(plugin, type) else type(plugin)
    return UserError(f"{kind} {cls.__name__} ({source_of(cls)}) {problem}; sandbox.testing.check_plugin("
                     f"{cls.__name__}) checks the whole contract (docs/writing-plugins.md)")


# --------------------------------------------------------------------------------------
# When a recipe names a class
# --------------------------------------------------------------------------------------
def _plain(fn) -> str:
    """A signature without annotations: ``loss(self, target, cond, generator=None)``."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return f"{fn.__name__}{sig.replace(parameters=params, return_annotation=sig.empty)}"


def _accepts(fn, positional: int, keywords=()) -> bool:
    """Whether ``fn`` (a function defined on a class: self first) takes the call the core makes."""
    try:
        inspect.signature(fn).bind(None, *[None] * positional, **{k: None for k in keywords})
    except TypeError:
        return False
    return True


def check_class(kind: str, cls: type, base: type) -> None:
    """A plugin class a recipe names implements what its kind needs, callable the way the core calls it."""
    for name, (positional, keywords) in REQUIRED[kind].items():
        mine = getattr(cls, name)
        if mine is getattr(base, name):
            raise broken(cls, kind, f"does not implement {name}(); {with_article(kind)} implements "
                                    f"{' and '.join(REQUIRED[kind])}")
        if not _accepts(mine, positional, keywords):
            raise broken(cls, kind, f"defines {_plain(mine)}, which cannot take the core's call; keep the "
                                    f"arguments of {base.__name__}.{_plain(getattr(base, name))}")
    n = INJECTED_ARGS[kind]
    if n:
        injected = list(inspect.signature(base.__init__).parameters)[1 : 1 + n]
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        # the core passes them positionally: a first argument of another name with a default (say
        # `ratio=0.5`) would silently receive the grid
        takes_them = _accepts(cls.__init__, n) and all(
            p.kind is p.VAR_POSITIONAL or p.default is p.empty or p.name == want
            for p, want in zip(params[:n], injected))
        if not takes_them:
            raise broken(cls, kind, f"has {_plain(cls.__init__)}; the core builds {with_article(kind)} as "
                                    f"{cls.__name__}({', '.join(injected)}, **init_args), so __init__ must take "
                                    f"{', '.join(injected)} first")


# --------------------------------------------------------------------------------------
# While the cores run
# --------------------------------------------------------------------------------------
def shape_of(x) -> str:
    """'(2, 3)' for a tensor, else the type's name."""
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_split(ordering, split, seq: Tensor) -> None:
    """``training_split(seq (B, L, C))`` gave inputs (B, L, C), visible (B, L) bool and weight (B, L)."""
    B, L, C = seq.shape
    expected = (("inputs", split.inputs, (B, L, C), None), ("visible", split.visible, (B, L), torch.bool),
                ("weight", split.weight, (B, L), None))
    for what, x, shape, dtype in expected:
        if not isinstance(x, Tensor) or tuple(x.shape) != shape or (dtype is not None and x.dtype != dtype):
            raise broken(ordering, "ordering", f"training_split gave {what} {shape_of(x)}"
                                               f"{'' if not isinstance(x, Tensor) else ' ' + str(x.dtype)}; "
                                               f"expected {shape}{' bool' if dtype is torch.bool else ''}")


def check_images(dataset, images: Tensor, size: int) -> None:
    """A batch of a dataset that provides images is (B, 3, H, W) at the recipe's image size."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise broken(dataset, "dataset", f"gave a batch of images {shape_of(images)}; expected "
                                         f"(B, 3, {size}, {size}): RGB in [-1, 1] at its image_size")


def check_labels(dataset, labels) -> None:
    """A batch's labels (B,) are integers in [0, num_classes) (checked on the CPU, before they move); a batch of
    several conditioning fields (a dict) has the same number of rows in each, and its "label", when there, is
    such labels."""
    if isinstance(labels, dict):
        rows = {name: len(value) if hasattr(value, "__len__") else None for name, value in labels.items()}
        if len(set(rows.values())) > 1 or None in rows.values():
            raise broken(dataset, "dataset", f"gave a batch whose conditioning fields have different numbers of "
                                             f"rows {rows}; every field needs one row per image")
        if "label" in labels:
            check_labels(dataset, labels["label"])
        return
    k = int(dataset.num_classes)
    if isinstance(labels, Tensor):
        bad = labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool
        if not bad and len(labels):
            bad = int(labels.min()) < 0 or int(labels.max()) >= k
        shown = f"{labels.flatten()[:8].tolist()} ({labels.dtype}, shape {tuple(labels.shape)})"
    else:
        bad, shown = True, f"{str(labels)[:60]} ({type(labels).__name__})"
    if bad:
        raise broken(dataset, "dataset", f"gave labels {shown}; expected integer class indices in "
                                         f"[0, num_classes={k})")


def check_rows(head, what: str, out, shape: tuple) -> None:
    """A head's ``loss`` (N,) or ``sample`` (N, C) returned one row per input row."""
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        letters = "(N,): the per-row loss" if len(shape) == 1 else "(N, C): one token per row"
        raise broken(head, "head", f"{what} returned {shape_of(out)}; expected {letters}, here {shape}")


def check_step(ordering, step, batch: int, length: int) -> None:
    """A sampling step predicts a (B, L) bool mask."""
    p = step.predict
    if not isinstance(p, Tensor) or tuple(p.shape) != (batch, length) or p.dtype != torch.bool:
        raise broken(ordering, "ordering", f"sampling_plan gave a step whose predict is {shape_of(p)} "
                                           f"{getattr(p, 'dtype', '')}; expected ({batch}, {length}) bool")


def check_plan_covered(ordering, times: Tensor, expected: Tensor) -> None:
    """After sampling: ``times`` (B, L), how often each position was predicted, is 1 where ``expected`` (B, L)
    bool (the positions not known at the start) and 0 elsewhere (one sync)."""
    never, twice, known = torch.stack([((times == 0) & expected).sum(), (times > 1).sum(),
                                       ((times > 0) & ~expected).sum()]).tolist()
    if never or twice or known:
        raise broken(ordering, "ordering", f"sampling_plan left {never} (image, position) pairs never predicted, "
                                           f"predicted {twice} more than once and {known} that were known; a "
                                           "plan predicts every unknown position exactly once")


def check_visible_counts(fewest: int, most: int) -> None:
    """Every row of a visible mask shows the same number of positions (the encoder packs them as (B, n))."""
    if fewest != most:
        raise UserError(f"the ordering's visible mask shows different numbers of positions in different rows "
                        f"({fewest} to {most}, with the class-token buffer); training_split and step_inputs must "
                        "show the same number in every row (sandbox.testing.check_ordering names the step)")


# --------------------------------------------------------------------------------------
# Known tokens at the start of a generation, for a backbone that reads them as a prefix
# --------------------------------------------------------------------------------------
def is_prefix(known: Tensor, order: Tensor) -> bool:
    """Whether ``known`` (B, L) bool is, in every row, the first k positions of ``order`` ((L,) or (B, L) long:
    the positions in generation order), with one k for all rows."""
    B, L = known.shape
    order = order.expand(B, L) if order.dim() == 1 else order
    in_order = known.gather(1, order.to(known.device))  # (B, L) known, read in generation order
    no_gap = not bool((~in_order[:, :-1] & in_order[:, 1:]).any())  # never an unknown before a known one
    return no_gap and len(set(in_order.sum(1).tolist())) <= 1


def check_known_prefix(backbone, known: Tensor, ordering) -> None:
    """A backbone that continues only a known prefix (``Backbone.known_prefix_only``, a causal one): ``known``
    (B, L) must be the first k positions of the ordering's fixed ``generation_order`` in every row. An order
    that differs between two generator seeds is drawn per image (trained on every permutation), so any known
    set can come first: accepted. Otherwise one error line naming both plugins."""
    B = known.shape[0]
    if not bool(known.any()) or bool(known.all()):
        return
    order = ordering.generation_order(B, torch.Generator().manual_seed(0))  # (B, L)
    if not torch.equal(order, ordering.generation_order(B, torch.Generator().manual_seed(1))):
        return  # drawn per image: the known tokens are one more order among those trained on
    if is_prefix(known.cpu(), order.cpu()):
        return
    in_order = known.cpu().gather(1, order.cpu())  # (B, L) known, read in generation order
    gaps = (~in_order[:, :-1] & in_order[:, 1:]).any(1)  # (B,) rows with an unknown step before a known one
    gap = int((~in_order[gaps]).long().argmax(1).min()) if bool(gaps.any()) else None  # the earliest such step
    where = (f"step {gap} of the order is unknown but a later one is known" if gap is not None else
             f"the rows keep prefixes of different lengths ({sorted(set(in_order.sum(1).tolist()))})")
    raise UserError(
        f"backbone {type(backbone).__name__} continues a generation only from known tokens that come first in "
        f"ordering {type(ordering).__name__}'s fixed generation order (its first k positions, one k in every row); "
        f"here {where}: keep a prefix of the order (for a "
        "row-major order, whole token rows from the top) or use a bidirectional backbone")
