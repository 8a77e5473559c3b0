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
from typing import Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sandbox.guards import check_plan_covered, check_rows, check_step
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
            with model.head_precision(cond):
                if model.head_fp32:
                    cond, unc = cond.float(), None if unc is None else unc.float()
                new = head.sample(cond, temperature, cfg_at(cfg, cfg_schedule, step.progress), unc, generator)  # (N, C)
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


def balanced_labels(num_images: int, num_classes: int, device="cpu") -> Tensor:
    """Labels that cycle through the classes: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(num_images, device=device) % num_classes


def chunk_generator(seed: int, k: int, device) -> torch.Generator:
    """The generator of sampling chunk k: chunks are seeded by their index, not by who samples them."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + k)


def generate_chunks(exp, labels: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    progress: bool = False, **kwargs) -> Iterator[tuple[int, Tensor]]:
    """(k, images of chunk k) for the chunks ``labels.split(batch_size)`` that ``rank`` owns (k % world_size).

    Chunk k is seeded by (seed, k) whoever samples it, so the images are the same for any number
    of ranks (given the same ``batch_size``). For evaluations that reduce images to features
    per rank (e.g. FID) without gathering the images.
    """
    chunks = labels.split(batch_size)
    mine = range(rank, len(chunks), world_size)
    device = next((kwargs.get("model") or exp.model).parameters()).device
    for k in tqdm(mine, desc="batches", disable=not progress or len(mine) <= 1):
        images = generate(exp, chunks[k], generator=chunk_generator(seed, k, device),
                          progress=progress and len(mine) == 1, **kwargs)
        yield k, images.cpu()


def generate_many(exp, labels: Tensor, batch_size: int, seed: int, progress: bool = False, **kwargs) -> Tensor:
    """Generate in batches of ``batch_size``; batch k uses generator seed (seed, k), so a seed fixes the set."""
    return torch.cat([images for _, images in generate_chunks(exp, labels, batch_size, seed, progress=progress,
                                                              **kwargs)])


def generate_distributed(exp, labels: Tensor, batch_size: int, seed: int, dst: int | None = 0,
                         progress: bool = False, **kwargs) -> Tensor | None:
    """``generate_many`` split over the ranks of the current process group; every rank must call it.

    Ranks sample interleaved chunks and the images are gathered, in index order, on rank ``dst``
    (None on the others), or on every rank with ``dst=None``. Identical to ``generate_many`` for
    any number of ranks. Without a process group it is ``generate_many``.
    """
    from sandbox import distributed

    me = distributed.info()
    if not me.enabled:
        return generate_many(exp, labels, batch_size, seed, progress=progress, **kwargs)
    mine = list(generate_chunks(exp, labels, batch_size, seed, me.rank, me.world_size,
                                progress=progress and me.is_main, **kwargs))
    gathered = distributed.gather_objects(mine, dst)
    if gathered is None:
        return None
    return torch.cat([images for _, images in sorted((c for part in gathered for c in part), key=lambda c: c[0])])
