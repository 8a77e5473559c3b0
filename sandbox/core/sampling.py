"""The sampling core: the ordering's plan -> MAR -> head.sample -> tokenizer.decode.

One loop serves every ordering and head: start with nothing known; at each
step of the ordering's plan, the transformer conditions every position on the
known tokens, the head samples the positions the step predicts (with
classifier-free guidance on a doubled batch), and they become known. The
tokenizer decodes the final grid.

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
from sandbox.core.contracts import SampleStep
from sandbox.core.schedules import cfg_at


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
    labels: Tensor | None,
    num_images: int | None = None,
    num_iter: int = 64,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step: Callable[[StepState], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Token sequences (B, L, C) for ``labels`` (B,) (or ``num_images`` unconditional ones): the sampling core.

    ``model`` is a ``MAR`` (transformer + head), ``ordering`` gives the plan.
    """
    transformer, head = model.transformer, model.head
    device = next(model.parameters()).device
    B = labels.shape[0] if labels is not None else int(num_images)
    L, C = ordering.seq_len, token_dim
    guided = cfg != 1.0 and labels is not None
    if labels is not None:
        labels = labels.to(device)
        labels2 = torch.cat([labels, labels]) if guided else labels  # (2B,) conditional rows, then fake-latent rows

    plan = ordering.sampling_plan(B, num_iter, generator, device)
    tokens = torch.zeros(B, L, C, device=device)  # (B, L, C)
    known = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    times = torch.zeros(B, L, dtype=torch.int32, device=device)  # (B, L) predictions per position: 1 at the end
    uncond = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for i, step in enumerate(tqdm(plan, desc="sampling", disable=not progress, leave=False)):
        check_step(ordering, step, B, L)
        inputs, visible = ordering.step_inputs(tokens, known, step)  # (B, L, C), (B, L)
        with amp:
            if guided:  # one pass for both branches: conditional rows first, then the fake-latent rows
                z = transformer(torch.cat([inputs, inputs]), torch.cat([visible, visible]), labels2, uncond,
                                query=torch.cat([step.predict, step.predict]))  # (2N, D): only predicted positions
                cond, unc = z[: z.shape[0] // 2], z[z.shape[0] // 2 :]  # (N, D) each
            else:
                cond, unc = transformer(inputs, visible, labels, query=step.predict), None  # (N, D)
            new = model.call_head("sample", cond, temperature, cfg_at(cfg, cfg_schedule, step.progress), unc,
                                  generator)  # (N, C)
        check_rows(head, "sample", new, (cond.shape[0], C))
        tokens[step.predict] = new.to(tokens.dtype)
        known |= step.predict
        times += step.predict
        if on_step is not None:
            on_step(StepState(i, step, tokens, known))
    check_plan_covered(ordering, times)
    return tokens


def generate(exp, labels: Tensor | None, num_images: int | None = None, model=None, **kwargs) -> Tensor:
    """Generate images (B,3,H,W) in [-1,1] for ``labels`` (B,) (or ``num_images`` unconditional ones).

    ``exp`` is a built ``Experiment``; ``model`` overrides ``exp.model`` (e.g. with EMA weights);
    ``kwargs`` are those of ``sample_tokens`` (num_iter, cfg, cfg_schedule, temperature, generator, ...).
    """
    model = exp.model if model is None else model
    tokens = sample_tokens(model, exp.ordering, exp.tokenizer.token_dim, labels, num_images, **kwargs)  # (B, L, C)
    with torch.no_grad():
        latent = exp.tokenizer.from_tokens(exp.ordering.to_grid(tokens))  # (B, c, h*p, w*p)
        return exp.tokenizer.decode(latent).float()  # (B, 3, H, W)
