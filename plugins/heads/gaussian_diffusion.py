"""Discrete Gaussian diffusion with eps prediction and learned-range variance (improved DDPM / ADM).

The math MAR's Diffusion Loss trains and samples with: a 1000-step cosine
noise schedule, the simple eps MSE plus the variational bound term for the
learned variance, and "respaced" sampling on a subset of the timesteps.

Written here rather than taken from diffusers because (1) diffusers has no
training loss for the learned-range variance (the VLB term), and (2) parity
with the official sampler to 1e-5 needs its float64 coefficient tables: at
t=999 the cosine schedule has alpha_bar ~ 2.4e-9, so 1/sqrt(alpha_bar) ~ 2e4
multiplies any rounding in the x0 formula.

References:
    Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021 (cosine schedule,
        learned range, L_hybrid, respacing).
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021 (guided_diffusion code layout).
    MAR official models/diffloss.py + diffusion/ (create_diffusion(timestep_respacing, noise_schedule="cosine")).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# the per-step coefficients of the reverse process (``GaussianDiffusion.step_scalars``), in table order
STEP_COEFFICIENTS = ("log_betas", "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "nonzero")


# --------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------
def cosine_betas(num_steps: int, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal eq. 17: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas clipped at 0.999."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]


def linear_betas(num_steps: int) -> list[float]:
    """DDPM's linear schedule, scaled so that any number of steps spans the same noise levels."""
    scale = 1000 / num_steps
    lo, hi = scale * 0.0001, scale * 0.02
    return [lo + (hi - lo) * i / (num_steps - 1) for i in range(num_steps)]


BETA_SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def space_timesteps(num_steps: int, sections: str | int) -> list[int]:
    """The timesteps kept by respacing, as the improved-DDPM code picks them.

    ``sections`` "25" keeps 25 evenly strided steps of ``num_steps`` (rounded
    with Python's round-half-to-even, as the original); "10,15" splits the range
    into two halves with 10 and 15 steps.
    """
    counts = [int(x) for x in str(sections).split(",")]
    size_per, extra = divmod(num_steps, len(counts))
    start, taken = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} diffusion steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        taken.update(start + round(k * stride) for k in range(count))
        start += size
    return sorted(taken)


