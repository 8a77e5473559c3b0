"""Flow matching head: the same AdaLN MLP, trained to carry Gaussian noise to a token along straight lines.

Path and velocity (rectified-flow / SD3 convention, t = 1 is pure noise):

    x_t = (1 - t) x + t e,  e ~ N(0, I),  t in [0, 1]        v = dx_t/dt = e - x

The network predicts either v directly (``prediction="v"``) or the clean token
x (``prediction="x"``), in which case v is formed as (x_t - x_hat) / t and the
loss is still taken on v -- JiT's recipe for high-dimensional pixel tokens,
where x lies near a low-dimensional manifold but v and e do not. Training
draws t uniformly or from a logit-normal, optionally shifted toward noise
(``shift``; larger tokens need more noise to hide the same amount of signal).
Sampling integrates dx/dt = v from t = 1 to 0 with Euler or Heun steps on the
same shifted time grid, with classifier-free guidance on the velocity, applied
only while t lies in ``guidance_interval``.

Temperature: the initial noise is scaled, x_1 = temperature * e (the reduced-
temperature sampling of Glow). For a Gaussian target the flow map of this path
is affine in x_1, so temperature T scales the standard deviation by exactly T.
For a mixture it is not a tempered density: the modes stay in place and the
total spread shrinks less (two far modes keep ~0.9 of it at T = 0.5 in
tests/test_heads.py), and noise from the middle of the Gaussian, which the
flow splits between modes, lands between them. 1.0 samples the learned
distribution.

The Euler/Heun loop is written here, not taken from diffusers'
FlowMatchEuler/HeunDiscreteScheduler, because their grid is built for models
trained on 1000 discrete timesteps: linspace(1, 1/1000) then a final step to 0,
so one of the N steps (two network calls for Heun) is spent on t in [0.001, 0]
-- a tenth of the budget at Heun 10 -- and the Heun scheduler takes no custom
grid. The update itself is one line, x += (t_next - t) v.

References:
    Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023; Liu et al., "Flow Straight and Fast:
        Learning to Generate and Transfer Data with Rectified Flow", ICLR 2023 (the linear path).
    Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), ICML 2024:
        logit-normal t (sec. 3.1; rf/lognorm(0.00, 1.00) best in table 1), the resolution-dependent shift
        t' = s t / (1 + (s - 1) t) with s = sqrt(m / n) for m vs n dimensions (sec. 5.3.2), t x 1000 as the
        network's time input.
    Li & He, "Back to Basics: Let Denoising Generative Models Denoise" (JiT), 2025: x-prediction with the loss
        on v, the denominator clamped at t_eps = 0.05, Heun sampling with a final Euler step, CFG interval.
    Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
        Diffusion Models", NeurIPS 2024.
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), NeurIPS 2022
        (Heun's method, Euler on the step that ends at the data).
    Kingma & Dhariwal, "Glow", NeurIPS 2018 (sampling at reduced temperature).
    MAR sec. 3 (a per-token head conditioned on z); FlowAR, xAR (flow matching as the per-token loss).
"""
from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from torch import Tensor

from sandbox.kinds import Head
from sandbox.layers import AdaLNMLP

