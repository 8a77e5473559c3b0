"""Coarse-to-fine multi-scale ordering: a pyramid of the token grid in one sequence, one scale per step.

The sequence holds every scale of the token grid, coarsest first, each in
raster order (L = sum of the scales' areas); the transformer tells the scales
apart by a learned group (scale) embedding on top of its per-position one.
Scales are area-downsampled copies of the grid (FlowAR), or, with
``residual``, what the coarser scales miss (VAR): then the grid is the sum of
the upsampled scales and the pyramid reconstructs it exactly.

Training picks one scale k per batch: coarser scales are visible, scale k
carries the loss, and its positions show the encoder the current coarse
estimate (the upsampled previous scale, or the sum of the coarser residuals)
brought to scale k's size, so the decoder refines a guess instead of
starting from mask tokens. Sampling runs the same states: one scale per step
(optionally a scale in several cosine steps, in a random order within the
scale), and the finest scale (or the sum) is decoded.

References:
    VAR: Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
        Prediction", NeurIPS 2024 (residual scales, scales 1,2,3,4,5,6,8,10,13,16, bicubic upsampling,
        next input = area-downsampled accumulated estimate, guidance ramped over scales).
    FlowAR: Ren et al., "FlowAR: Scale-wise Autoregressive Image Generation Meets Flow Matching",
        ICML 2025 (plain scales 1,2,4,8,16 area-downsampled from any VAE latent, next input =
        area(bicubic(previous scale)), per-scale loss weighted by the scale's area).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from sandbox.core.contracts import Ordering, SampleStep, TrainingSplit
from sandbox.core.schedules import cosine_schedule
from sandbox.errors import UserError
from sandbox.plugins.orderings.random import random_orders

Scale = tuple[int, int]  # (rows, columns) of one scale of the token grid


# --------------------------------------------------------------------------------------
# Resizing the token grid
# --------------------------------------------------------------------------------------
def downsample(x: Tensor, size: Scale) -> Tensor:
    """(B,C,h,w) -> (B,C,*size) by area averaging (overlapping windows when the sizes do not divide)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="area")