# --------------------------------------------------------------------------------------
# Small distributions helpers (per-row, in bits)
# --------------------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log-likelihood of x in [-1,1] quantised to 256 bins (DDPM's decoder term), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------
class GaussianDiffusion(nn.Module):
    """Coefficient tables (float64 buffers) and the per-row formulas of one diffusion process.

    ``timestep_map[i]`` is the original timestep of step i (identity unless
    respaced); the network is always called with original timesteps.
    """

    def __init__(self, betas: list[float], timestep_map: list[int] | None = None):
        super().__init__()
        b = torch.tensor(betas, dtype=torch.float64)
        ac = torch.cumprod(1.0 - b, dim=0)
        ac_prev = torch.cat([b.new_ones(1), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": b,
            "log_betas": torch.log(b),
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": torch.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t=0; its log is clipped to the value at t=1 (improved DDPM)
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "posterior_mean_coef1": b * torch.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * torch.sqrt(1.0 - b) / (1.0 - ac),
        }
        for name, value in tables.items():
            self.register_buffer(name, value, persistent=False)
        tmap = torch.arange(len(betas)) if timestep_map is None else torch.tensor(timestep_map)
        self.register_buffer("timestep_map", tmap.long(), persistent=False)
        self.num_steps = len(betas)

    @classmethod
    def create(cls, schedule: str = "cosine", num_steps: int = 1000, respacing: str | int | None = None):
        """The full process, or the one respaced to ``respacing`` steps (improved DDPM sec. 4)."""
        betas = BETA_SCHEDULES[schedule](num_steps)
        if respacing in (None, "", str(num_steps), num_steps):
            return cls(betas)
        use = space_timesteps(num_steps, respacing)
        base = torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0).tolist()
        new_betas, last = [], 1.0
        for i in use:
            new_betas.append(1.0 - base[i] / last)
            last = base[i]
        return cls(new_betas, use)

    def _at(self, name: str, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Table value per row as a column (N, 1): float32, as the original extracts it, unless ``like`` is
        float64 (the likelihood computes its bound in float64, ``vb_terms``)."""
        dtype = torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32
        return getattr(self, name)[t].to(dtype)[:, None]

    # -- forward process ------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return (self._at("sqrt_alphas_cumprod", t, x0) * x0
                + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_variance_clipped", t, xt)

    # -- reverse process ------------------------------------------------------------------
    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self._at("sqrt_recip_alphas_cumprod", t, xt) * xt
                - self._at("sqrt_recipm1_alphas_cumprod", t, xt) * eps)

    def p_mean_variance(self, eps: Tensor, var_values: Tensor, xt: Tensor, t: Tensor,
                        x0_clip: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log_variance, x0) of p(x_{t-1} | x_t) from the network's eps and variance outputs (N,C).

        The log-variance interpolates between the posterior's and beta_t with
        frac = (v + 1) / 2 ("learned range"). ``x0_clip`` clamps the predicted x0
        to [-clip, clip]; None keeps the official unclipped behaviour.
        """
        min_log = self._at("posterior_log_variance_clipped", t, xt)
        max_log = self._at("log_betas", t, xt)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.predict_x0(xt, t, eps)
        if x0_clip is not None:
            x0 = x0.clamp(-x0_clip, x0_clip)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    def step_scalars(self, i: int) -> dict[str, float]:
        """The coefficients of step i as Python floats holding their float32 values (cached), plus
        ``nonzero`` (0.0 at the last step, which adds no noise).

        A sampler applies one step to every row, so it multiplies by scalars instead of gathering
        a (N, 1) column per coefficient at every step; float32 tensor x float32-valued scalar gives
        the same bits as the gathered column, so ``reverse_step`` equals ``p_mean_variance`` + noise.
        """
        if getattr(self, "_scalars", None) is None:
            names = STEP_COEFFICIENTS[:-1]
            tables = {n: getattr(self, n).float().cpu().tolist() for n in names}
            self._scalars = [{**{n: tables[n][k] for n in names}, "nonzero": float(k != 0)}
                             for k in range(self.num_steps)]
        return self._scalars[i]

    def step_table(self, steps: list[int], device: torch.device) -> Tensor:
        """``step_scalars`` of ``steps`` as a float32 (len(steps), 7) table, columns in ``STEP_COEFFICIENTS``
        order (the same float32 values: a compiled sampler takes them as one tensor input)."""
        rows = [[self.step_scalars(i)[n] for n in STEP_COEFFICIENTS] for i in steps]
        return torch.tensor(rows, dtype=torch.float32, device=device)

    # -- training ---------------------------------------------------------------------------
    def training_losses(self, net_out: Tensor, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """L_hybrid per row: eps MSE + the VLB term (bits/dim) that trains only the variance output."""
        C = x0.shape[1]
        eps, var_values = net_out[:, :C], net_out[:, C:]
        mse = ((noise - eps) ** 2).mean(dim=1)
        # the VLB term sees a frozen eps so it only trains the variance (improved DDPM sec. 3.1)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var, _ = self.p_mean_variance(eps.detach(), var_values, xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / math.log(2.0)
        # the decoder NLL replaces the KL only where t == 0 (~1 row in 1000): compute it on those rows alone
        # (the official evaluates it on every row and selects with where; same values, ~15 fewer passes)
        first = (t == 0).nonzero()[:, 0]
        nll = -discretized_gaussian_log_likelihood(x0[first], mean[first], 0.5 * log_var[first]).mean(dim=1)
        vb = kl.index_put((first,), nll / math.log(2.0))
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- likelihood (nats, float64) ----------------------------------------------------------
    def prior_kl(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per row (N,), summed over the C dims (Ho et al. eq. 5). Exact,
        no noise drawn; ~1e-9 nats for the cosine schedule, whose last alpha_bar is 2.4e-9."""
        T = torch.full(x0.shape[:1], self.num_steps - 1, dtype=torch.long, device=x0.device)
        mean = self._at("sqrt_alphas_cumprod", T, x0) * x0  # (N, C)
        log_var = torch.log1p(-self._at("alphas_cumprod", T, x0))  # (N, 1): log(1 - alpha_bar_T)
        return normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var)).sum(1)  # (N,)

    def vb_terms(self, eps: Tensor, var_values: Tensor, x0: Tensor, xt: Tensor, t: Tensor,
                 x0_clip: float | None = None) -> Tensor:
        """The bound's term at each row's timestep t (M,), in nats summed over the C dims (M,):
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1 and the decoder's -log p(x_0 | x_1) at t = 0.

        Tokens are continuous, so the decoder term is the Gaussian log-density N(x_0; mean, var), not DDPM's
        8-bit discretised likelihood that ``training_losses`` uses for images in [-1, 1]. Pass float64
        inputs to compute with the float64 tables throughout (the x_0 formula multiplies eps by
        1/sqrt(alpha_bar) ~ 2e4 at t = 999).
        """
        mean, log_var, _ = self.p_mean_variance(eps, var_values, xt, t, x0_clip)  # (M, C) each
        true_mean, true_log_var = self.q_posterior(x0, xt, t)  # (M, C), (M, 1)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).sum(1)  # (M,)
        decoder = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean) ** 2 * torch.exp(-log_var)).sum(1)  # (M,)
        return torch.where(t == 0, decoder, kl)  # (M,)


def reverse_step(eps: Tensor, var_values: Tensor, xt: Tensor, c: dict[str, float], noise: Tensor,
                 temperature: float = 1.0, x0_clip: float | None = None) -> Tensor:
    """x_{t-1} from the network's eps and variance outputs (N, C) with the step's scalar coefficients ``c``
    (``GaussianDiffusion.step_scalars``): ``p_mean_variance``'s formulas, term for term, then
    mean + exp(log_var / 2) * noise * temperature. A free function of tensors and floats, so a compiled
    sampling step (``torch.compile``) traces it without a table lookup by step index."""
    frac = (var_values + 1) / 2
    log_var = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
    x0 = c["sqrt_recip_alphas_cumprod"] * xt - c["sqrt_recipm1_alphas_cumprod"] * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * xt
    return mean + c["nonzero"] * torch.exp(0.5 * log_var) * noise * temperature
