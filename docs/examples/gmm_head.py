"""A Gaussian-mixture head: each token is drawn from a mixture of K diagonal Gaussians predicted from z.

Training minimises the exact negative log-likelihood (no noise levels, no
sampling steps); sampling picks a component, then draws from it, in one shot.

References:
    Bishop, "Mixture Density Networks", 1994 (a network that outputs mixture parameters).
    GIVT: Tschannen, Eastwood, Mentzer, "Generative Infinite-Vocabulary Transformers", ECCV 2024
        (a Gaussian mixture per continuous token, in place of the softmax over a codebook).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sandbox import Head


class GMMHead(Head):
    """Mixture of K diagonal Gaussians per token (GIVT): exact likelihood, one-shot sampling."""

    contract_args = {"num_components": 3, "width": 16}  # tiny, for sandbox.testing.check_head
    has_nll = True  # exact: the mixture's density

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        num_components: int = 8,  # GIVT uses a few to a few dozen; 8 covers the ink/background modes of a patch
        width: int = 256,  # hidden width of the MLP that maps z to the mixture parameters
        min_std: float = 1e-3,  # floor on each std: a collapsing component would send the likelihood to infinity
    ):
        super().__init__(token_dim, cond_dim)
        self.num_components, self.min_std = num_components, min_std
        self.net = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, num_components * (1 + 2 * token_dim)))

    def mixture(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """cond (N,D) -> component logits (N,K), means (N,K,C), stds (N,K,C)."""
        K, C = self.num_components, self.token_dim
        out = self.net(cond).float()  # (N, K(1+2C)); float32 even under bf16 autocast
        logits, mean, raw_std = out.split([K, K * C, K * C], dim=1)
        std = nn.functional.softplus(raw_std) + self.min_std  # (N, K*C), > 0
        return logits, mean.unflatten(1, (K, C)), std.unflatten(1, (K, C))

    def nll(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact -log p(x | z) per row (N,), nats summed over the C dims: the mixture's log-density."""
        logits, mean, std = self.mixture(cond)  # (N, K), (N, K, C), (N, K, C)
        z = (target.float()[:, None] - mean) / std  # (N, K, C)
        log_prob = (-0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)  # (N, K): log N(x; mu_k, s_k)
        return -torch.logsumexp(logits.log_softmax(-1) + log_prob, dim=-1)  # (N,)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.nll(target, cond) / self.token_dim  # nats per dimension: the scale does not grow with the width

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        logits, mean, std = self.mixture(cond)  # (N, K), (N, K, C), (N, K, C)
        if uncond is not None and cfg != 1.0:
            # guidance extrapolates the mixture weights and means from the unconditional to the conditional
            # ones (this example's simple choice; the stds stay conditional)
            logits_u, mean_u, _ = self.mixture(uncond)
            logits = logits_u + cfg * (logits - logits_u)  # (N, K)
            mean = mean_u + cfg * (mean - mean_u)  # (N, K, C)
        probs = (logits / max(temperature, 1e-3)).softmax(-1)  # (N, K); a low temperature picks the top mode
        k = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
        pick = k[:, :, None].expand(-1, 1, self.token_dim)  # (N, 1, C)
        mu, sigma = mean.gather(1, pick)[:, 0], std.gather(1, pick)[:, 0]  # (N, C) each
        noise = torch.randn(mu.shape, generator=generator, device=mu.device)  # (N, C)
        return mu + temperature * sigma * noise  # (N, C)
