"""The sampling core: the ordering's plan -> backbone -> head.sample -> tokenizer.decode.

One loop serves every ordering, backbone and head: start with nothing known (or, for editing tasks, with the
known tokens of an image); at each step of the ordering's plan, the backbone conditions the positions the step
predicts on the known tokens and the condition, the head samples them (with classifier-free guidance on a
doubled batch), and they become known. The tokenizer decodes the final grid. A backbone keeps what it reuses
between steps (a causal backbone's KV cache) in the sampler it starts for each generation.

References:
    MAR sec. 4-5 and official ``sample_tokens`` (cosine schedule, linear CFG, temperature);
    MaskGIT (iterative parallel decoding); Ho & Salimans 2022 (classifier-free guidance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sandbox.core.checks import check_plan_covered, check_rows, check_step
from sandbox.core.contracts import BackboneSampler, SampleStep
from sandbox.core.schedules import HeadSteps, cfg_at
from sandbox.errors import UserError


@dataclass
class StepState:
    """What a per-step callback sees (e.g. to draw an animation frame)."""

    index: int
    step: SampleStep
    tokens: Tensor  # (B, L, C) after the step
    known: Tensor  # (B, L) bool after the step


@torch.no_grad()
def sample_tokens(
    model,
    ordering,
    token_dim: int,
    labels,
    num_images: int | None = None,
    num_iter: int = 64,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step: Callable[[StepState], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    start: tuple[Tensor, Tensor] | None = None,
    head_steps=None,
    sampler: Callable[..., BackboneSampler] | None = None,
) -> Tensor:
    """Token sequences (B, L, C) for the conditioning data ``labels`` (class labels (B,), or a dict of fields; None:
    ``num_images`` unconditional ones): the sampling core.

    ``model`` is a ``MAR`` (condition + backbone + head), ``ordering`` gives the plan. ``start`` = (tokens
    (B, L, C), known (B, L) bool) begins from known tokens (editing tasks): the plan predicts only the others,
    which the known ones condition. ``head_steps``: the head's step count at each step of the plan (None: the
    head's own) -- a ``HeadSteps`` spec (``"linear:50:5"``, a count, a list) or a callable (i, n) -> count for
    step i of n. ``sampler(backbone, cond, guided)``: the generation's ``BackboneSampler`` in place of
    ``backbone.start_sampling(cond)`` (a sampler that reuses work across steps, ``sandbox.fast.step_cache``).
    """
    device = model.device
    B = batch_size(labels, num_images)
    L, C = ordering.seq_len, token_dim
    guided = cfg != 1.0 and labels is not None
    steps_at = step_schedule(model.head, head_steps)
    cond = model.conditions(to_device(labels, device), B, guided=guided)
    sampler = model.backbone.start_sampling(cond) if sampler is None else sampler(model.backbone, cond, guided)
    tokens = torch.zeros(B, L, C, device=device) if start is None else start[0].to(device, torch.float32).clone()
    known = torch.zeros(B, L, dtype=torch.bool, device=device) if start is None else start[1].to(device).clone()
    if start is not None:
        model.backbone.check_known(known, ordering)  # e.g. a causal backbone continues only a known prefix
    plan = ordering.sampling_plan(B, num_iter, generator, device, **({} if start is None else {"known": known}))
    times = torch.zeros(B, L, dtype=torch.int32, device=device)  # (B, L) predictions per position
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    expected = ~known  # (B, L) the positions the plan must predict, once each
    for i, step in enumerate(tqdm(plan, desc="sampling", disable=not progress, leave=False)):
        check_step(ordering, step, B, L)
        n = None if steps_at is None else steps_at(i, len(plan))
        with amp:
            new = sample_step(model, ordering, sampler, tokens, known, step, guided, cfg_at(cfg, cfg_schedule,
                              step.progress), temperature, generator, n)  # (N, C)
        tokens[step.predict] = new.to(tokens.dtype)
        known |= step.predict
        times += step.predict
        if on_step is not None:
            on_step(StepState(i, step, tokens, known))
    check_plan_covered(ordering, times, expected)
    return tokens


def sample_step(model, ordering, sampler, tokens: Tensor, known: Tensor, step: SampleStep, guided: bool, scale: float,
                temperature: float, generator, num_steps: int | None = None) -> Tensor:
    """One step of the plan: the backbone conditions the positions the step predicts on what is known, the head
    samples them (N, C) in ``num_steps`` of its own steps (None: its own count), guided with ``scale``
    (classifier-free guidance on a doubled batch: conditional rows, then unconditional rows)."""
    inputs, visible = ordering.step_inputs(tokens, known, step)  # (B, L, C), (B, L)
    predict = step.predict
    if guided:  # one pass for both branches
        inputs, visible, predict = torch.cat([inputs, inputs]), torch.cat([visible, visible]), torch.cat([predict] * 2)
    z = sampler.step(inputs, visible, predict)  # (N or 2N, D): only the predicted positions
    cond, unc = (z[: z.shape[0] // 2], z[z.shape[0] // 2 :]) if guided else (z, None)  # (N, D) each
    extra = {} if num_steps is None else {"num_steps": num_steps}  # only with a schedule: any head takes that
    new = model.call_head("sample", cond, temperature, scale, unc, generator, **extra)  # (N, C)
    check_rows(model.head, "sample", new, (cond.shape[0], tokens.shape[-1]))
    return new


def step_schedule(head, head_steps) -> Callable[[int, int], int | None] | None:
    """``head_steps`` (a ``HeadSteps`` spec, a callable (i, n) -> count, or None) as a callable, resolved against
    ``head``'s own count; one UserError line for a bad spec or a head without ``supports_num_steps``."""
    if head_steps is None or callable(head_steps):
        return head_steps
    try:
        schedule = HeadSteps.parse(head_steps).resolve(head.default_num_steps)
    except ValueError as e:
        raise UserError(f"head_steps: {e}") from None
    if not head.supports_num_steps:
        raise UserError(f"head {type(head).__name__} takes no step count (supports_num_steps is False), so it "
                        f"cannot follow head_steps {schedule}; drop head_steps")
    return schedule.at


