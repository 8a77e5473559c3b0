"""Shortcut head: flow matching plus self-consistency on the step size, so one network samples in 1-4 steps.

FlowHead's path and time convention (t = 1 is pure noise):

    x_t = (1 - t) x + t e,  e ~ N(0, I)        v = dx_t/dt = e - x

The network is conditioned on the step size d as well as on t and predicts the
average velocity over a step from t down to t - d (Frans et al.'s "shortcut"):

    x_{t-d} = x_t - d u(x_t, t, d)             u(x_t, t, 0) = the flow's velocity v(x_t, t)

d is embedded like the time (sinusoidal features of d * 1000 through its own
two-layer MLP) and added to the time and condition embeddings that drive the
AdaLN MLP's modulation, so the network is FlowHead's with one more embedding.

Training (Frans et al. sec. 3), per row:
- flow matching, on a fraction 1 - ``sc_fraction`` of the rows: u(x_t, t, 0) -> e - x, t ~ U(0, 1);
- self-consistency, on the rest: one step of 2d is two steps of d,
      u(x_t, t, 2d) -> sg[(u(x_t, t, d) + u(x_{t-d}, t-d, d)) / 2],   x_{t-d} = x_t - d u(x_t, t, d),
  with 2d drawn uniformly from the dyadic sizes 1/M, 2/M, 4/M, ..., 1 (M = ``finest_steps``) and t
  uniform on the multiples of 2d in (0, 1], so both half steps stay inside [0, 1]. The halves of the
  finest size 1/M are flow (d = 0) Euler steps, so every size is tied to the flow through a chain of
  doublings, not to a separately trained teacher.

Why shortcut models (rather than MeanFlow or consistency training): the targets need only forward passes of
the same network without gradient -- no Jacobian-vector product (MeanFlow's identity needs one through the
network, which the fused AdaLN block's hand-written backward, autocast and gradient checkpointing would
each have to support) and no discretisation curriculum or EMA teacher whose schedule must be tuned
(consistency training). The d = 0 rows are plain flow matching, so the head keeps a multi-step sampler of
known quality, and the step count is a sampling-time choice like the other heads'. FAR put a shortcut head
in MAR's place for the same purpose. On the 2-D mixture of tests/test_fewstep.py it learns 1- and 4-step
samplers within the other heads' tolerances at their model size and training budget (2 x 64, 400 Adam
steps; worst of 4 seeds in 1 step: mean 0.070, covariance 0.032, weights 0.053). A MeanFlow prototype on
the same budget (JVP through the network in eval mode, logit-normal (r, t), 25% r != t) took 3x the time
per step and missed the tolerances at 400 and 800 steps (1-step mean errors 0.23-0.77).

Sampling with k steps (k <= M): the unit interval is split into k dyadic steps, the larger ones first
(near the noise; k = 3 takes 1/2, 1/4, 1/4), so every step uses a size the head was trained on; a power
of two k gives k equal steps. k > M: Euler steps of 1/k on the flow (d = 0), the head's multi-step mode.

Temperature scales the initial noise, x_1 = temperature * e, as in FlowHead; 0 gives every row the image
of x_1 = 0. For a Gaussian target the flow's map is affine in x_1, so with many steps the standard deviation
scales by the temperature; a few-step map equals the flow's only once its shortcuts have converged, and a
young one shrinks the spread less. Measured on the single-Gaussian class of tests/test_fewstep.py's mixture
after 400 steps, temperature 0.5 keeps 0.92 of the spread in 1 step, 0.67 in 4, 0.55 in 128 (after 1,600
steps: 0.62 in 1 step).

Classifier-free guidance acts on the predicted average velocity of every step, u_u + cfg (u_c - u_u) (both
branches in one batched call). For d = 0 this is ordinary guidance on the velocity; for d > 0 it is the
same linear mix of the two branches' shortcuts, not the average of the guided velocity along the step
(that would need guidance inside the self-consistency targets at one fixed scale, as Frans et al. train
it; MAR's guidance scale changes over the AR steps, so it stays a sampling-time choice here).

References:
    Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut Models", ICLR 2025 (step-size
        conditioning, self-consistency targets on dyadic sizes with M = 128, a 1:3 ratio of
        self-consistency to flow-matching rows, uniform t).
    Hang, Bao, Wei, Chen, "Fast Autoregressive Models for Continuous Latent Generation" (FAR), 2025,
        arXiv:2504.18391: a shortcut head in place of MAR's diffusion head for few-step per-token sampling.
    Geng et al., "Mean Flows for One-step Generative Modeling", 2025 (the average-velocity view, u at d).
    Karras et al. (EDM), NeurIPS 2022 (smaller steps toward the data).
    plugins/heads/flow.py (the path, the time scale, the guided velocity this head reuses).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from sandbox.core.adaln_mlp import AdaLNMLP, TimestepEmbedder
from sandbox.core.contracts import Head
from sandbox.plugins.heads.flow import TIME_SCALE, compiled_flow_velocity, flow_velocity


def dyadic_steps(k: int) -> list[float]:
    """k step sizes of the form 2^-j that sum to 1, larger first: with 2^m <= k < 2^(m+1), (2^(m+1) - k)
    steps of 2^-m, then 2 (k - 2^m) steps of 2^-(m+1). k = 3 -> [1/2, 1/4, 1/4]; k = 4 -> [1/4] * 4."""
    m = k.bit_length() - 1  # 2^m <= k < 2^(m+1)
    big, small = 2 ** (m + 1) - k, 2 * (k - 2**m)
    return [2.0**-m] * big + [2.0 ** -(m + 1)] * small


class ShortcutHead(Head):
    """Shortcut model (flow matching + self-consistency on the step size): 1-4 step sampling, Frans et al. 2025."""

    contract_args = {"width": 32, "depth": 1, "num_sampling_steps": 2, "finest_steps": 8}
    supports_num_steps = True

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 1024,  # the diffusion head's MAR-B MLP (6 x 1024), so the heads compare at equal size
        depth: int = 6,
        finest_steps: int = 128,  # M: Frans et al.'s 128; the smallest shortcut is 1/M, finer steps use the flow
        sc_fraction: float = 0.25,  # Frans et al.: 1 self-consistency row for 3 flow-matching rows
        # the top of the few-step range: on the 2-D mixture 4 steps halve 1 step's errors (tests/test_fewstep.py),
        # at 4 network calls per token against the official diffusion head's 100
        num_sampling_steps: int = 4,
        grad_checkpointing: bool = False,  # recompute blocks in backward to save memory
    ):
        super().__init__(token_dim, cond_dim)
        if finest_steps < 1 or finest_steps & (finest_steps - 1):
            raise ValueError(f"finest_steps must be a power of two >= 1, got {finest_steps}")
        if not 0.0 <= sc_fraction < 1.0:
            raise ValueError(f"sc_fraction must be in [0, 1), got {sc_fraction}")
        self.finest_steps, self.sc_fraction = finest_steps, sc_fraction
        self.num_sampling_steps = self.check_steps(num_sampling_steps, "num_sampling_steps")
        self.width = width  # reported to the trainer's large-token warning (sandbox/diagnostics.py)
        self.compiled_sampling = False  # set by compile_sampling (--compile); a runtime choice, not in checkpoints
        self.net = AdaLNMLP(token_dim, width, token_dim, cond_dim, depth, grad_checkpointing)
        self.step_embed = TimestepEmbedder(width)  # d, embedded like the time (Frans et al. sec. 3)
        for lin in (self.step_embed.mlp[0], self.step_embed.mlp[2]):  # the time embedder's init (AdaLNMLP)
            torch.nn.init.normal_(lin.weight, std=0.02)
            torch.nn.init.zeros_(lin.bias)

    @property
    def default_num_steps(self) -> int:
        return self.num_sampling_steps

    @staticmethod
    def check_steps(k, name: str = "num_steps") -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must be an int >= 1, got {k!r}")
        return int(k)

    @property
    def num_levels(self) -> int:
        """Shortcut sizes trained by self-consistency: 1/M, 2/M, ..., 1 (log2 M + 1 of them)."""
        return int(math.log2(self.finest_steps)) + 1

    # ----------------------------------------------------------------------------------
    def predict(self, x: Tensor, t: Tensor, d: Tensor, cond: Tensor) -> Tensor:
        """Average velocity u(x_t, t, d) for rows x (N, C), t (N,), d (N,) in [0, 1], cond (N, D) -> (N, C)."""
        c_emb = self.net.embed_cond(cond) + self.step_embed(d * TIME_SCALE)  # (N, W)
        return self.net.forward_embedded(x, t * TIME_SCALE, c_emb)  # (N, C)

    @torch.no_grad()
    def bootstrap(self, x: Tensor, t: Tensor, size: Tensor, level: Tensor, cond: Tensor) -> Tensor:
        """The self-consistency target of a step of ``size`` (N,) from (x (N, C), t (N,)): the mean of two
        half steps' predictions. The halves of the finest size (level 0) are flow steps (d = 0)."""
        half = size / 2  # (N,)
        d = torch.where(level == 0, torch.zeros_like(half), half)  # (N,) the size the halves are embedded with
        u1 = self.predict(x, t, d, cond)  # (N, C)
        x_mid = x - half[:, None] * u1  # (N, C)
        u2 = self.predict(x_mid, t - half, d, cond)  # (N, C)
        return (u1 + u2) / 2  # (N, C)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        N, dev = target.shape[0], target.device
        # every row draws all of its random numbers, so a row's draws never depend on another row's values
        e = torch.randn(target.shape, device=dev, dtype=target.dtype, generator=generator)  # (N, C)
        r = torch.rand(N, device=dev, generator=generator)  # (N,) position of t in its range
        sc = torch.rand(N, device=dev, generator=generator) < self.sc_fraction  # (N,) self-consistency rows
        level = torch.randint(0, self.num_levels, (N,), device=dev, generator=generator)  # (N,)
        size = 2.0**level / self.finest_steps  # (N,) 2d of a self-consistency row: 1/M, 2/M, ..., 1
        # t uniform on the multiples of 2d in (0, 1], Frans et al.'s grid: the sampler starts every step of size s
        # at a multiple of s, and the two halves of a step of 2d start on the grid of d, so each size is
        # trained where it is used (U(2d, 1) instead: 1-step covariance errors up to the tolerance, 0.050)
        t = torch.where(sc, size * (1 + torch.floor(r / size)), r)  # (N,) flow rows: U(0, 1)
        size = torch.where(sc, size, 0.0)  # (N,) d = 0 on flow rows: the instantaneous velocity
        tc = t[:, None].to(target.dtype)  # (N, 1)
        xt = (1 - tc) * target + tc * e  # (N, C)
        u = self.predict(xt, t, size, cond)  # (N, C)
        goal = e - target  # (N, C) the flow-matching target
        rows = sc.nonzero()[:, 0]  # the bootstrap runs on its rows only (two forward passes, no gradient)
        if rows.numel():
            goal = goal.index_put((rows,), self.bootstrap(xt[rows], t[rows], size[rows], level[rows], cond[rows])
                                  .to(goal.dtype))
        return ((u - goal) ** 2).mean(dim=1)  # (N,)

    # ----------------------------------------------------------------------------------
    def step_sizes(self, k: int) -> list[tuple[float, float]]:
        """(step length, embedded d) of each of k steps from t = 1 to 0: dyadic sizes (all trained) for
        k <= M, else Euler on the flow (d = 0)."""
        if k > self.finest_steps:
            return [(1.0 / k, 0.0)] * k
        return [(s, s) for s in dyadic_steps(k)]

    def velocity(self, x: Tensor, t: float, c_emb: Tensor, cfg: float) -> Tensor:
        """Guided average velocity at time t, (N, C); ``c_emb`` holds the step's embedding (2N rows: guided)."""
        tt = torch.full((1,), t * TIME_SCALE, device=x.device)  # one t for all rows: embedded once, broadcast
        fn = compiled_flow_velocity() if self.compiled_sampling else flow_velocity
        return fn(self.net, x, tt, c_emb, cfg, False, 1.0)  # (N, C)

    def compile_sampling(self) -> None:
        """Evaluate the guided velocity through ``torch.compile`` (FlowHead's ``compiled_flow_velocity``)."""
        self.compiled_sampling = True

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None, num_steps: int | None = None) -> Tensor:
        k = self.num_sampling_steps if num_steps is None else self.check_steps(num_steps)
        N = cond.shape[0]
        guided = uncond is not None and cfg != 1.0
        c_emb = self.net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        x = temperature * torch.randn(N, self.token_dim, device=cond.device, generator=generator)  # (N, C) at t=1
        d_embs: dict[float, Tensor] = {}  # at most two distinct sizes per call
        t = 1.0
        for length, d in self.step_sizes(k):
            if d not in d_embs:
                d_embs[d] = c_emb + self.step_embed(torch.full((1,), d * TIME_SCALE, device=cond.device))
            x = x - length * self.velocity(x, t, d_embs[d], cfg)  # (N, C)
            t -= length  # exact for dyadic lengths; k > M: Euler's last step ends within rounding of 0
        return x