TIME_SCALE = 1000.0  # t in [0, 1] enters the sinusoidal embedding as t * 1000 (SD3), the diffusion head's range


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t): s > 1 moves t toward noise, keeping 0 and 1 fixed.

    Equivalent in signal-to-noise ratio to JiT's noise scale s (noise s * e at the unshifted t).
    """
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


def flow_velocity(net: AdaLNMLP, x: Tensor, tt: Tensor, c_emb: Tensor, cfg: float, x_prediction: bool,
                  denom: float) -> Tensor:
    """The network's velocity for x (N, C) at network time ``tt`` (1,), guided when ``c_emb`` holds 2N rows
    (conditional, then unconditional): v_u + cfg (v_c - v_u). x-prediction turns x_hat into
    v = (x_t - x_hat) / denom with denom = max(t, t_eps)."""
    N = x.shape[0]
    guided = c_emb.shape[0] == 2 * N
    xx = torch.cat([x, x]) if guided else x  # (N or 2N, C): both branches see x_t
    out = net.forward_embedded(xx, tt, c_emb).float()  # (N or 2N, C)
    v = (xx - out) / denom if x_prediction else out
    if guided:
        v_c, v_u = v[:N], v[N:]
        return v_u + cfg * (v_c - v_u)  # (N, C)
    return v  # (N, C)


@cache
def compiled_flow_velocity():
    """``flow_velocity`` under ``torch.compile``, built once per process (``dynamic=True``: the rows, times and
    guidance scale change between calls without recompiling)."""
    return torch.compile(flow_velocity, dynamic=True)


class FlowHead(Head):
    """Flow matching on the linear path (rectified flow), v- or x-prediction, Euler/Heun sampling."""

    contract_args = {"width": 32, "depth": 1, "num_sampling_steps": 3}
    SAMPLERS = ("euler", "heun")

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 1024,  # the diffusion head's MAR-B MLP (6 x 1024), so the two heads compare at equal size
        depth: int = 6,
        prediction: Literal["v", "x"] = "v",  # v: low-dim latent tokens (KL-16: 16 dims); x: large pixel tokens (JiT)
        time_sampling: Literal["uniform", "logit_normal"] = "logit_normal",  # SD3: logit-normal beats uniform
        logit_mean: float = 0.0,  # SD3's best, rf/lognorm(0.00, 1.00); JiT's P_mean -0.8 on 1-t is +0.8 here
        logit_std: float = 1.0,  # SD3 and (0.8) JiT
        shift: float = 1.0,  # no shift; SD3: sqrt(dims / reference dims) for larger tokens (2.0 for 4x the dims)
        t_eps: float = 0.05,  # JiT: x-prediction divides by max(t, t_eps) so v stays bounded near the data
        sampler: Literal["euler", "heun"] = "heun",  # JiT samples with Heun (final step Euler)
        num_sampling_steps: int = 50,  # JiT's 50 Heun steps: 99 network calls, like the official 100 DDPM steps
        guidance_interval: tuple[float, float] = (0.0, 1.0),  # all t; JiT's [0.1, 1] on 1-t is (0.0, 0.9) here
        grad_checkpointing: bool = False,  # recompute blocks in backward to save memory
    ):
        super().__init__(token_dim, cond_dim)
        if sampler not in self.SAMPLERS:  # jsonargparse checks recipes; these guard direct construction
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(self.SAMPLERS)}")
        if prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {prediction!r}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if num_sampling_steps < 1 or shift <= 0 or logit_std <= 0 or not 0 < t_eps < 1:
            raise ValueError("need num_sampling_steps >= 1, shift > 0, logit_std > 0 and 0 < t_eps < 1")
        lo, hi = guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval}")
        self.prediction, self.time_sampling, self.sampler = prediction, time_sampling, sampler
        self.logit_mean, self.logit_std, self.shift, self.t_eps = logit_mean, logit_std, shift, t_eps
        self.num_sampling_steps, self.guidance_interval = num_sampling_steps, (float(lo), float(hi))
        self.width = width  # reported to the trainer's large-token warning (sandbox/diagnostics.py)
        self.compiled_sampling = False  # set by compile_sampling (--compile); a runtime choice, not in checkpoints
        self.net = AdaLNMLP(token_dim, width, token_dim, cond_dim, depth, grad_checkpointing)

    # ----------------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Training times (n,) in (0, 1): uniform or logit-normal, then shifted."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))
        return shift_time(t, self.shift)

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Network output at (x_t, t (N, 1)) -> velocity; for x-prediction v = (x_t - x_hat) / max(t, t_eps)
        (sampling forms the same with one float t: ``flow_velocity``)."""
        if self.prediction == "v":
            return out
        return (xt - out) / t.clamp_min(self.t_eps)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        N = target.shape[0]
        t = self.sample_t(N, target.device, generator)  # (N,)
        e = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)  # (N, C)
        tc = t[:, None].to(target.dtype)  # (N, 1)
        xt = (1 - tc) * target + tc * e  # (N, C)
        out = self.net(xt, t * TIME_SCALE, cond)  # (N, C): v or x_hat
        v_hat = self.to_velocity(out, xt, tc)  # (N, C)
        # the target takes the same clamped denominator (JiT), so x-prediction's loss is |x_hat - x|^2 / max(t, eps)^2
        v = e - target if self.prediction == "v" else (xt - target) / tc.clamp_min(self.t_eps)
        return ((v_hat - v) ** 2).mean(dim=1)  # (N,)

    # ----------------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: float, c_emb: Tensor, cfg: float) -> Tensor:
        """Guided velocity at time t for the N rows of x (N, C).

        ``c_emb`` holds 2N rows (conditional, then unconditional) when guiding; outside
        ``guidance_interval`` only the conditional half is evaluated.
        """
        N = x.shape[0]
        lo, hi = self.guidance_interval
        guided = c_emb.shape[0] == 2 * N and lo <= t <= hi
        tt = torch.full((1,), t * TIME_SCALE, device=x.device)  # one t for all rows: embedded once, broadcast
        fn = compiled_flow_velocity() if self.compiled_sampling else flow_velocity
        return fn(self.net, x, tt, c_emb if guided else c_emb[:N], cfg, self.prediction == "x",
                  max(t, self.t_eps))  # (N, C)

    def compile_sampling(self) -> None:
        """Evaluate the guided velocity through ``torch.compile`` (``compiled_flow_velocity``): fused
        elementwise kernels between the products; the samples equal the eager ones within float rounding."""
        self.compiled_sampling = True

    def time_grid(self) -> list[float]:
        """The N+1 times from 1 (noise) to 0 (data), uniform before the shift."""
        grid = torch.linspace(1.0, 0.0, self.num_sampling_steps + 1, dtype=torch.float64)
        return shift_time(grid, self.shift).tolist()

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        N = cond.shape[0]
        guided = uncond is not None and cfg != 1.0
        c_emb = self.net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        x = temperature * torch.randn(N, self.token_dim, device=cond.device, generator=generator)  # (N, C) at t=1
        ts = self.time_grid()
        for i in range(self.num_sampling_steps):
            t, t_next = ts[i], ts[i + 1]
            v = self.velocity(x, t, c_emb, cfg)  # (N, C)
            if self.sampler == "heun" and i < self.num_sampling_steps - 1:
                # Heun: average with the slope at the Euler guess; the last step (to t=0) stays Euler, as in
                # EDM and JiT (x-prediction's velocity is only clamped, not defined, at t=0)
                v = 0.5 * (v + self.velocity(x + (t_next - t) * v, t_next, c_emb, cfg))
            x = x + (t_next - t) * v  # (N, C)
        return x
