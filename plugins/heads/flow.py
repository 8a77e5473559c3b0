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

Likelihood (``nll``): the density the conditional flow carries from N(0, I),
by the instantaneous change of variables, d log p(x_t) / dt = -div v, integrated
from the data to the noise with fixed RK4 steps; the divergence exact for small
tokens, Hutchinson's estimate for large ones.

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
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (instantaneous change of variables, thm. 1).
    Grathwohl et al., "FFJORD", ICLR 2019 (Hutchinson's trace estimator, one noise vector kept along the solve);
        Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    MAR sec. 3 (a per-token head conditioned on z); FlowAR, xAR (flow matching as the per-token loss).
"""
from __future__ import annotations

import math
import numbers
from functools import cache
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor, nn

from sandbox.core.adaln_mlp import AdaLNMLP
from sandbox.core.contracts import Head

TIME_SCALE = 1000.0  # t in [0, 1] enters the sinusoidal embedding as t * 1000 (SD3), the diffusion head's range
# RK4 steps of the likelihood ODE on its cubic grid (128 velocity evaluations): with the exact velocity of Gaussian
# targets (tests/test_likelihood.py) the error per 4-dim token is 1e-4 nats at stds 0.05-1 and 2e-3 at std 0.01
# (16 steps: 2e-3 and 3e-2), below a trained head's own error
NLL_STEPS = 32


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
    resumable_args = ("grad_checkpointing",)  # memory, not what is trained
    SAMPLERS = ("euler", "heun")
    has_nll = True  # the ODE likelihood (``nll``)
    supports_num_steps = True

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
        nll_steps: int = NLL_STEPS,  # RK4 steps of the likelihood ODE (``nll``); the why is at NLL_STEPS
        # nll: the exact divergence (C backward passes per evaluation) up to this token dim, Hutchinson's (one pass,
        # plus noise) above: 16 keeps KL-16 latents and the 12-dim quickstart pixels exact; pixel patches (48-768)
        # would cost 48-768 passes
        nll_exact_dims: int = 16,
    ):
        super().__init__(token_dim, cond_dim)
        if sampler not in self.SAMPLERS:  # jsonargparse checks recipes; these guard direct construction
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(self.SAMPLERS)}")
        if prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {prediction!r}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if shift <= 0 or logit_std <= 0 or not 0 < t_eps < 1 or nll_steps < 1:
            raise ValueError("need shift > 0, logit_std > 0, 0 < t_eps < 1 and nll_steps >= 1")
        lo, hi = guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval}")
        self.prediction, self.time_sampling, self.sampler = prediction, time_sampling, sampler
        self.logit_mean, self.logit_std, self.shift, self.t_eps = logit_mean, logit_std, shift, t_eps
        self.num_sampling_steps = self.check_steps(num_sampling_steps, "num_sampling_steps")
        self.guidance_interval = (float(lo), float(hi))
        self.nll_steps, self.nll_exact_dims = nll_steps, nll_exact_dims
        self.width = width  # reported to the trainer's large-token warning (sandbox/diagnostics.py)
        self.compiled_sampling = False  # set by compile_sampling (--compile); a runtime choice, not in checkpoints
        self.net = AdaLNMLP(token_dim, width, token_dim, cond_dim, depth, grad_checkpointing)

    @property
    def default_num_steps(self) -> int:
        return self.num_sampling_steps

    @staticmethod
    def check_steps(k, name: str = "num_steps") -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must be an int >= 1, got {k!r}")
        return int(k)

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

    def repeated_blocks(self) -> list[nn.Module]:
        return self.net.repeated_blocks()  # the MLP's residual blocks

    def compile_sampling(self) -> None:
        """Evaluate the guided velocity through ``torch.compile`` (``compiled_flow_velocity``): fused
        elementwise kernels between the products; the samples equal the eager ones within float rounding."""
        self.compiled_sampling = True

    def time_grid(self, num_steps: int | None = None) -> list[float]:
        """The num_steps + 1 times (None: ``num_sampling_steps``) from 1 (noise) to 0 (data), uniform before
        the shift."""
        k = self.num_sampling_steps if num_steps is None else self.check_steps(num_steps)
        grid = torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64)
        return shift_time(grid, self.shift).tolist()

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None, num_steps: int | None = None) -> Tensor:
        """``num_steps`` steps (None: ``num_sampling_steps``) on ``time_grid``: one network call per Euler step,
        two per Heun step but the last (2 num_steps - 1)."""
        N = cond.shape[0]
        guided = uncond is not None and cfg != 1.0
        ts = self.time_grid(num_steps)  # checks num_steps before any work
        k = len(ts) - 1
        c_emb = self.net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        x = temperature * torch.randn(N, self.token_dim, device=cond.device, generator=generator)  # (N, C) at t=1
        for i in range(k):
            t, t_next = ts[i], ts[i + 1]
            v = self.velocity(x, t, c_emb, cfg)  # (N, C)
            if self.sampler == "heun" and i < k - 1:
                # Heun: average with the slope at the Euler guess; the last step (to t=0) stays Euler, as in
                # EDM and JiT (x-prediction's velocity is only clamped, not defined, at t=0)
                v = 0.5 * (v + self.velocity(x + (t_next - t) * v, t_next, c_emb, cfg))
            x = x + (t_next - t) * v  # (N, C)
        return x

    # ----------------------------------------------------------------------------------
    # Likelihood: the instantaneous change of variables (Chen et al. 2018 thm. 1; FFJORD for Hutchinson)
    @torch.no_grad()
    def nll(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """-log p(x | z) per row (N,), in nats summed over the C dims, of the density this head's flow carries
        from N(0, I): x is integrated from the data (t = 0) to the noise (t = 1) along dx/dt = v(x, t | z)
        with ``nll_steps`` RK4 steps, and log p(x) = log N(x_1; 0, I) + int_0^1 div v(x_t, t) dt.

        The conditional velocity only (guidance does not enter a likelihood); for x-prediction
        v = (x_t - x_hat) / max(t, t_eps), the field the sampler integrates. The divergence is exact for
        C <= ``nll_exact_dims`` (C backward passes) and otherwise Hutchinson's estimate e^T (dv/dx) e with one
        Rademacher e per row drawn from ``generator`` and kept along the whole path (FFJORD): unbiased, and
        fixed by the generator's seed.
        """
        N, C = target.shape
        c_emb = self.net.embed_cond(cond)  # (N, W), once
        probe = None
        if C > self.nll_exact_dims:
            probe = torch.randint(0, 2, (N, C), device=target.device, generator=generator).to(target.dtype) * 2 - 1
        x = target.to(torch.promote_types(target.dtype, torch.float32))  # (N, C) at t = 0; a float32 state at least
        div_integral = torch.zeros(N, dtype=torch.float64, device=target.device)  # (N,) int_0^t div v
        ts = self.nll_grid()
        for t, t_next in pairwise(ts):
            x, d_int = self.rk4_step(x, t, t_next, c_emb, probe)
            div_integral += d_int
        log_p1 = -0.5 * (x.double() ** 2).sum(1) - 0.5 * C * math.log(2 * math.pi)  # (N,) log N(x_1; 0, I)
        return -(log_p1 + div_integral)  # (N,)

    def nll_grid(self) -> list[float]:
        """The likelihood ODE's times from 0 (data) to 1 (noise): (i / n)^3 for n = ``nll_steps``, plus t_eps for
        x-prediction. Cubic: the field changes fastest near the data, on the scale of the data's own spread
        (a Gaussian of std s: where t ~ s), so the steps start small (n = 32: 3e-5) and grow toward the noise.
        t_eps is a grid point because x-prediction's clamped field has a kink there, which a step across it
        would integrate only to first order."""
        n = self.nll_steps
        ts = [(i / n) ** 3 for i in range(n + 1)]
        if self.prediction == "x" and self.t_eps not in ts:
            ts = sorted(ts + [self.t_eps])
        return ts

    def rk4_step(self, x: Tensor, t: float, t_next: float, c_emb: Tensor, probe: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
        """One classical Runge-Kutta step of the joint ODE (x, int div v) from t to t_next -> (x (N, C), the
        step's divergence integral (N,) float64)."""
        h = t_next - t
        v1, d1 = self.velocity_divergence(x, t, c_emb, probe)
        v2, d2 = self.velocity_divergence(x + 0.5 * h * v1, t + 0.5 * h, c_emb, probe)
        v3, d3 = self.velocity_divergence(x + 0.5 * h * v2, t + 0.5 * h, c_emb, probe)
        v4, d4 = self.velocity_divergence(x + h * v3, t_next, c_emb, probe)
        return x + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4), h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)

    def velocity_divergence(self, x: Tensor, t: float, c_emb: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        """The conditional velocity (N, C) at time t and its divergence (N,) float64: exact (one backward pass
        per dim; rows are independent, so the gradient of a column's sum is each row's own) or, given a
        ``probe`` (N, C), Hutchinson's e^T (dv/dx) e from one vector-Jacobian product."""
        tt = torch.full((1,), t * TIME_SCALE, device=x.device)  # one t for all rows
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = flow_velocity(self.net, x, tt, c_emb, 1.0, self.prediction == "x", max(t, self.t_eps))  # (N, C)
            if probe is not None:
                div = (torch.autograd.grad(v, x, probe)[0] * probe).sum(1)  # (N,)
            else:
                C = x.shape[1]
                div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < C - 1)[0][:, i] for i in range(C))
        return v.detach().to(x.dtype), div.double()
