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

Likelihood (``nll``): the variational bound summed over all 1000 training
timesteps (Ho et al. eq. 5, as improved DDPM evaluates it), with a continuous
Gaussian decoder term, in float64; optionally an unbiased estimate from k
stratified timesteps per token (``nll_timesteps``).

References:
    MAR sec. 3.2-3.3 ("Diffusion Loss"), official models/diffloss.py; improved DDPM (see gaussian_diffusion.py).
    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (the bound, eq. 5).
    Song et al., "Denoising Diffusion Implicit Models", ICLR 2021 (DDIM).
    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024 ("trailing" spacing).
"""
from __future__ import annotations

import numbers
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from sandbox.core.adaln_mlp import AdaLNMLP
from sandbox.core.contracts import Head
from sandbox.plugins.heads.gaussian_diffusion import STEP_COEFFICIENTS, GaussianDiffusion, reverse_step


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


def compiled_runs(S: int, K: int) -> list[tuple[int, int]]:
    """[start, end) of each compiled call over S steps: runs of K, then the rest in decreasing powers of two
    (K = 10, S = 47: 10, 10, 10, 10, 4, 2, 1). The compiled loop is unrolled, so each run length is a graph
    of its own: a step schedule's many counts then need only K's graph and the powers of two below K (5 for
    K = 10), within dynamo's limit of 8 graphs per function that every remainder from 1 to K - 1 would pass."""
    runs, a = [], 0
    while S - a >= K:
        runs.append((a, a + K))
        a += K
    while a < S:
        n = 1 << ((S - a).bit_length() - 1)  # the largest power of two <= the steps left
        runs.append((a, a + n))
        a += n
    return runs


@cache
def compiled_ddpm_steps():
    """``ddpm_steps`` under ``torch.compile``, built once per process. ``dynamic=True``: the number of rows
    changes at every MAR iteration and the guidance scale with the linear schedule; neither recompiles
    (each shorter run length compiles once more: ``compiled_runs``)."""
    return torch.compile(ddpm_steps, dynamic=True)


def stratum_edges(T: int, k: int, power: float = 3.0) -> list[int]:
    """k strata of the KL timesteps 1..T-1 for ``DiffusionHead.nll_plan``: edges (k+1,) from 1 to T, spaced as
    1 + (T-1) (j/k)^power, each stratum at least one timestep wide.

    Cubic, not even: the bound's terms fall off steeply away from the data end (the smallest steps of the
    schedule carry the most, for data of any spread), so narrow strata there cut the estimate's spread.
    Measured with the exact predictor of a 4-dim Gaussian (tests/test_likelihood.py), the std of one estimate:
    k = 10: 5.1 nats cubic, 22.6 even; k = 50: 2.3 cubic; the full sum 1.9.
    """
    e = [round(1 + (T - 1) * (j / k) ** power) for j in range(k + 1)]
    for j in range(1, k + 1):  # the first strata: at least one timestep each
        e[j] = max(e[j], e[j - 1] + 1)
    e[k] = T
    for j in range(k - 1, -1, -1):  # and room for the last ones (k <= T - 1 keeps e[0] = 1)
        e[j] = min(e[j], e[j + 1] - 1)
    return e