def check_head_steps(head, head_steps) -> None:
    """Refuse, as one UserError line before any sampling, a schedule ``head`` cannot follow: a bad spec, a head
    without ``supports_num_steps``, or a count outside the head's range (found by asking the head for one row at
    the schedule's fewest and most steps: each head knows its own range, e.g. DDPM needs 2)."""
    if head_steps is None or callable(head_steps):
        return
    step_schedule(head, head_steps)  # the spec and the head's supports_num_steps
    schedule = HeadSteps.parse(head_steps).resolve(head.default_num_steps)
    param = next(head.parameters(), None)
    row = torch.zeros(1, head.cond_dim, device=None if param is None else param.device)
    for k in sorted(set(schedule.bounds())):
        try:
            with torch.no_grad():
                head.sample(row, num_steps=k, generator=torch.Generator(row.device).manual_seed(0))
        except ValueError as e:
            raise UserError(f"head_steps {head_steps}: head {type(head).__name__} refuses {k} steps ({e})") from None


def batch_size(labels, num_images: int | None) -> int:
    """Rows of conditioning data: a tensor's length, a dict's first field's, or ``num_images`` without data."""
    if labels is None:
        return int(num_images)
    if isinstance(labels, dict):
        return len(next(iter(labels.values())))
    return len(labels)


def take_rows(data, rows: slice):
    """Rows ``rows`` of conditioning data: a tensor's, a list's, or each field's of a dict."""
    if isinstance(data, dict):
        return {k: take_rows(v, rows) for k, v in data.items()}
    return data[rows]


def to_device(data, device):
    """Conditioning data with its tensors on ``device`` (lists of strings stay as they are)."""
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    return data.to(device) if isinstance(data, Tensor) else data


def generate(exp, labels: Tensor | None, num_images: int | None = None, model=None, **kwargs) -> Tensor:
    """Generate images (B,3,H,W) in [-1,1] for the conditioning data ``labels`` (class labels (B,) or a dict of
    fields; None: ``num_images`` unconditional ones).

    ``exp`` is a built ``Experiment``; ``model`` overrides ``exp.model`` (e.g. with EMA weights);
    ``kwargs`` are those of ``sample_tokens`` (num_iter, cfg, cfg_schedule, temperature, generator, ...).
    """
    model = exp.model if model is None else model
    tokens = sample_tokens(model, exp.ordering, exp.tokenizer.token_dim, labels, num_images, **kwargs)  # (B, L, C)
    with torch.no_grad():
        latent = exp.tokenizer.from_tokens(exp.ordering.to_grid(tokens))  # (B, c, h*p, w*p)
        return exp.tokenizer.decode(latent).float()  # (B, 3, H, W)
