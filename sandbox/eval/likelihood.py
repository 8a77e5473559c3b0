"""The likelihood of a token sequence under MAR: the ordering's sampling plan run with teacher forcing.

At each step of the plan the known positions hold the TRUE tokens, the
transformer conditions the positions the step predicts, and the head scores
the true tokens there (``Head.nll``). The sum over the steps is the sequence's
negative log-likelihood under the model's autoregressive factorisation along
that plan: p(x) = prod_s p(x_{S_s} | x_{S_<s}), each group's tokens independent
given the known ones (MAR predicts a step's tokens in parallel). A head whose
``nll`` is a bound (diffusion) or an estimate (flow ODE) makes the sum one too.

For a random ordering the plan draws an order, so the result is the likelihood
along that order (a seed fixes it); averaged over orders it bounds the
order-mixture's NLL from above (Jensen), as for order-agnostic autoregressive
models. For a pyramid ordering (coarse-to-fine scales), the sequence holds
every scale: the result is the likelihood of the sequence, not of the image.

References:
    MAR sec. 3-4 (per-token p(x | z), the masked-generation plan); Uria et al., "A Deep and Tractable Density
        Estimator" (NADE), ICML 2014, and Hoogeboom et al., "Autoregressive Diffusion Models", ICLR 2022
        (order-agnostic likelihoods, the bound over orders).
    Theis, van den Oord, Bethge, "A note on the evaluation of generative models", ICLR 2016 (bits per dimension
        of continuous densities).
"""
from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sandbox.core.checks import broken, check_plan_covered, check_step, shape_of
from sandbox.core.sampling import to_device


