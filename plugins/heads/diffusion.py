"""MAR's Diffusion Loss: a small AdaLN MLP trained as a per-token denoising diffusion model.

Training draws t ~ U{0..999} and noise per row and minimises eps-MSE + VLB
(learned variance). Three samplers, all with classifier-free guidance on eps:

- ``ddpm`` (default, official): the respaced DDPM reverse process with the
  learned variance; ``temperature`` scales the noise added at every step.
- ``ddim`` and ``dpm++``: deterministic ODE solvers (diffusers' DDIMScheduler,
  eta 0, and DPMSolverMultistepScheduler, DPM-Solver++ 2M); there is no noise
  after the start, so ``temperature`` scales the initial noise x_T (for a
  Gaussian target the probability-flow ODE is affine in x_T, so the sample
  spread shrinks by exactly that factor). The learned variance is not used.

How diffusers' schedulers are fitted to this model (checked against diffusers 0.42):
the training schedule is passed as ``trained_betas`` (our cosine betas equal
diffusers' ``squaredcos_cap_v2`` in float32; tests/test_heads.py checks it), and
the schedulers are given x0 (``prediction_type="sample"``), which the head forms
from its eps half with the same float64 tables as the DDPM path and clips with
``x0_clip``. Their own options do not fit: ``variance_type="learned_range"``
keeps ``model_output[:, :3]`` (the eps half of a 6-channel RGB image model; our
output is (N, 2C)); DPM-Solver's x0 "thresholding" is Imagen's per-sample quantile
rescaling (a plain clip only when the bound is 1.0) and raises a TypeError on
(N, C) tensors. Clipping x0 in the head keeps ``x0_clip`` the same plain clamp
for all three samplers.

References:
    MAR sec. 3.2-3.3 ("Diffusion Loss"), official models/diffloss.py; improved DDPM (see gaussian_diffusion.py).
    Song et al., "Denoising Diffusion Implicit Models", ICLR 2021 (DDIM).
    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024 ("trailing" spacing).
"""
from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from plugins.heads.gaussian_diffusion import STEP_COEFFICIENTS, GaussianDiffusion, reverse_step
from sandbox.kinds import Head
from sandbox.layers import AdaLNMLP


def ddpm_step(net: AdaLNMLP, x: Tensor, t_emb: Tensor, c_emb: Tensor, noise: Tensor, c: dict[str, float],
              cfg: float, temperature: float, x0_clip: float | None) -> Tensor:
    """One reverse DDPM step for every row: x_t (N, C) -> x_{t-1} (N, C).

    ``t_emb`` (1, W) is the step's time embedding, ``c_emb`` (N or 2N, W) the embedded condition
    (with guidance: conditional rows, then unconditional), ``c`` the step's coefficients
    (``GaussianDiffusion.step_scalars``). The official order of operations, so ``sample`` equals
    ``denoise_step`` bit for bit (compiled: ``ddpm_steps``).
    """
    N, C = x.shape
    guided = c_emb.shape[0] == 2 * N
    y_act = F.silu(t_emb + c_emb)  # (N or 2N, W)
    h = net.input_proj(torch.cat([x, x]) if guided else x)  # (N or 2N, W): both branches see x_t
    out = net.forward_hidden(h, y_act)  # (N or 2N, 2C)
    eps, var = out[:, :C], out[:, C:]
    if guided:  # official forward_with_cfg: guided eps, the conditional half's variance
        eps_c, eps_u = eps[:N], eps[N:]
        eps, var = eps_u + cfg * (eps_c - eps_u), var[:N]
    return reverse_step(eps.float(), var.float(), x, c, noise, temperature, x0_clip)  # (N, C)


