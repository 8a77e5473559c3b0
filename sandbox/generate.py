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

from sandbox.kinds import SampleStep


def cfg_at(cfg: float, schedule: str, progress: float) -> float:
    """Guidance scale of a step. ``linear`` (MAR): 1 + (cfg - 1) * progress; ``constant``: cfg."""
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * progress
    if schedule == "constant":
        return cfg
    raise ValueError(f"unknown cfg_schedule {schedule!r}; use 'linear' or 'constant'")


@dataclass
class StepState:
    """What a per-step callback sees (e.g. to draw an animation frame)."""

    index: int
    step: SampleStep
    tokens: Tensor  # (B, L, C) after the step
    known: Tensor  # (B, L) bool after the step


@torch.no_grad()
def generate(
    exp,
    labels: Tensor | None,
    num_images: int | None = None,
    num_iter: int = 64,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    model=None,
    progress: bool = False,
    on_step: Callable[[StepState], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Generate images (B,3,H,W) in [-1,1] for ``labels`` (B,) (or ``num_images`` unconditional ones).

    ``exp`` is a built ``Experiment``; ``model`` overrides ``exp.model`` (e.g. with EMA weights).
    """
    model = exp.model if model is None else model
    transformer, head, ordering = model.transformer, model.head, exp.ordering
    device = next(model.parameters()).device
    B = labels.shape[0] if labels is not None else int(num_images)
    L, C = ordering.seq_len, exp.tokenizer.token_dim
    guided = cfg != 1.0 and labels is not None
    if labels is not None:
        labels = labels.to(device)

    plan = ordering.sampling_plan(B, num_iter, generator, device)
    tokens = torch.zeros(B, L, C, device=device)  # (B, L, C)
    known = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    uncond = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for i, step in enumerate(tqdm(plan, desc="sampling", disable=not progress, leave=False)):
        inputs, visible = ordering.step_inputs(tokens, known, step)  # (B, L, C), (B, L)
        with amp:
            if guided:  # one pass for both branches: conditional rows first, then the fake-latent rows
                z = transformer(torch.cat([inputs, inputs]), torch.cat([visible, visible]),
                                torch.cat([labels, labels]), uncond)  # (2B, L, D)
                cond, unc = z[:B][step.predict], z[B:][step.predict]  # (N, D) each
            else:
                cond, unc = transformer(inputs, visible, labels)[step.predict], None  # (N, D)
            with model.head_precision(cond):
                if model.head_fp32:
                    cond, unc = cond.float(), None if unc is None else unc.float()
                new = head.sample(cond, temperature, cfg_at(cfg, cfg_schedule, step.progress), unc, generator)  # (N, C)
        tokens[step.predict] = new.to(tokens.dtype)
        known |= step.predict
        if on_step is not None:
            on_step(StepState(i, step, tokens, known))
    latent = exp.tokenizer.from_tokens(ordering.to_grid(tokens))  # (B, c, h*p, w*p)
    return exp.tokenizer.decode(latent).float()  # (B, 3, H, W)


def balanced_labels(num_images: int, num_classes: int, device="cpu") -> Tensor:
    """Labels that cycle through the classes: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(num_images, device=device) % num_classes


def generate_many(exp, labels: Tensor, batch_size: int, seed: int, progress: bool = False, **kwargs) -> Tensor:
    """Generate in batches; image i of batch k uses generator seed (seed, k), so a seed fixes the set."""
    out = []
    batches = labels.split(batch_size)
    for k, lab in enumerate(tqdm(batches, desc="batches", disable=not progress or len(batches) == 1)):
        device = next((kwargs.get("model") or exp.model).parameters()).device
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + k)
        out.append(generate(exp, lab, generator=g, progress=progress and len(batches) == 1, **kwargs).cpu())
    return torch.cat(out)
