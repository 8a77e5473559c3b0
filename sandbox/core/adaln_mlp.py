"""The AdaLN residual MLP that per-token heads are built on (MAR's "SimpleMLPAdaLN").

Input x (N,C) at time t, conditioned on z (N,D): x is projected to the width,
then passes residual blocks whose LayerNorm shift/scale/gate are predicted from
y = embed(t) + embed(z) (adaptive LayerNorm, as in DiT).

Parameter names match the official ``diffloss.net`` so its weights load as-is.

References:
    MAR sec. 3.3 and official models/diffloss.py (SimpleMLPAdaLN, ResBlock, FinalLayer).
    DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (adaLN-Zero, timestep embedding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t f), sin(t f)] with geometric frequencies (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features through a two-layer SiLU MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))  # (N, width)


# The official modules hold their modulation as Sequential(SiLU, Linear) and apply SiLU(y) once per
# block. The SiLU is the same for every block, so AdaLNMLP applies it once and the blocks take the
# activated condition ``y_act``; the Sequential stays for the official parameter names.
class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from SiLU(y)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y_act: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation[1](y_act).chunk(3, dim=-1)  # 3 x (N, W)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))  # (N, W)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y_act: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation[1](y_act).chunk(2, dim=-1)  # 2 x (N, W)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, out)


class AdaLNMLP(nn.Module):
    """f(x (N,C), t (N,), z (N,D)) -> (N, out_dim). adaLN-zero init: the output starts at 0."""

    def __init__(self, in_dim: int, width: int, out_dim: int, cond_dim: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.grad_checkpointing = in_dim, out_dim, grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # official DiffLoss init: xavier linears, N(0, 0.02) time MLP, zeroed modulations and output
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The residual blocks: what ``torch.compile`` compiles one by one (a head returns them from its own
        ``repeated_blocks``)."""
        return list(self.res_blocks)

    def embed_cond(self, z: Tensor) -> Tensor:
        """z (N,D) -> (N,W). Samplers call it once and reuse it at every step."""
        return self.cond_embed(z)

    def forward_embedded(self, x: Tensor, t: Tensor, c_emb: Tensor) -> Tensor:
        """Like ``forward`` with the condition already embedded; ``t`` may be (N,) or (1,) (broadcast)."""
        h = self.input_proj(x)  # (N, W)
        return self.forward_hidden(h, F.silu(self.time_embed(t) + c_emb))  # (N, out)

    def forward_hidden(self, h: Tensor, y_act: Tensor) -> Tensor:
        """The residual blocks and the output layer: projected input h (N,W), activated condition
        y_act = SiLU(embed(t) + embed(z)) (N,W) -> (N, out). Samplers that build h and y_act themselves
        (e.g. projecting x once for both guidance branches) call this."""
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y_act, use_reentrant=False)
            else:
                h = block(h, y_act)  # (N, W)
        return self.final_layer(h, y_act)  # (N, out)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        return self.forward_embedded(x, t, self.embed_cond(z))