def ddpm_steps(net: AdaLNMLP, x: Tensor, t_embs: Tensor, c_emb: Tensor, noises: Tensor, table: Tensor,
               cfg: float, temperature: float, x0_clip: float | None) -> Tensor:
    """S consecutive ``ddpm_step``s with their inputs stacked: t_embs (S, 1, W), noises (S, N, C), the
    coefficient table (S, 7) (``GaussianDiffusion.step_table``). What ``torch.compile`` sees as one graph."""
    for s in range(t_embs.shape[0]):
        c = {name: table[s, j] for j, name in enumerate(STEP_COEFFICIENTS)}
        x = ddpm_step(net, x, t_embs[s], c_emb, noises[s], c, cfg, temperature, x0_clip)  # (N, C)
    return x


@cache
def compiled_ddpm_steps():
    """``ddpm_steps`` under ``torch.compile``, built once per process. ``dynamic=True``: the number of rows
    changes at every MAR iteration and the guidance scale with the linear schedule; neither recompiles
    (a shorter last run of steps compiles once more)."""
    return torch.compile(ddpm_steps, dynamic=True)


class DiffusionHead(Head):
    """Diffusion Loss (MAR): eps-prediction DDPM on each token, learned variance; DDPM, DDIM or DPM-Solver++ sampling."""

    contract_args = {"width": 32, "depth": 1, "num_sampling_steps": 5}
    SAMPLERS = ("ddpm", "ddim", "dpm++")

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 1024,  # MAR-B head width (L: 1280, H: 1536)
        depth: int = 6,  # MAR-B: 6 residual blocks (L: 8, H: 12)
        noise_schedule: str = "cosine",  # official: cosine (improved DDPM)
        train_steps: int = 1000,  # official: 1000 training timesteps
        num_sampling_steps: int = 100,  # official: 100 respaced steps for generation (any sampler)
        x0_clip: float | None = None,  # None = official (no clipping); 1.0 for data bounded in [-1, 1]
        grad_checkpointing: bool = False,  # recompute blocks in backward to save memory
        sampler: Literal["ddpm", "ddim", "dpm++"] = "ddpm",  # official: respaced DDPM (the parity tests use it)
    ):
        super().__init__(token_dim, cond_dim)
        if sampler not in self.SAMPLERS:  # jsonargparse checks recipes; this guards direct construction
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(self.SAMPLERS)}")
        # respacing DDPM to one step keeps only t=0, which has no posterior variance (the official code fails too)
        low = 2 if sampler == "ddpm" else 1
        if not low <= num_sampling_steps <= train_steps:
            raise ValueError(f"num_sampling_steps must be in [{low}, {train_steps}] for sampler {sampler!r}, "
                             f"got {num_sampling_steps}")
        self.x0_clip, self.sampler, self.num_sampling_steps = x0_clip, sampler, num_sampling_steps
        self.width = width
        self.compiled_sampling = False  # set by compile_sampling (--compile); a runtime choice, not in checkpoints
        # the network predicts eps (C channels) and the variance interpolation (C channels)
        self.net = AdaLNMLP(token_dim, width, 2 * token_dim, cond_dim, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.create(noise_schedule, train_steps)
        self.sample_diffusion = GaussianDiffusion.create(noise_schedule, train_steps, num_sampling_steps)
        self.scheduler = self.make_scheduler(sampler, self.train_diffusion.betas.tolist())

    @staticmethod
    def make_scheduler(sampler: str, betas: list[float]):
        """The diffusers scheduler of an ODE sampler on the training betas, fed x0 predictions; None for ddpm."""
        if sampler == "ddim":
            # "trailing" spacing starts at t = T-1 like the respaced DDPM (the default "leading" would start at
            # 950 of 1000 with 20 steps, where the cosine schedule still keeps 7% of the signal). diffusers' DDIM
            # steps to t - T // N, which is one timestep off the next listed t when N does not divide T.
            return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, prediction_type="sample",
                                 clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if sampler == "dpm++":
            # DPM-Solver++(2M), the paper's choice for guided sampling. lambda_min_clipped: diffusers documents the
            # clip of log(alpha/sigma) as critical for the cosine schedule; -5.1 starts at t=995 instead of 999
            # (1/alpha ~ 160 instead of 2e4 on the eps error): without it, an unclipped young model's samples explode
            return DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas,
                                               prediction_type="sample", algorithm_type="dpmsolver++",
                                               solver_order=2, lower_order_final=True, final_sigmas_type="zero",
                                               lambda_min_clipped=-5.1)
        return None

    # steps per compiled call: one call costs ~75 us of guards and argument handling on the CPU, and a longer
    # graph compiles longer (10 steps: ~45 s once per machine, ~11 s per process after; 64 fixture images
    # 1.19 -> 1.10 s against one step per call)
    compiled_steps_per_call: int = 10

    def compile_sampling(self) -> None:
        """Run the DDPM sampler's steps through ``torch.compile`` (``compiled_ddpm_steps``): one fused kernel
        per elementwise chain between the products, ``compiled_steps_per_call`` steps per call. 64 fixture
        images on the 2-core CPU: 1.39 -> 1.12 s (README, Performance); the first call compiles. The samples
        equal the eager ones within float rounding (the fused kernels round differently), not bit for bit.
        The ODE samplers keep their eager loop (diffusers' schedulers step in Python)."""
        self.compiled_sampling = True

    # ----------------------------------------------------------------------------------
    def losses(self, target: Tensor, cond: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-row loss terms for given timesteps t (N,) and noise (N,C)."""
        xt = self.train_diffusion.q_sample(target, t, noise)  # (N, C)
        out = self.net(xt, t, cond)  # (N, 2C)
        return self.train_diffusion.training_losses(out, target, xt, t, noise)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        N = target.shape[0]
        t = torch.randint(0, self.train_diffusion.num_steps, (N,), device=target.device, generator=generator)
        noise = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)
        return self.losses(target, cond, t, noise)["loss"]  # (N,)

    # ----------------------------------------------------------------------------------
    def guided_output(self, x: Tensor, t: Tensor, c_emb: Tensor, cfg: float) -> tuple[Tensor, Tensor]:
        """Network output at step t (original timestep) -> (eps, variance values) for the N rows of x.

        With guidance, ``c_emb`` holds 2N rows (conditional first, then unconditional);
        eps = eps_u + cfg * (eps_c - eps_u) and the variance comes from the conditional half,
        as in the official ``forward_with_cfg``.
        """
        C, N = self.token_dim, x.shape[0]
        guided = c_emb.shape[0] == 2 * N
        if guided:
            x, t = torch.cat([x, x]), (torch.cat([t, t]) if t.numel() > 1 else t)  # both branches see the same x_t
        out = self.net.forward_embedded(x, t, c_emb)  # (N or 2N, 2C)
        eps, var = out[:, :C], out[:, C:]
        if guided:
            eps_c, eps_u = eps[:N], eps[N:]
            eps, var = eps_u + cfg * (eps_c - eps_u), var[:N]
        return eps, var  # (N, C), (N, C)

    def p_step(self, x: Tensor, t: Tensor, c_emb: Tensor, cfg: float) -> tuple[Tensor, Tensor, Tensor]:
        """One reverse step at respaced indices t, (N,) or (1,) for all rows -> (mean, log_variance, x0)."""
        d = self.sample_diffusion
        eps, var = self.guided_output(x, d.timestep_map[t], c_emb, cfg)  # the network sees original timesteps
        return d.p_mean_variance(eps.float(), var.float(), x, t, self.x0_clip)

    def denoise_step(self, x: Tensor, t: Tensor, c_emb: Tensor, cfg: float, noise: Tensor, temperature: float = 1.0
                     ) -> Tensor:
        """x_t -> x_{t-1}: mean + exp(log_var / 2) * noise * temperature (no noise where t == 0)."""
        mean, log_var, _ = self.p_step(x, t, c_emb, cfg)
        nonzero = (t != 0).to(x.dtype)[:, None]
        return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature

    def _step_embeddings(self, device: torch.device) -> list[Tensor]:
        """The time embedding of every sampling step, (1, W) each, computed as a one-row batch like the step
        loop would; kept while the weights, device and autocast setting are unchanged (a MAR sampling call
        runs this loop once per iteration: 16-256 times with the same 100 timesteps)."""
        params = tuple(self.net.time_embed.parameters())
        key = (str(device), torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
               tuple((p.data_ptr(), p._version) for p in params))
        cached = getattr(self, "_t_cache", None)
        if cached is None or cached[0] != key:
            steps = self.sample_diffusion.timestep_map.tolist()  # original timesteps of the respaced steps
            embed = [self.net.time_embed(torch.full((1,), s, device=device, dtype=torch.long)) for s in steps]
            self._t_cache = cached = (key, embed)
        return cached[1]

    def predict_x0(self, x: Tensor, t: Tensor, c_emb: Tensor, cfg: float) -> Tensor:
        """x0 at original timestep t (1,) from the guided eps, clipped to ``x0_clip`` when set (N, C)."""
        eps, _ = self.guided_output(x, t, c_emb, cfg)  # the variance half is for the stochastic DDPM only
        x0 = self.train_diffusion.predict_x0(x, t, eps.float())  # float64 tables, as in the DDPM path
        return x0 if self.x0_clip is None else x0.clamp(-self.x0_clip, self.x0_clip)

    def sample_ode(self, x: Tensor, c_emb: Tensor, cfg: float) -> Tensor:
        """Run the DDIM / DPM-Solver++ scheduler from x = x_T (N, C) to x_0; deterministic."""
        sched = self.scheduler
        sched.set_timesteps(self.num_sampling_steps)  # also resets the multistep history
        for t in sched.timesteps:
            x0 = self.predict_x0(x, t.reshape(1).to(x.device), c_emb, cfg)  # (N, C)
            x = sched.step(x0, t, x).prev_sample  # (N, C)
        return x

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """The respaced reverse process for every row at once; per step, the same numbers as ``denoise_step``
        (tests/test_fast_paths.py checks it; compiled, the same within float rounding: ``compile_sampling``)
        with the work the official repeats at every step done once: the condition is embedded once per call,
        the timestep once per step (one row, broadcast), SiLU(condition) once per step for all blocks, and
        the diffusion coefficients are scalars."""
        N, C = cond.shape[0], self.token_dim
        guided = uncond is not None and cfg != 1.0
        net, d = self.net, self.sample_diffusion
        c_emb = net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        x = torch.randn(N, C, device=cond.device, generator=generator)  # (N, C)
        if self.scheduler is not None:  # ODE samplers: no noise after x_T, so temperature scales x_T
            return self.sample_ode(x * temperature, c_emb, cfg)
        t_emb = self._step_embeddings(cond.device)  # (1, W) per step: one t for all rows
        if self.compiled_sampling:
            return self.sample_compiled(x, t_emb, c_emb, cfg, temperature, generator)
        for i in reversed(range(d.num_steps)):
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = ddpm_step(net, x, t_emb[i], c_emb, noise, d.step_scalars(i), cfg, temperature, self.x0_clip)
        return x

    def sample_compiled(self, x: Tensor, t_emb: list[Tensor], c_emb: Tensor, cfg: float, temperature: float,
                        generator: torch.Generator | None) -> Tensor:
        """The loop of ``sample`` through ``compiled_ddpm_steps``, ``compiled_steps_per_call`` steps per call:
        the noise is drawn up front in the loop's order (the same numbers), the step inputs are stacked."""
        d, K = self.sample_diffusion, self.compiled_steps_per_call
        steps = list(reversed(range(d.num_steps)))
        noises = torch.stack([torch.randn(x.shape, device=x.device, generator=generator) for _ in steps])
        t_embs = torch.stack([t_emb[i] for i in steps])  # (S, 1, W)
        table = d.step_table(steps, x.device)  # (S, 7)
        run = compiled_ddpm_steps()
        for a in range(0, len(steps), K):
            x = run(self.net, x, t_embs[a:a + K], c_emb, noises[a:a + K], table[a:a + K], cfg, temperature,
                    self.x0_clip)  # (N, C)
        return x
