"""Cross-entropy over a VQ codebook: the categorical head of MAR's Table 1 baseline ("CrossEnt" on VQ-16 tokens).

A token is a codebook vector (``VQTokenizer``, ``quantize: true``), or m = p^2 of them when the tokenizer groups
p x p latent pixels into one token (channels ordered (c, p, q), the core's patchify layout). The head maps the
condition z (N, D) to logits over the K codebook entries for each of the token's m codes and treats the codes
as independent given z: p^2 categoricals, exact for patch 1 (m = 1). Their dependence within a token is left
to the transformer's z, as the diffusion head's per-token MLP leaves the dependence between tokens.

The network is a residual MLP on z: the diffusion head's ``AdaLNMLP`` blocks (LayerNorm, Linear, SiLU, Linear,
residual) without the adaptive modulation -- here z is the input, there is nothing else to condition -- at the
same default width and depth, so a CrossEnt-vs-Diffusion-Loss comparison (Table 1) changes the loss, not the
head's capacity. The output layer starts at zero: uniform logits, loss m ln K at step 0.

Training: the target index of a code is its nearest codebook row (the row itself for a quantised token: exact;
any continuous value would be snapped, which is why the core refuses this head on continuous tokenizers). The
loss is the cross-entropy of each code, summed over the token's codes: nats per token.
Sampling: classifier-free guidance on the logits, l = l_u + cfg (l_c - l_u) (as MaskGIT/Muse-style token
models guide), then logits / temperature (temperature 0: the argmax, its limit), then optionally only the
``top_k`` largest logits (VQGAN's sampler), then one draw per code from ``generator``.

References:
    MAR sec. 5.1 and Table 1 (cross-entropy on VQ-16 against Diffusion Loss on KL-16, equal model size);
    van den Oord et al., NeurIPS 2017 (VQ-VAE codebook indices as a categorical prior's targets);
    Esser et al., CVPR 2021 (VQGAN: top-k sampling of codebook indices);
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (the guidance formula, applied to logits).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sandbox.core.contracts import Head

ROWS_PER_CHUNK = 2**26  # nearest_code: at most this many (row, code) distances at once (256 MiB in float32)


# Copied from plugins.tokenizers.vq.nearest_code (a head must not import a tokenizer plugin; both must agree)
def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """The index of the nearest codebook row for every row: z (N, c), codebook (K, c) -> (N,) long.

    Exact Euclidean distances (cdist without the ||z||^2 - 2 z.e + ||e||^2 expansion), so a codebook row
    always finds itself, at distance 0.
    """
    z, codebook = z.detach().float(), codebook.detach().float()
    if not len(z):
        return z.new_zeros(0, dtype=torch.long)
    chunk = max(1, ROWS_PER_CHUNK // max(len(codebook), 1))
    return torch.cat([torch.cdist(part, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                      for part in z.split(chunk)])  # (N,)


class ResidualBlock(nn.Module):
    """x + MLP(LN(x)): the diffusion head's ResBlock without adaLN (the condition is this network's input)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))  # (N, W)


class LogitMLP(nn.Module):
    """z (N, D) -> logits (N, out): a linear embedding, ``depth`` residual blocks, LayerNorm, a zeroed output."""

    def __init__(self, cond_dim: int, width: int, depth: int, out_dim: int):
        super().__init__()
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))  # --compile compiles these
        self.norm_final = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        for m in self.modules():  # as the diffusion head's MLP: xavier linears, zero biases, a zero output layer
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.linear.weight)

    def forward(self, z: Tensor) -> Tensor:
        h = self.cond_embed(z)  # (N, W)
        for block in self.res_blocks:
            h = block(h)  # (N, W)
        return self.linear(self.norm_final(h))  # (N, out)