class DiffusionHead(Head):
    """Diffusion Loss (MAR): eps-prediction DDPM on each token, learned variance; DDPM, DDIM or DPM-Solver++ sampling."""

    contract_args = {"width": 32, "depth": 1, "num_sampling_steps": 5}
    resumable_args = ("grad_checkpointing",)  # memory, not what is trained
    SAMPLERS = ("ddpm", "ddim", "dpm++")
    has_nll = True  # the variational bound (``nll``)
    supports_num_steps = True

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
        # nll: None sums the bound over all train_steps timesteps (exact sum, 1000 network calls per token); k draws
        # k stratified timesteps per row instead, an unbiased estimate at k + 1 calls. An init argument, not an
        # nll() argument: the core calls nll(target, cond, generator), and eval reaches it with --head_args
        nll_timesteps: int | None = None,
    ):
        super().__init__(token_dim, cond_dim)
        if sampler not in self.SAMPLERS:  # jsonargparse checks recipes; this guards direct construction
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(self.SAMPLERS)}")
        if nll_timesteps is not None and not 1 <= nll_timesteps <= train_steps - 1:
            raise ValueError(f"nll_timesteps must be None or in [1, {train_steps - 1}], got {nll_timesteps}")
        self.x0_clip, self.sampler = x0_clip, sampler
        self.noise_schedule, self.train_steps = noise_schedule, train_steps  # to respace for other step counts
        self.num_sampling_steps = self.check_steps(num_sampling_steps, "num_sampling_steps")
        self.nll_timesteps = nll_timesteps
        self.width = width
        self.compiled_sampling = False  # set by compile_sampling (--compile); a runtime choice, not in checkpoints
        # the network predicts eps (C channels) and the variance interpolation (C channels)
        self.net = AdaLNMLP(token_dim, width, 2 * token_dim, cond_dim, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.create(noise_schedule, train_steps)
        self.sample_diffusion = GaussianDiffusion.create(noise_schedule, train_steps, num_sampling_steps)
        self._respaced: dict[int, GaussianDiffusion] = {}  # other step counts' processes (``respaced``)
        self.scheduler = self.make_scheduler(sampler, self.train_diffusion.betas.tolist())

    @property
    def default_num_steps(self) -> int:
        return self.num_sampling_steps

    def check_steps(self, k, name: str = "num_steps") -> int:
        """A step count this sampler can take: [2, T] for DDPM, [1, T] for the ODE samplers."""
        # respacing DDPM to one step keeps only t=0, which has no posterior variance (the official code fails too)
        low = 2 if self.sampler == "ddpm" else 1
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not low <= k <= self.train_steps:
            raise ValueError(f"{name} must be in [{low}, {self.train_steps}] for sampler {self.sampler!r}, got {k!r}")
        return int(k)

    def respaced(self, num_steps: int | None) -> GaussianDiffusion:
        """The DDPM process respaced to ``num_steps`` (None: the configured ``sample_diffusion``), built once
        per count: a step schedule asks for the same few counts at every sampling call. The sampler reads its
        tables as Python numbers (``step_scalars``), so they stay on the CPU whatever the head's device."""
        if num_steps is None or num_steps == self.num_sampling_steps:
            return self.sample_diffusion
        k = self.check_steps(num_steps)
        if k not in self._respaced:
            self._respaced[k] = GaussianDiffusion.create(self.noise_schedule, self.train_steps, k)
        return self._respaced[k]

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

    # steps per compiled call: every call pays guards and argument handling, and a longer graph compiles
    # longer; 10 balances the two (docs/performance.md, "Compiled")
    compiled_steps_per_call: int = 10

    def repeated_blocks(self) -> list[nn.Module]:
        return self.net.repeated_blocks()  # the MLP's residual blocks

    def compile_sampling(self) -> None:
        """Run the DDPM sampler's steps through ``torch.compile`` (``compiled_ddpm_steps``): one fused kernel
        per elementwise chain between the products, ``compiled_steps_per_call`` steps per call. 64 fixture
        images on the 2-core CPU sample faster (docs/performance.md); the first call compiles. The samples
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
    # Likelihood: the variational bound (Ho et al. 2020 eq. 5; improved DDPM sec. 2-3, its calc_bpd_loop)
    # rows per network call in ``nll``: all T timesteps of a row do not fit at once for a large batch
    # (32k rows x width 1024 x 4 bytes = 128 MB per activation), and fewer, larger calls run faster
    nll_rows_per_call: int = 32768

    @torch.no_grad()
    def nll(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Upper bound on -log p(x | z) per row (N,), in nats summed over the C dims: the variational bound
        L_T + sum_{t >= 1} L_{t-1} + L_0 over all ``train_steps`` timesteps (Ho et al. eq. 5), each KL term at
        an x_t drawn from q(x_t | x_0) with the ``generator`` (one draw per row and timestep, as improved DDPM's
        calc_bpd_loop), so the result is itself a one-sample estimate of the bound's expectation.

        Tokens are continuous: the decoder term L_0 is the Gaussian log-density of x_0 under p(x_0 | x_1), not
        the 8-bit discretised likelihood that training uses at t = 0. The reverse process is the full T-step one
        (the samplers respace it): the conditional eps (no guidance), the learned variance, x_0 clipped to
        ``x0_clip`` when set, as the samplers do. Computed in float64 with the head's own tables. With
        ``nll_timesteps`` = k the KL terms come from k stratified timesteps per row (``nll_plan``): unbiased
        for the same expectation, higher variance.

        Without ``x0_clip`` the term at t = T-1 can dominate for an imperfect model: x_0 = (x_t - sqrt(1 -
        alpha_bar) eps) / sqrt(alpha_bar) multiplies the eps error by 2e4 there (a briefly trained head on a
        Gaussian: +4.0 nats per 4-dim token from that one term; tests/test_likelihood.py).
        """
        d, N = self.train_diffusion, target.shape[0]
        x0 = target.double()  # (N, C)
        c_emb = self.net.embed_cond(cond)  # (N, W), once
        t, weight = self.nll_plan(N, target.device, generator)  # (N, K) each
        total = d.prior_kl(x0)  # (N,)
        cols = max(1, self.nll_rows_per_call // max(N, 1))
        for a in range(0, t.shape[1], cols):
            terms = self.vb_terms_at(x0, c_emb, t[:, a:a + cols], generator)  # (N, k)
            total = total + (terms * weight[:, a:a + cols]).sum(1)
        return total  # (N,)

    def nll_plan(self, n: int, device: torch.device, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        """The timesteps of the bound for n rows and the weight of each term: (t (n, K), weight (n, K)).

        All T timesteps with weight 1 by default. With ``nll_timesteps`` = k: t = 0 (the decoder term, large
        and unlike the others) with weight 1, then one timestep drawn uniformly from each of k strata of
        1..T-1 (``stratum_edges``), weighted by its stratum's size -- stratified sampling, unbiased for the sum.
        """
        T, k = self.train_diffusion.num_steps, self.nll_timesteps
        if k is None or k >= T - 1:
            t = torch.arange(T, device=device).expand(n, T)  # (n, T)
            return t, torch.ones(n, T, dtype=torch.float64, device=device)
        edges = torch.tensor(stratum_edges(T, k), device=device)  # (k+1,) stratum j is [edges[j], edges[j+1])
        size = edges[1:] - edges[:-1]  # (k,) >= 1
        u = torch.rand(n, k, dtype=torch.float64, device=device, generator=generator)  # (n, k)
        drawn = edges[:-1] + torch.minimum((u * size).long(), size - 1)  # (n, k) uniform within each stratum
        t = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=device), drawn], dim=1)  # (n, k+1)
        weight = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=device),
                            size.to(torch.float64).expand(n, k)], dim=1)  # (n, k+1)
        return t, weight

    def vb_terms_at(self, x0: Tensor, c_emb: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """The bound's terms (nats, float64) at timesteps t (N, k) for rows x0 (N, C) float64 -> (N, k)."""
        N, k = t.shape
        C, d = self.token_dim, self.train_diffusion
        tf = t.reshape(-1)  # (N*k,) row n's timesteps together
        x0r = x0.repeat_interleave(k, dim=0)  # (N*k, C)
        noise = torch.randn(x0r.shape, dtype=torch.float64, device=x0.device, generator=generator)  # (N*k, C)
        xt = d.q_sample(x0r, tf, noise)  # (N*k, C) float64
        x_in = xt.to(c_emb.dtype)  # the network's own precision
        out = self.net.forward_embedded(x_in, tf, c_emb.repeat_interleave(k, dim=0)).double()  # (N*k, 2C)
        return d.vb_terms(out[:, :C], out[:, C:], x0r, xt, tf, self.x0_clip).view(N, k)

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

    def _step_embeddings(self, device: torch.device, d: GaussianDiffusion | None = None) -> list[Tensor]:
        """The time embedding of every sampling step of ``d`` (default ``sample_diffusion``), (1, W) each,
        computed as a one-row batch like the step loop would; kept per step count while the weights, device
        and autocast setting are unchanged (a MAR sampling call runs this loop once per iteration: 16-256
        times with the same 100 timesteps, or a step schedule's few counts)."""
        d = self.sample_diffusion if d is None else d
        params = tuple(self.net.time_embed.parameters())
        key = (str(device), torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
               tuple((p.data_ptr(), p._version) for p in params))
        cached = getattr(self, "_t_cache", None)
        if cached is None or cached[0] != key:
            self._t_cache = cached = (key, {})
        if d.num_steps not in cached[1]:
            steps = d.timestep_map.tolist()  # original timesteps of the respaced steps
            cached[1][d.num_steps] = [self.net.time_embed(torch.full((1,), s, device=device, dtype=torch.long))
                                      for s in steps]
        return cached[1][d.num_steps]

    def predict_x0(self, x: Tensor, t: Tensor, c_emb: Tensor, cfg: float) -> Tensor:
        """x0 at original timestep t (1,) from the guided eps, clipped to ``x0_clip`` when set (N, C)."""
        eps, _ = self.guided_output(x, t, c_emb, cfg)  # the variance half is for the stochastic DDPM only
        x0 = self.train_diffusion.predict_x0(x, t, eps.float())  # float64 tables, as in the DDPM path
        return x0 if self.x0_clip is None else x0.clamp(-self.x0_clip, self.x0_clip)

    def sample_ode(self, x: Tensor, c_emb: Tensor, cfg: float, num_steps: int | None = None) -> Tensor:
        """Run the DDIM / DPM-Solver++ scheduler from x = x_T (N, C) to x_0 in ``num_steps`` (None: the
        configured count); deterministic."""
        sched = self.scheduler
        k = self.num_sampling_steps if num_steps is None else self.check_steps(num_steps)
        sched.set_timesteps(k)  # also resets the multistep history
        for t in sched.timesteps:
            x0 = self.predict_x0(x, t.reshape(1).to(x.device), c_emb, cfg)  # (N, C)
            x = sched.step(x0, t, x).prev_sample  # (N, C)
        return x

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None, num_steps: int | None = None) -> Tensor:
        """The respaced reverse process for every row at once; per step, the same numbers as ``denoise_step``
        (tests/test_fast_paths.py checks it; compiled, the same within float rounding: ``compile_sampling``)
        with the work the official repeats at every step done once: the condition is embedded once per call,
        the timestep once per step (one row, broadcast), SiLU(condition) once per step for all blocks, and
        the diffusion coefficients are scalars.

        ``num_steps`` (None: ``num_sampling_steps``): DDPM runs the process respaced to it (``respaced``), the
        ODE samplers set their schedulers' timesteps to it; one network call per step either way."""
        N, C = cond.shape[0], self.token_dim
        guided = uncond is not None and cfg != 1.0
        net = self.net
        d = self.respaced(num_steps) if self.scheduler is None else None  # checks num_steps before any work
        c_emb = net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        x = torch.randn(N, C, device=cond.device, generator=generator)  # (N, C)
        if self.scheduler is not None:  # ODE samplers: no noise after x_T, so temperature scales x_T
            return self.sample_ode(x * temperature, c_emb, cfg, num_steps)
        t_emb = self._step_embeddings(cond.device, d)  # (1, W) per step: one t for all rows
        if self.compiled_sampling:
            return self.sample_compiled(x, t_emb, c_emb, cfg, temperature, generator, d)
        for i in reversed(range(d.num_steps)):
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = ddpm_step(net, x, t_emb[i], c_emb, noise, d.step_scalars(i), cfg, temperature, self.x0_clip)
        return x

    def sample_compiled(self, x: Tensor, t_emb: list[Tensor], c_emb: Tensor, cfg: float, temperature: float,
                        generator: torch.Generator | None, d: GaussianDiffusion | None = None) -> Tensor:
        """The loop of ``sample`` through ``compiled_ddpm_steps`` for the process ``d`` (default
        ``sample_diffusion``): ``compiled_steps_per_call`` steps per call, the rest in runs of powers of two
        (``compiled_runs``). Each run's inputs are stacked into tensors of their own, its noise drawn before
        it in the loop's order (the same numbers); slices of tensors stacked for all S steps would make the
        graphs guard on S, so every step count would compile again."""
        d = self.sample_diffusion if d is None else d
        steps = list(reversed(range(d.num_steps)))
        run = compiled_ddpm_steps()
        for a, b in compiled_runs(len(steps), self.compiled_steps_per_call):
            noises = torch.stack([torch.randn(x.shape, device=x.device, generator=generator) for _ in steps[a:b]])
            t_embs = torch.stack([t_emb[i] for i in steps[a:b]])  # (b - a, 1, W)
            table = d.step_table(steps[a:b], x.device)  # (b - a, 7)
            x = run(self.net, x, t_embs, c_emb, noises, table, cfg, temperature, self.x0_clip)  # (N, C)
        return x
