"""MAR's Diffusion Loss: a small AdaLN MLP trained as a per-token denoising diffusion model.

Training draws t ~ U{0..999} and noise per row and minimises eps-MSE + VLB
(learned variance). Sampling runs the respaced DDPM reverse process with the
noise scaled by ``temperature`` and classifier-free guidance on eps.

References:
    MAR sec. 3.2-3.3 ("Diffusion Loss"), official models/diffloss.py; improved DDPM (see gaussian_diffusion.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from plugins.heads.gaussian_diffusion import GaussianDiffusion
from sandbox.kinds import Head
from sandbox.layers import AdaLNMLP


class DiffusionHead(Head):
    """Diffusion Loss (MAR): eps-prediction DDPM on each token, learned variance, respaced sampling."""

    contract_args = {"width": 32, "depth": 1, "num_sampling_steps": 5}

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 1024,  # MAR-B head width (L: 1280, H: 1536)
        depth: int = 6,  # MAR-B: 6 residual blocks (L: 8, H: 12)
        noise_schedule: str = "cosine",  # official: cosine (improved DDPM)
        train_steps: int = 1000,  # official: 1000 training timesteps
        num_sampling_steps: int = 100,  # official: 100 respaced steps for generation
        x0_clip: float | None = None,  # None = official (no clipping); 1.0 for data bounded in [-1, 1]
        grad_checkpointing: bool = False,  # recompute blocks in backward to save memory
    ):
        super().__init__(token_dim, cond_dim)
        self.x0_clip = x0_clip
        self.width = width
        # the network predicts eps (C channels) and the variance interpolation (C channels)
        self.net = AdaLNMLP(token_dim, width, 2 * token_dim, cond_dim, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.create(noise_schedule, train_steps)
        self.sample_diffusion = GaussianDiffusion.create(noise_schedule, train_steps, num_sampling_steps)

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

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """The respaced reverse process for every row at once; per step, the same numbers as ``denoise_step``
        (tests/test_parity.py checks it) with the work the official repeats at every step done once: the
        condition is embedded once per call, the timestep once per step (one row, broadcast), SiLU(condition)
        once per step for all blocks, and the diffusion coefficients are scalars."""
        N, C = cond.shape[0], self.token_dim
        guided = uncond is not None and cfg != 1.0
        net, d = self.net, self.sample_diffusion
        c_emb = net.embed_cond(torch.cat([cond, uncond]) if guided else cond)  # (N or 2N, W), once
        t_emb = self._step_embeddings(cond.device)  # (1, W) per step: one t for all rows
        x = torch.randn(N, C, device=cond.device, generator=generator)  # (N, C)
        for i in reversed(range(d.num_steps)):
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            y_act = torch.nn.functional.silu(t_emb[i] + c_emb)  # (N or 2N, W)
            h = net.input_proj(torch.cat([x, x]) if guided else x)  # (N or 2N, W): both branches see x_t
            out = net.forward_hidden(h, y_act)  # (N or 2N, 2C)
            eps, var = out[:, :C], out[:, C:]
            if guided:  # official forward_with_cfg: guided eps, the conditional half's variance
                eps_c, eps_u = eps[:N], eps[N:]
                eps, var = eps_u + cfg * (eps_c - eps_u), var[:N]
            x = d.sample_step(eps.float(), var.float(), x, i, noise, temperature, self.x0_clip)  # (N, C)
        return x
