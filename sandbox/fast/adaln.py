"""The heads' AdaLN MLP, computed faster: the residual block's training step as one autograd function with a
written-out backward, and each distinct diffusion timestep embedded once per batch. Applied by
``sandbox.fast.apply``; numbers in docs/performance.md ("The head's MLP").

``ResBlock`` (sandbox/core/adaln_mlp.py) computes, per row,

    shift, scale, gate = split(y W_m^T + b_m)            (N, 3W) -> 3 x (N, W)
    m   = LN(x) * (1 + scale) + shift
    out = x + gate * (SiLU(m W_1^T + b_1) W_2^T + b_2)

Under autograd, the three modulation pieces are views of one product, so the backward pass first
gathers their gradients with a ``cat`` into a new (N, 3W) tensor, and every elementwise node of the
forward becomes its own backward pass. Here the forward uses multiply-adds (``torch.addcmul``) and the
backward writes the three gradients straight into one (N, 3W) buffer with only the products the chain
rule needs. Values equal the module's to float rounding; in float64 to 1e-14 (tests/test_fast_paths.py
also runs ``gradcheck``).

Used in training only, for float32 without autocast (``FusedTrainingResBlock.forward`` decides); evaluation
keeps the module's order of operations, which the parity tests compare with the official (the sampler
divides by sqrt(alpha_bar) ~ 5e-5 at t = 999 and would amplify a different rounding ~2e4 times).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.core.adaln_mlp import ResBlock, TimestepEmbedder, timestep_embedding


class FusedResBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y_act: Tensor, w_mod: Tensor, b_mod: Tensor, ln_w: Tensor, ln_b: Tensor,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, eps: float) -> Tensor:
        W = x.shape[1]
        mod = torch.addmm(b_mod, y_act, w_mod.t())  # (N, 3W)
        shift, scale, gate = mod.split(W, dim=1)  # 3 x (N, W) views
        hn, mean, rstd = torch.native_layer_norm(x, (W,), ln_w, ln_b, eps)  # (N, W), (N, 1), (N, 1)
        scale1 = 1 + scale  # (N, W)
        m = torch.addcmul(shift, hn, scale1)  # (N, W)
        a = torch.addmm(b1, m, w1.t())  # (N, W)
        s = F.silu(a)  # (N, W)
        f = torch.addmm(b2, s, w2.t())  # (N, W)
        ctx.save_for_backward(x, y_act, w_mod, ln_w, ln_b, w1, w2, mean, rstd, hn, scale1, gate, m, a, s, f)
        return torch.addcmul(x, gate, f)  # (N, W)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y_act, w_mod, ln_w, ln_b, w1, w2, mean, rstd, hn, scale1, gate, m, a, s, f = ctx.saved_tensors
        N, W = x.shape
        d_mod = torch.empty(N, 3 * W, dtype=g.dtype, device=g.device)  # (N, 3W): d shift | d scale | d gate
        d_shift, d_scale, d_gate = d_mod.split(W, dim=1)
        torch.mul(g, f, out=d_gate)
        d_f = g * gate  # (N, W)
        d_w2, d_b2 = d_f.t() @ s, d_f.sum(0)
        d_a = torch.ops.aten.silu_backward(d_f @ w2, a)  # (N, W)
        d_w1, d_b1 = d_a.t() @ m, d_a.sum(0)
        torch.mm(d_a, w1, out=d_shift)  # d m = d shift, written in place (row stride 3W)
        torch.mul(d_shift, hn, out=d_scale)
        d_x, d_ln_w, d_ln_b = torch.ops.aten.native_layer_norm_backward(
            d_shift * scale1, x, (W,), mean, rstd, ln_w, ln_b, [True, True, True])
        d_x += g  # the residual path
        d_w_mod, d_b_mod = d_mod.t() @ y_act, d_mod.sum(0)
        d_y = d_mod @ w_mod  # (N, W)
        return d_x, d_y, d_w_mod, d_b_mod, d_ln_w, d_ln_b, d_w1, d_b1, d_w2, d_b2, None


def fused_res_block(block, x: Tensor, y_act: Tensor) -> Tensor:
    """``ResBlock`` ``block`` applied to x (N, W) with activated condition y_act (N, W) through FusedResBlock."""
    mod, ln, fc1, fc2 = block.adaLN_modulation[1], block.in_ln, block.mlp[0], block.mlp[2]
    return FusedResBlock.apply(x, y_act, mod.weight, mod.bias, ln.weight, ln.bias,
                               fc1.weight, fc1.bias, fc2.weight, fc2.bias, ln.eps)


class FusedTrainingResBlock(ResBlock):
    """``ResBlock`` that trains through ``FusedResBlock`` (float32, no autocast, not under ``torch.compile``,
    which fuses its own elementwise work); evaluation and other dtypes take the module's own order."""

    def forward(self, x: Tensor, y_act: Tensor) -> Tensor:
        if (self.training and x.dtype == torch.float32 and y_act.shape == x.shape
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()):
            return fused_res_block(self, x, y_act)  # (N, W): the same math, a leaner backward
        return super().forward(x, y_act)


class UniqueTimestepEmbedder(TimestepEmbedder):
    """A training batch has many rows but at most T distinct timesteps: embed each once, then gather (the same
    values; embedding every row costs as much as a residual block)."""

    min_rows: int = 256  # below this a batch is a sampling step's (one t) or small: no gain

    def forward(self, t: Tensor) -> Tensor:
        if t.numel() <= self.min_rows:
            return super().forward(t)
        uniq, inverse = torch.unique(t, return_inverse=True)
        # index_select: its backward is index_add_, faster on the CPU than indexing's index_put_
        return self.mlp(timestep_embedding(uniq, self.frequency_dim)).index_select(0, inverse)  # (N, width)