class CategoricalHead(Head):
    """Cross-entropy over the tokenizer's VQ codebook (K-way softmax per code); temperature, top-k, CFG on logits."""

    has_nll = True  # exact: the cross-entropy of the codes (``nll``)
    requires = ("codebook",)  # the core passes codebook=tokenizer.codebook (K, c); recipes never give it
    contract_args = {"width": 32, "depth": 1}

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        # (K, c) Tensor, injected by the core from the tokenizer (``requires``). Not annotated on purpose: jsonargparse
        # then lets a recipe value through to the core, which refuses it in one line instead of a parse error
        codebook=None,
        width: int = 1024,  # the diffusion head's MAR-B width: Table 1 compares the losses at equal capacity
        depth: int = 6,  # the diffusion head's MAR-B depth, for the same reason
        top_k: Optional[int] = None,  # sample among the k largest logits; None: the full softmax the loss trains
        codebook_size: Optional[int] = None,  # K the recipe expects; None: any (set it to catch a swapped tokenizer)
    ):
        super().__init__(token_dim, cond_dim)
        if codebook is None:
            raise ValueError("CategoricalHead needs the tokenizer's codebook; the core passes it (requires = "
                             "('codebook',)) from a VQ tokenizer with quantize true")
        if codebook.dim() != 2:
            raise ValueError(f"the codebook must be (K, c), got shape {tuple(codebook.shape)}")
        K, c = codebook.shape
        if codebook_size is not None and codebook_size != K:
            raise ValueError(f"head codebook_size is {codebook_size} but the tokenizer's codebook has {K} entries")
        if token_dim % c:
            raise ValueError(f"token_dim {token_dim} is not a multiple of the codebook's code dim {c}: a token "
                             "must hold whole codes")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.num_codes, self.code_dim, self.codes_per_token = int(K), int(c), token_dim // c  # K, c, m
        self.top_k = top_k
        # not persistent: the codebook belongs to the (frozen) tokenizer, which a MAR checkpoint never stores;
        # a run rebuilt for sampling takes it from the tokenizer again, so tokens and decoder cannot disagree
        self.register_buffer("codebook", codebook.detach().float().clone(), persistent=False)  # (K, c)
        self.net = LogitMLP(cond_dim, width, depth, self.codes_per_token * self.num_codes)

    # -- tokens <-> codebook indices ---------------------------------------------------------------------
    def indices(self, tokens: Tensor) -> Tensor:
        """Tokens (N, C) -> the index of each of their m codes (N, m): the nearest codebook row."""
        codes = rearrange(tokens, "n (c m) -> (n m) c", c=self.code_dim)  # (N m, c): channels are (c, p, q)
        return nearest_code(codes, self.codebook).view(tokens.shape[0], self.codes_per_token)  # (N, m)

    def tokens(self, indices: Tensor) -> Tensor:
        """Indices (N, m) -> tokens (N, C): the codebook rows in the core's (c, p, q) channel order."""
        return rearrange(self.codebook[indices], "n m c -> n (c m)")  # (N, C)

    def logits(self, cond: Tensor) -> Tensor:
        """cond (N, D) -> logits (N, m, K) in float32."""
        return self.net(cond).float().view(cond.shape[0], self.codes_per_token, self.num_codes)

    # -- training -----------------------------------------------------------------------------------------
    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cross-entropy of each code's codebook index, summed over the token's m codes: (N,) nats per token."""
        index = self.indices(target)  # (N, m)
        logits = self.logits(cond)  # (N, m, K)
        ce = F.cross_entropy(logits.flatten(0, 1), index.flatten(), reduction="none")  # (N m,)
        return ce.view(index.shape).sum(1)  # (N,)

    @torch.no_grad()
    def nll(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """-log p(codes | z) per row (N,), in nats summed over the token's m codes: exact (the loss itself).

        A probability mass of the codebook indices, not a density of the token's values: its bits per dimension
        (``sandbox eval --nll``, per token dim) compare between VQ runs of one codebook, not with a continuous
        head's, whose density depends on the tokens' scale."""
        return self.loss(target, cond, generator)

    # -- sampling -----------------------------------------------------------------------------------------
    def guided_logits(self, cond: Tensor, cfg: float = 1.0, uncond: Tensor | None = None) -> Tensor:
        """Logits (N, m, K), with guidance l_u + cfg (l_c - l_u) when ``uncond`` (N, D) is given and cfg != 1."""
        if uncond is None or cfg == 1.0:
            return self.logits(cond)
        l_c, l_u = self.logits(torch.cat([cond, uncond])).chunk(2)  # (N, m, K) each, one pass for both
        return l_u + cfg * (l_c - l_u)

    def draw(self, logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Logits (N, m, K) -> indices (N, m): softmax(logits / temperature) over the top_k; 0: the argmax."""
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if self.top_k is not None and self.top_k < self.num_codes:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]  # (N, m, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1).flatten(0, 1)  # (N m, K)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])  # (N, m)

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None, num_steps: int | None = None) -> Tensor:
        """cond (N, D) -> tokens (N, C), rows of the codebook. ``num_steps`` is accepted and ignored (one draw)."""
        return self.tokens(self.draw(self.guided_logits(cond, cfg, uncond), temperature, generator))
