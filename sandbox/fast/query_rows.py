"""The decoder's last block at the rows the head needs only: a sampling step predicts a few positions, a
training step takes the loss at ~85% of them, and the plain decoder computes every position, then selects.

In the last block every position is still a key and a value, but the queries, the attention output, the
projection and the MLP are computed at the queried rows alone: the same values within float rounding
(tests/test_fast_paths.py). Applied by ``sandbox.fast.apply``; numbers in docs/performance.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sandbox.core.transformer import MARBackbone


class QueryRowsBackbone(MARBackbone):
    """``MARBackbone`` whose ``forward_decoder(..., query)`` runs the last block at the queried rows only."""

    def forward_decoder(self, x: Tensor, idx: Tensor, query: Tensor | None = None,
                        buffer_keys: Tensor | None = None) -> Tensor:
        if query is None or not self.decoder_blocks or buffer_keys is not None:  # masked buffers: the plain path
            return super().forward_decoder(x, idx, query, buffer_keys)
        B, buf = x.shape[0], self.config.buffer_size
        x = self.decoder_input(x, idx)  # (B, buf+L, Dd)
        q_idx = query.nonzero()[:, 1].view(B, -1)  # (B, Q) sequence positions, ascending per row
        x = self.run_blocks(self.decoder_blocks[:-1], x)  # (B, buf+L, Dd)
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint(block_at_rows, self.decoder_blocks[-1], x, q_idx + buf, use_reentrant=False)
        else:
            x = block_at_rows(self.decoder_blocks[-1], x, q_idx + buf)  # (B, Q, Dd)
        pos = self.diffusion_pos_embed_learned[0].index_select(0, q_idx.reshape(-1)).view(B, -1, x.shape[-1])
        x = self.decoder_norm(x) + pos  # (B, Q, Dd)
        return x.reshape(-1, x.shape[-1])  # (N, Dd)


def block_at_rows(blk, x: Tensor, rows: Tensor) -> Tensor:
    """A timm ``Block`` (no layer scale or drop path, as MAR builds them; dropout as the block's own modules)
    evaluated only at ``rows`` (B, Q) of x (B, T, D): every position is a key and a value, only ``rows`` are
    queries. Returns (B, Q, D)."""
    attn = blk.attn
    B, T, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    h = blk.norm1(x)  # (B, T, D)
    w, b = attn.qkv.weight, attn.qkv.bias
    k, v = F.linear(h, w[D:], None if b is None else b[D:]).view(B, T, 2, H, d).permute(2, 0, 3, 1, 4)  # (B,H,T,d)
    take = rows[..., None].expand(-1, -1, D)  # (B, Q, D)
    q = F.linear(torch.gather(h, 1, take), w[:D], None if b is None else b[:D])  # (B, Q, D)
    q = q.view(B, -1, H, d).transpose(1, 2)  # (B, H, Q, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if hasattr(attn, "attend"):  # FastAttention: its kernel choice
        out = attn.attend(q, k, v)  # (B, H, Q, d)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    xq = torch.gather(x, 1, take) + attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, -1, D))))
    return xq + blk.mlp(blk.norm2(xq))  # (B, Q, D)
