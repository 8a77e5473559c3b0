"""The attention kernel: explicit softmax attention on the CPU where it beats SDPA, SDPA's kernel choice on CUDA
under dropout, and xformers as an optional CUDA backend. Applied by ``sandbox.fast.apply``; numbers in
docs/performance.md ("Attention").

``FastAttention`` is timm's ``Attention`` (the same parameters and math) whose kernel is chosen per call:

- CPU, training with attention dropout: SDPA has no CPU dropout kernel and falls back to its math path
  (a ``bernoulli_`` mask and a "safe" softmax); the explicit path drops probabilities with the cheaper
  mask of ``sandbox.fast.dropout``.
- CPU, short key sequences (at most ``cpu_explicit_max_keys``): SDPA's CPU flash kernel is tiled for long
  sequences; a few batch rows at a time in the cache are faster.
- CUDA, training with dropout: any SDPA kernel but cuDNN's, whose dropout variant stalls the GPU on the CPU side.
- ``backend = "xformers"``: xformers' memory-efficient kernel (CUDA only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sandbox.errors import UserError
from sandbox.fast.dropout import apply_mask, cpu_mask, dropout, use_cpu_mask


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


class FastAttention(Attention):
    """timm's ``Attention`` with the kernel chosen per call (module docstring); ``cpu_kernels`` False keeps SDPA."""

    backend: str = "sdpa"
    cpu_kernels: bool = True
    cpu_explicit_max_keys: int = 160  # between 136 keys (explicit faster) and 320 (flash faster): measured
    # any SDPA kernel but cuDNN's for CUDA training with dropout (its dropout kernel waits on the CPU)
    cuda_dropout_kernels = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) v with the selected kernel; (B, H, Tq, d) x 2 (B, H, T, d) -> (B, H, Tq, d)."""
        p = self.attn_drop.p if self.training else 0.0
        if self.backend == "xformers":
            return xformers_attention(q, k, v, p)
        if (self.cpu_kernels and q.device.type == "cpu" and (p > 0.0 or k.shape[-2] <= self.cpu_explicit_max_keys)
                and not torch.compiler.is_compiling()):  # its shape-dependent chunking would recompile
            return explicit_attention(q, k, v, self.scale, p)
        if p > 0.0 and q.device.type == "cuda":
            with sdpa_kernel(list(self.cuda_dropout_kernels)):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or self.gate is not None:  # masks: timm's own path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B,H,N,d)
        out = self.attend(self.q_norm(q), self.k_norm(k), v)  # (B, H, N, d)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, D)
        return self.proj_drop(self.proj(out))  # (B, N, D)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
    """xformers' memory-efficient kernel on (B, H, T, d) tensors (it takes and returns (B, T, H, d))."""
    import xformers.ops as xops

    if q.device.type != "cuda":
        raise UserError("the xformers attention backend runs on CUDA only; use attention 'sdpa' on the CPU")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=p)
    return out.transpose(1, 2)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, p: float = 0.0,
                       block: int = 1 << 18) -> Tensor:
    """softmax(q k^T * scale) v with dropout p on the probabilities, a few batch rows at a time so that one
    chunk's scores (at most ``block`` floats, 1 MiB: a core's L2) stay in the cache. The CPU dropout mask is
    drawn once for the whole batch. (B, H, Tq, d), 2 x (B, H, T, d) -> (B, H, Tq, d)."""
    B, H, Tq, _ = q.shape
    rows = max(1, block // (H * Tq * k.shape[-2]))
    mask = cpu_mask((B, H, Tq, k.shape[-2]), p) if use_cpu_mask(q, p) else None  # (B, H, Tq, T)

    def attend(i: int, j: int) -> Tensor:
        probs = ((q[i:j] * scale) @ k[i:j].transpose(-2, -1)).softmax(dim=-1)  # (b, H, Tq, T)
        probs = apply_mask(probs, mask[i:j]) if mask is not None else dropout(probs, p)
        return probs @ v[i:j]  # (b, H, Tq, d)

    if rows >= B:
        return attend(0, B)
    return torch.cat([attend(i, i + rows) for i in range(0, B, rows)])


def set_attention_backend(model: nn.Module, backend: str, cpu_kernels: bool | None = None) -> None:
    """Every timm ``Attention`` in ``model`` becomes a ``FastAttention`` with ``backend`` (and, when given,
    ``cpu_kernels``); a clear error for an unknown backend or a missing xformers."""
    if backend not in ("sdpa", "xformers"):
        raise UserError(f"unknown attention backend {backend!r}; use 'sdpa' or 'xformers'")
    if backend == "xformers" and not xformers_available():
        raise UserError("attention backend 'xformers' requested but xformers is not installed (or does not load); "
                        "`pip install xformers` on a CUDA machine, or use --model.attention sdpa")
    for m in model.modules():
        if type(m) is Attention:
            m.__class__ = FastAttention
        if isinstance(m, FastAttention):
            m.backend = backend
            if cpu_kernels is not None:
                m.cpu_kernels = cpu_kernels
        if hasattr(m, "config") and hasattr(m.config, "attention"):
            m.config.attention = backend