def upsample(x: Tensor, size: Scale, mode: str) -> Tensor:
    """(B,C,h',w') -> (B,C,*size) by ``mode`` interpolation (bicubic, bilinear or nearest)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **corners)


def default_scales(grid: Scale) -> list[Scale]:
    """Sides doubling from 1 up to the grid (FlowAR): 1, 2, 4, 8, 16 for a 16x16 grid; 1, 2, 4, 8, 13 for 13x13."""
    out, s = [], 1
    while not out or out[-1] != tuple(grid):
        out.append((min(grid[0], s), min(grid[1], s)))
        s *= 2
    return out


# --------------------------------------------------------------------------------------
# The ordering
# --------------------------------------------------------------------------------------
class MultiscaleOrdering(Ordering):
    """Coarse-to-fine pyramid (area or VAR residual scales) in one sequence; one scale per sampling step."""

    contract_args = {"residual": True}  # the plain pyramid is covered by tests/test_orderings.py

    def __init__(
        self,
        grid: tuple[int, int],
        # Sides of the token grid, coarsest first, ending at the grid; an int is a square scale, a pair
        # [rows, cols] any other. None: sides doubling from 1 (FlowAR's 1,2,4,8,16 on a 16x16 grid).
        scales: Optional[list[Union[int, tuple[int, int]]]] = None,
        residual: bool = False,  # False: FlowAR's area-downsampled scales; True: VAR's residual scales
        upsample: Literal["bicubic", "bilinear", "nearest"] = "bicubic",  # VAR and FlowAR both use bicubic
        # Which scale a training batch learns: P(k) ~ area_k ** {uniform: 0, sqrt_area: 0.5, area: 1}.
        # "area" makes the expected loss the per-token mean over the pyramid (VAR's objective, FlowAR's
        # area-weighted sum of per-scale losses), by importance sampling rather than loss weights. With one
        # scale per batch it starves the coarse scales (1x1: 1 batch in 85 on an 8x8 grid), and "uniform"
        # starves the finest; measured on the digits quickstart (scale_steps 1,1,1,4), sqrt_area 93.5%
        # accuracy, area 64%, uniform 41%.
        scale_weighting: Literal["area", "sqrt_area", "uniform"] = "sqrt_area",
        # Cosine steps per scale (positions of a split scale are revealed in a random order); training
        # draws the same states. None: one step per scale (VAR, FlowAR).
        scale_steps: Optional[list[int]] = None,
    ):
        super().__init__(grid)
        self.scales = self._check_scales(scales)
        K = len(self.scales)
        self.residual, self.upsample = bool(residual), upsample
        if upsample not in ("bicubic", "bilinear", "nearest"):
            raise UserError(f"MultiscaleOrdering upsample must be bicubic, bilinear or nearest, got {upsample!r}")
        self.areas = [h * w for h, w in self.scales]
        self.offsets = [sum(self.areas[:k]) for k in range(K)]  # where scale k starts in the sequence
        power = {"uniform": 0.0, "sqrt_area": 0.5, "area": 1.0}.get(scale_weighting)
        if power is None:
            raise UserError(f"MultiscaleOrdering scale_weighting must be area, sqrt_area or uniform, "
                            f"got {scale_weighting!r}")
        self.scale_weighting = scale_weighting
        self.scale_probs = torch.tensor(self.areas, dtype=torch.float64) ** power
        self.scale_probs /= self.scale_probs.sum()
        steps = [1] * K if scale_steps is None else [int(s) for s in scale_steps]
        if len(steps) != K or any(not 1 <= s <= a for s, a in zip(steps, self.areas)):
            raise UserError(f"MultiscaleOrdering scale_steps {scale_steps} must give, for each of the {K} scales "
                            f"{self._fmt(self.scales)}, a step count between 1 and the scale's token count")
        # tokens revealed at each step of each scale (the cosine schedule within a split scale)
        self.chunks = [[r for r, _ in cosine_schedule(a, s)] for a, s in zip(self.areas, steps)]
        self._groups = torch.repeat_interleave(torch.arange(K), torch.tensor(self.areas))  # (L,)

    @staticmethod
    def _fmt(scales: list[Scale]) -> str:
        return "[" + ", ".join(f"{h}" if h == w else f"{h}x{w}" for h, w in scales) + "]"

    def _check_scales(self, scales) -> list[Scale]:
        h, w = self.grid
        if scales is None:
            return default_scales(self.grid)
        hint = (f"scales are sides of the {h}x{w} token grid the tokenizer makes of this image size "
                f"(image_size / (stride x patch_size)), coarsest first and ending at it, e.g. "
                f"{self._fmt(default_scales(self.grid))}")
        out = []
        for s in scales:
            pair = (s, s) if isinstance(s, int) else tuple(s)
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
                raise UserError(f"MultiscaleOrdering scale {s!r} is neither an int nor a [rows, cols] pair; {hint}")
            out.append((int(pair[0]), int(pair[1])))
        if any(v < 1 for pair in out for v in pair):
            raise UserError(f"MultiscaleOrdering scales {self._fmt(out)} have a side < 1; {hint}")
        if not out or out[-1] != (h, w):
            raise UserError(f"MultiscaleOrdering scales {self._fmt(out)} do not end at the token grid {h}x{w}; {hint}")
        for (a, b), (c, d) in zip(out, out[1:]):
            if c < a or d < b or c * d == a * b:
                raise UserError(f"MultiscaleOrdering scales {self._fmt(out)} must grow from coarse to fine "
                                f"({a}x{b} then {c}x{d}); {hint}")
        return out

    # -- sequence <-> grid ---------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return sum(self.areas)

    @property
    def num_groups(self) -> int:
        return len(self.scales)

    def groups(self) -> Tensor:
        return self._groups.clone()

    def pyramid(self, grid: Tensor) -> list[Tensor]:
        """Token grid (B,C,h,w) -> one (B,C,h_k,w_k) tensor per scale, coarsest first."""
        if not self.residual:
            return [downsample(grid, s) for s in self.scales]
        out, estimate = [], torch.zeros_like(grid)
        for s in self.scales:
            r = downsample(grid - estimate, s)  # (B, C, h_k, w_k) what the coarser scales miss
            estimate = estimate + upsample(r, self.grid, self.upsample)  # the last scale makes it the grid
            out.append(r)
        return out

    def split_scales(self, seq: Tensor) -> list[Tensor]:
        """Sequence (B,L,C) -> one (B,C,h_k,w_k) tensor per scale."""
        return [rearrange(seq[:, o : o + a], "b (h w) c -> b c h w", h=s[0], w=s[1])
                for o, a, s in zip(self.offsets, self.areas, self.scales)]

    def to_sequence(self, grid: Tensor) -> Tensor:
        return torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in self.pyramid(grid)], dim=1)  # (B, L, C)

    def to_grid(self, seq: Tensor) -> Tensor:
        parts = self.split_scales(seq)
        if not self.residual:
            return parts[-1]  # (B, C, h, w) the finest scale
        return self.estimate(parts, len(parts))  # (B, C, h, w) the sum of the upsampled residuals

    def estimate(self, parts: list[Tensor], k: int) -> Tensor:
        """The token grid (B,C,h,w) as scales < k describe it (k >= 1)."""
        if not self.residual:
            return upsample(parts[k - 1], self.grid, self.upsample)
        out = torch.zeros_like(parts[-1])
        for r in parts[:k]:  # same order of additions as pyramid(): the last scale restores the grid
            out = out + upsample(r, self.grid, self.upsample)
        return out

    def guess(self, parts: list[Tensor], k: int) -> Tensor:
        """Scale k's starting point (B, area_k, C): the coarser scales' estimate, area-downsampled to scale k."""
        return rearrange(downsample(self.estimate(parts, k), self.scales[k]), "b c h w -> b (h w) c")

    def preview(self, tokens: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
        """The grid as the finest fully known scale describes it (upsampled), so an animation goes scale by
        scale; nothing is shown before the coarsest scale is known."""
        B = tokens.shape[0]
        parts = self.split_scales(tokens)  # (B, C, h_k, w_k) per scale
        done = torch.stack([known[:, o : o + a].all(1) for o, a in zip(self.offsets, self.areas)], 1)  # (B, K)
        k = int(done.cumprod(1).sum(1).min())  # scales known in every row (all rows share one plan)
        if k == 0:
            return torch.zeros_like(self.to_grid(tokens)), torch.zeros(B, *self.grid, dtype=torch.bool,
                                                                        device=tokens.device)
        return self.estimate(parts, k), torch.ones(B, *self.grid, dtype=torch.bool, device=tokens.device)

    # -- training ------------------------------------------------------------------------
    def training_split(self, seq: Tensor, generator: torch.Generator | None = None) -> TrainingSplit:
        B, L, _ = seq.shape
        dev = seq.device
        probs = self.scale_probs.to(dev, torch.float32)
        k = int(torch.multinomial(probs, 1, generator=generator))  # one scale per batch
        chunks = self.chunks[k]
        j = int(torch.randint(len(chunks), (1,), generator=generator, device=dev))  # one of scale k's steps
        off, n, n_known = self.offsets[k], self.areas[k], sum(chunks[:j])
        known = torch.zeros(B, n, dtype=torch.bool, device=dev)  # (B, n) scale-k positions sampled before step j
        if n_known:
            known.scatter_(1, random_orders(B, n, generator, dev)[:, :n_known], True)
        visible = (torch.arange(L, device=dev) < off).repeat(B, 1)  # (B, L) the coarser scales
        weight = torch.zeros(B, L, dtype=seq.dtype, device=dev)
        weight[:, off : off + n] = (~known).to(seq.dtype)  # loss on scale k's unknown positions
        inputs = seq
        if k > 0:  # unknown positions of scale k show the coarse guess
            inputs = seq.clone()
            g = self.guess(self.split_scales(seq), k)  # (B, n, C)
            inputs[:, off : off + n] = torch.where(known[..., None], seq[:, off : off + n], g)
            visible[:, off : off + n] = True
        else:  # the coarsest scale has nothing to start from: its unknown positions stay mask tokens
            visible[:, off : off + n] = known
        return TrainingSplit(inputs=inputs, visible=visible, weight=weight)

    # -- sampling ------------------------------------------------------------------------
    def sampling_plan(self, batch: int, num_iter: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", known: Tensor | None = None) -> list[SampleStep]:
        """The plan is fixed by ``scales`` and ``scale_steps`` (which training matches); ``num_iter`` is ignored.

        ``progress`` counts steps, not tokens, so classifier-free guidance ramps over the scales
        (VAR, FlowAR); counting tokens would leave the coarse scales, which fix the class, unguided.

        With ``known``, a fully known scale is skipped (super-resolution: a low-resolution image fixes the
        coarse scales) and a partly known one predicts only its unknown positions (cosine counts over them,
        in at most its configured steps). Skipped steps count as done -- progress = (plain steps - steps
        left) / plain steps -- so a step is guided as the plain plan's step at that scale, and the last
        step reaches 1. A split scale draws its random order whatever is known, so the other scales keep
        the plain plan's orders.
        """
        L, total = self.seq_len, sum(len(c) for c in self.chunks)
        unknown = self._unknown_per_scale(known, batch)  # (K,) unknown positions of each scale, per row
        predicts = []
        for off, n, chunks, u in zip(self.offsets, self.areas, self.chunks, unknown):
            known_k = None if known is None else known[:, off : off + n].to(device)  # (B, n)
            # a scale sampled in one step needs no order; a split one reveals a random order (MAR)
            order = random_orders(batch, n, generator, device, last=known_k) if len(chunks) > 1 else None
            # the plain chunks; cosine counts over the unknown positions of a partly known scale; none if known
            reveals = chunks if u == n else [r for r, _ in cosine_schedule(u, len(chunks))] if u else []
            done = 0
            for revealed in reveals:
                predict = torch.zeros(batch, L, dtype=torch.bool, device=device)  # (B, L)
                if order is None:
                    predict[:, off : off + n] = True if known_k is None else ~known_k
                else:
                    predict[:, off : off + n].scatter_(1, order[:, done : done + revealed], True)
                done += revealed
                predicts.append(predict)
        m = len(predicts)
        return [SampleStep(predict=p, progress=(total - (m - 1 - i)) / total) for i, p in enumerate(predicts)]

    def _unknown_per_scale(self, known: Tensor | None, batch: int) -> list[int]:
        """Unknown positions of each scale (the same in every row: one scale per step), or ValueError."""
        if known is None:
            return list(self.areas)
        self.count_unknown(known, batch, self.seq_len)  # the shape and the equal totals
        counts = [(~known[:, o : o + a]).sum(1).tolist() for o, a in zip(self.offsets, self.areas)]
        uneven = [f"scale {h}x{w}: {c}" for (h, w), c in zip(self.scales, counts) if len(set(c)) > 1]
        if uneven:
            raise ValueError(f"known leaves different numbers of unknown positions per row within a scale "
                             f"({'; '.join(uneven)}); MultiscaleOrdering samples scale by scale, so every row "
                             "needs the same count in each scale")
        return [c[0] if c else 0 for c in counts]

    def known_from_grid(self, grid_known: Tensor) -> Tensor:
        """(B, h, w) bool -> (B, L): a position of scale k is known only when every finest-grid cell of its
        area window (the cells ``downsample`` averages; windows overlap where the sizes do not divide) is known.

        The same rule for plain and residual scales. A residual position also depends on its neighbours
        through the bicubic upsampling of the coarser scales, so with residual scales the decoded grid near
        the mask border mixes given and generated values (a soft border, as a latent tokenizer's receptive
        field makes one); plain scales decode the finest scale, whose known cells stay exactly as given.
        """
        unknown = (~grid_known.bool())[:, None].float()  # (B, 1, h, w)
        parts = [F.adaptive_max_pool2d(unknown, s) == 0 for s in self.scales]  # (B, 1, h_k, w_k) no unknown cell
        return torch.cat([p.flatten(1) for p in parts], dim=1)  # (B, L)

    def coarse_known(self) -> dict[tuple[int, int], Tensor]:
        """Scale k -> the positions of scales <= k (super-resolution: a low-resolution image gives them, the
        finer scales are generated), for each scale k but the finest whose size divides the grid and is divided
        by every coarser scale: then each coarser position averages whole cells of scale k's blocks, so the grid
        seen at scale k's size determines it. A residual scale is what the coarser ones miss of the grid's
        area-downsample to its size, so the same holds. VAR's list (1, 2, 3, 4, 5, ...) gives only 1 and 2: a
        3x3 scale's windows straddle the blocks of the 4x4 one. The finest scale is the grid itself."""
        L, (h, w), out = self.seq_len, self.grid, {}
        for k, (sh, sw) in enumerate(self.scales[:-1]):
            coarser_divide = all(sh % a == 0 and sw % b == 0 for a, b in self.scales[:k])
            if h % sh == 0 and w % sw == 0 and coarser_divide:
                out[(sh, sw)] = torch.arange(L) < self.offsets[k] + self.areas[k]  # (L,) scales <= k
        return out

    def step_inputs(self, tokens: Tensor, known: Tensor, step: SampleStep) -> tuple[Tensor, Tensor]:
        """Fill the unknown positions of the scale being sampled with the coarse guess and show them."""
        k = int(self._groups.to(tokens.device)[step.predict.any(0)].max())
        if k == 0:
            return tokens, known
        off, n = self.offsets[k], self.areas[k]
        g = self.guess(self.split_scales(tokens), k).to(tokens.dtype)  # (B, n, C)
        inputs = tokens.clone()
        inputs[:, off : off + n] = torch.where(known[:, off : off + n, None], tokens[:, off : off + n], g)
        visible = known.clone()
        visible[:, off : off + n] = True
        return inputs, visible