@torch.no_grad()
def plan_nll(model, ordering, seq: Tensor, labels: Tensor | None, num_iter: int,
             generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Negative log-likelihood (nats) of the true sequences ``seq`` (B, L, C) given ``labels`` (B,), per step of
    the ordering's sampling plan and per image: (S, B). The per-image NLL is ``plan_nll(...).sum(0)``.

    ``model`` is a ``MAR`` whose head has ``has_nll``; ``generator`` draws the plan's order and the head's
    estimator noise, so a seed fixes the result. ``autocast_dtype`` runs the transformer under autocast, the
    head as ``model.head_precision`` and ``model.head_fp32`` say (as ``sample_tokens``).
    """
    head = model.head
    if not getattr(head, "has_nll", False):
        raise broken(head, "head", "has no likelihood (has_nll is False); nll needs a head that implements "
                                   "nll(target, cond, generator)")
    device = model.device
    seq = seq.to(device)
    B, L, _ = seq.shape
    sampler = model.backbone.start_sampling(model.conditions(to_device(labels, device), B))
    plan = ordering.sampling_plan(B, num_iter, generator, device)
    tokens = torch.zeros_like(seq)  # (B, L, C) the true tokens at known positions, zeros elsewhere
    known = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    times = torch.zeros(B, L, dtype=torch.int32, device=device)  # (B, L) predictions per position
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    per_step = []
    for step in plan:
        check_step(ordering, step, B, L)
        inputs, visible = ordering.step_inputs(tokens, known, step)  # (B, L, C), (B, L)
        target = seq[step.predict]  # (N, C) row-major: image by image
        with amp:
            cond = sampler.step(inputs, visible, step.predict)  # (N, D)
            nll = model.call_head("nll", target, cond, generator)  # (N,)
        check_nll(head, nll, target.shape[0])
        per_step.append(nll.double().view(B, -1).sum(1))  # (B,): every row predicts the same count
        tokens[step.predict] = seq[step.predict]
        known |= step.predict
        times += step.predict
    check_plan_covered(ordering, times, torch.ones_like(known))
    return torch.stack(per_step)  # (S, B)


def check_nll(head, nll, n: int) -> None:
    """A head's ``nll`` returned one value per row (N,)."""
    if not isinstance(nll, Tensor) or tuple(nll.shape) != (n,):
        raise broken(head, "head", f"nll returned {shape_of(nll)}; expected ({n},): one value per row")


@dataclass
class NLLSummary:
    """Bits per dimension of a set of sequences, overall and step by step (``summarize_nll``)."""

    bits_per_dim: float  # mean over images of NLL / (L C ln 2)
    stderr: float  # its standard error over the images
    step_share: list[float]  # each step's part of bits_per_dim (they add up to it): which steps carry the bits
    step_bits_per_dim: list[float] | None  # bits per dim of the tokens a step predicts (given step_tokens)
    num_images: int
    step_tokens: list[int] | None = None  # positions each step predicts per image

    def table(self) -> str:
        """The per-step table, one line per step, then the total: which steps carry the bits."""
        lines = ["step  tokens  share (bits/dim)  bits/dim of its tokens"]
        for s, share in enumerate(self.step_share):
            n = "-" if self.step_tokens is None else str(self.step_tokens[s])
            own = "-" if self.step_bits_per_dim is None else f"{self.step_bits_per_dim[s]:.4f}"
            lines.append(f"{s:>4}  {n:>6}  {share:>16.4f}  {own:>22}")
        lines.append(f"total: {self.bits_per_dim:.4f} +- {self.stderr:.4f} bits/dim over {self.num_images} images")
        return "\n".join(lines)


def summarize_nll(nll: Tensor, seq_len: int, token_dim: int, step_tokens: list[int] | None = None) -> NLLSummary:
    """``plan_nll``'s (S, B) nats -> bits per dimension with dims = L * C, the sequence's dimensions.

    ``step_tokens`` (S,), the positions each step predicts per image (``step_token_counts``), adds the bits per
    dimension of each step's own tokens. For a pyramid ordering L counts every scale: this is the likelihood
    of the sequence, not of the image (the finest scale alone has fewer dimensions).
    """
    nll = nll.double().cpu()
    S, B = nll.shape
    scale = 1.0 / (seq_len * token_dim * math.log(2.0))
    per_image = nll.sum(0) * scale  # (B,) bits per dim
    stderr = float(per_image.std() / math.sqrt(B)) if B > 1 else float("nan")
    step_share = (nll.mean(1) * scale).tolist()  # (S,)
    step_bpd = None
    if step_tokens is not None:
        if len(step_tokens) != S:
            raise ValueError(f"step_tokens has {len(step_tokens)} counts for {S} steps")
        step_bpd = [float(nll[s].mean()) / (n * token_dim * math.log(2.0)) for s, n in enumerate(step_tokens)]
    return NLLSummary(float(per_image.mean()), stderr, step_share, step_bpd, B, step_tokens)


def step_token_counts(ordering, num_iter: int) -> list[int]:
    """Positions each step of the plan predicts per image (S,). The counts of today's orderings do not depend
    on the drawn order, so a one-image plan with a fixed seed gives them."""
    plan = ordering.sampling_plan(1, num_iter, torch.Generator().manual_seed(0), "cpu")
    return [int(step.predict.sum()) for step in plan]


@torch.no_grad()
def image_sequences(exp, images: Tensor) -> Tensor:
    """Images (B,3,H,W) in [-1, 1] -> the token sequences (B, L, C) whose likelihood ``plan_nll`` takes: the
    tokenizer's posterior mean (``sample=False``), so the data are fixed, not a draw."""
    latent = exp.tokenizer.encode(images, sample=False)  # (B, c, h*p, w*p)
    return exp.ordering.to_sequence(exp.tokenizer.to_tokens(latent))  # (B, L, C)


# --------------------------------------------------------------------------------------
# Held-out data: the likelihood of a dataset's held-out split (sandbox eval --nll)
# --------------------------------------------------------------------------------------
def heldout_indices(dataset, num_images: int) -> list[int]:
    """The first ``num_images`` items of a fixed shuffle (seed 0) of ``dataset``: a class-mixed subset that is the
    same whatever the eval seed, so seeds vary the plan's order and the estimator's noise, not the data."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return order[:num_images].tolist()


@torch.no_grad()
def dataset_nll(exp, model, dataset, indices: list[int], *, num_iter: int, batch_size: int, seed: int,
                autocast_dtype: torch.dtype | None = None, progress: bool = False) -> Tensor | None:
    """``plan_nll`` of the items ``indices`` of an image dataset, in chunks of ``batch_size``: (S, N) nats. Chunk k
    draws from generator seed (seed, k) whoever computes it; under torchrun the ranks split the chunks and rank 0
    gathers them (the other ranks get None)."""
    from tqdm.auto import tqdm

    from sandbox.eval.samples import chunk_generator
    from sandbox.run import distributed

    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    me, device = distributed.info(), model.device
    mine = range(me.rank, len(chunks), me.world_size)
    parts = []
    for k in tqdm(mine, desc="nll", disable=not progress or not me.is_main, file=sys.stderr):
        images, labels = zip(*(dataset[i] for i in chunks[k]))
        seq = image_sequences(exp, torch.stack(images).to(device))  # (b, L, C)
        nll = plan_nll(model, exp.ordering, seq, torch.as_tensor(labels), num_iter, chunk_generator(seed, k, device),
                       autocast_dtype)
        parts.append((k, nll.cpu()))  # (S, b)
    if me.enabled:
        gathered = distributed.gather_objects(parts, dst=0)
        if gathered is None:
            return None
        parts = [p for part in gathered for p in part]
    return torch.cat([nll for _, nll in sorted(parts, key=lambda p: p[0])], dim=1)  # (S, N)


def plot_nll_steps(summary: NLLSummary, path: Path, title: str) -> None:
    """Which steps carry the bits: each step's share of the total bits/dim (bars) and the bits/dim of the
    tokens it predicts (line, right axis), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from sandbox.run.files import atomic_write_bytes

    steps = list(range(len(summary.step_share)))
    fig = Figure(figsize=(7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(steps, summary.step_share, color="#1f77b4", label="the step's share of the total")
    ax.set_xlabel("step of the sampling plan")
    ax.set_ylabel("share of the total (bits/dim)", color="#1f77b4")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}: {summary.bits_per_dim:.4f} +- {summary.stderr:.4f} bits/dim "
                 f"({summary.num_images} images)", fontsize=9)
    handles = ax.get_legend_handles_labels()
    if summary.step_bits_per_dim is not None:
        own = ax.twinx()
        own.plot(steps, summary.step_bits_per_dim, color="#ff7f0e", marker="o", label="bits/dim of its own tokens")
        own.set_ylabel("bits/dim of the step's tokens", color="#ff7f0e")
        if min(summary.step_bits_per_dim) >= 0:
            own.set_ylim(bottom=0)
        handles = [a + b for a, b in zip(handles, own.get_legend_handles_labels())]
    ax.legend(*handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
