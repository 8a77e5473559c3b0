"""The MAR transformer: tokens + visible mask + labels -> a condition vector z per position.

A bidirectional MAE-style encoder-decoder ViT (timm ``Block``s). The encoder
reads ``buffer_size`` class tokens plus the visible tokens only; the decoder
puts a learned mask token at every hidden position and returns one condition
vector per sequence position for the per-token head.

Parameter names follow the official implementation, so its checkpoints load
after a prefix rename (see ``sandbox/official.py``).

References:
    MAR: Li et al., NeurIPS 2024 (arXiv 2406.11838), sec. 3-5; official code github.com/LTH14/mar (models/mar.py).
    MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (encoder on visible tokens only).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from sandbox.dropout import apply_mask, cpu_mask, dropout, replace_dropout, use_cpu_mask
from sandbox.errors import UserError
from sandbox.guards import check_visible_counts


@dataclass
class MARConfig:
    """Transformer settings. Defaults are MAR-B (official ``mar_base``)."""

    encoder_dim: int = 768  # MAR-B width (Table: MAR-B/L/H = 768/1024/1280)
    encoder_depth: int = 12  # MAR-B: 12 encoder + 12 decoder blocks
    encoder_heads: int = 12  # MAR-B: 12 heads of 64 channels
    decoder_dim: int = 768  # MAR-B: decoder as wide as the encoder
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0  # ViT default, used by all MAR sizes
    buffer_size: int = 64  # MAR sec. 5.1: 64 class tokens in front of the sequence
    label_drop_prob: float = 0.1  # classifier-free guidance: labels replaced by the fake latent 10% of the time
    attn_dropout: float = 0.1  # official MAR: attention dropout 0.1
    proj_dropout: float = 0.1  # official MAR: projection dropout 0.1
    norm_eps: float = 1e-6  # official mar_base/large/huge build blocks with LayerNorm(eps=1e-6)
    head_batch_mul: int = 4  # official diffusion_batch_mul: each loss token is seen by the head 4x per step
    grad_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    attention: Literal["sdpa", "xformers"] = "sdpa"  # torch SDPA picks flash/mem-efficient kernels itself

    def __post_init__(self):  # checked when the recipe is built, before a run directory is written
        for part in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{part}_dim"), getattr(self, f"{part}_heads")
            if heads < 1 or dim < 1 or dim % heads:
                raise ValueError(f"model.{part}_dim ({dim}) must be a positive multiple of model.{part}_heads ({heads})")
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f"model.label_drop_prob must be in [0, 1], got {self.label_drop_prob}")
        if self.head_batch_mul < 1 or self.buffer_size < 0:
            raise ValueError("model.head_batch_mul must be >= 1 and model.buffer_size >= 0")


# --------------------------------------------------------------------------------------
# Attention with a selectable kernel
# --------------------------------------------------------------------------------------
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


class MARAttention(Attention):
    """timm's ``Attention`` (same parameters, same math) whose kernel is ``backend``: ``sdpa`` is torch
    ``scaled_dot_product_attention``; ``xformers`` calls xformers' memory-efficient kernel.

    On the CPU, ``sdpa`` computes softmax(q k^T / sqrt(d)) v explicitly in two cases, with the same math:
    (1) training with attention dropout: SDPA has no CPU kernel with dropout and falls back to its math
    path, whose ``bernoulli_`` mask and "safe" softmax (an ``all`` over the scores to find fully masked
    rows) took ~20% of a fixture training step; the explicit path drops probabilities with the cheaper
    mask of ``sandbox/dropout.py``. (2) short key sequences (at most ``cpu_explicit_max_keys``): SDPA's
    CPU flash kernel is tiled for long sequences. Measured on the 2-core CPU, in ms (flash / explicit,
    chunked as ``explicit_attention`` does): batch x heads 512, head dim 16: 72 keys 7.2 / 4.0, 40 keys
    3.1 / 1.7, 4 queries on 72 keys 1.3 / 0.3; batch x heads 256, 136 keys, head dim 32: 13.4 / 8.5;
    MAR-B's 320 keys (batch x heads 768, head dim 64): 161 / 174, where flash stays.
    """

    backend: str = "sdpa"
    cpu_explicit_max_keys: int = 160  # between the measured 136 keys (explicit faster) and 320 (flash faster)
    # SDPA kernels for CUDA training with attention dropout: any but cuDNN's. SDPA picks cuDNN first on Hopper,
    # and its kernel with dropout spent 2.3 ms (forward) and 2.8 ms (backward) of CPU per call on an H200
    # (torch 2.11, MAR-B at batch 256) against 0.4 and 0.7 ms on the GPU, so the GPU waited: 416 -> 390 ms per
    # step eager, 423 -> 319 compiled. Sampling (no dropout) keeps SDPA's choice (cuDNN: 40 us of CPU a call).
    cuda_dropout_kernels = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) v with the selected kernel; (B, H, Tq, d) x 2 (B, H, T, d) -> (B, H, Tq, d)."""
        p = self.attn_drop.p if self.training else 0.0
        if self.backend == "sdpa":
            if (q.device.type == "cpu" and (p > 0.0 or k.shape[-2] <= self.cpu_explicit_max_keys)
                    and not torch.compiler.is_compiling()):  # its shape-dependent chunking would recompile
                return explicit_attention(q, k, v, self.scale, p)
            if p > 0.0 and q.device.type == "cuda":
                with sdpa_kernel(list(self.cuda_dropout_kernels)):
                    return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        import xformers.ops as xops

        if q.device.type != "cuda":
            raise UserError("the xformers attention backend runs on CUDA only; use attention 'sdpa' on the CPU")
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=p)
        return out.transpose(1, 2)  # xformers takes and returns (B, T, H, d)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or self.gate is not None:  # not used by MAR: timm's own path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B,H,N,d)
        out = self.attend(self.q_norm(q), self.k_norm(k), v)  # (B, H, N, d)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, D)
        return self.proj_drop(self.proj(out))  # (B, N, D)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, p: float = 0.0,
                       block: int = 1 << 18) -> Tensor:
    """softmax(q k^T * scale) v with dropout p on the probabilities, a few batch rows at a time so that one
    chunk's scores (at most ``block`` floats, 1 MiB: a core's L2) stay in the cache; the whole (B, H, Tq, T)
    score tensor of a batch would be written to memory and read back three times. The CPU dropout mask is
    drawn once for the whole batch (one call instead of one per chunk).
    (B, H, Tq, d), 2 x (B, H, T, d) -> (B, H, Tq, d)."""
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


def set_attention_backend(transformer: nn.Module, backend: str) -> None:
    """Switch every ``MARAttention`` in ``transformer`` to ``backend`` (a clear error if xformers is missing)."""
    if backend not in ("sdpa", "xformers"):
        raise UserError(f"unknown attention backend {backend!r}; use 'sdpa' or 'xformers'")
    if backend == "xformers" and not xformers_available():
        raise UserError("attention backend 'xformers' requested but xformers is not installed (or does not load); "
                        "`pip install xformers` on a CUDA machine, or use --model.attention sdpa")
    for m in transformer.modules():
        if isinstance(m, MARAttention):
            m.backend = backend
    if hasattr(transformer, "config"):
        transformer.config.attention = backend


class MARTransformer(nn.Module):
    """Bidirectional encoder-decoder that turns partially visible token sequences into per-position conditions."""

    def __init__(self, config: MARConfig, seq_len: int, token_dim: int, num_classes: int, num_groups: int = 1):
        super().__init__()
        self.config = config
        self.seq_len, self.token_dim, self.num_classes = seq_len, token_dim, num_classes
        cfg, D, Dd, buf = config, config.encoder_dim, config.decoder_dim, config.buffer_size
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)

        # ----- conditioning: class embedding and the learned "no class" latent for CFG -----
        self.class_emb = nn.Embedding(num_classes, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))

        # ----- encoder -----
        self.z_proj = nn.Linear(token_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)  # official: eps 1e-6 here whatever norm_eps is
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq_len, D))
        self.encoder_blocks = nn.ModuleList(
            Block(D, cfg.encoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm,
                  proj_drop=cfg.proj_dropout, attn_drop=cfg.attn_dropout, attn_layer=MARAttention)
            for _ in range(cfg.encoder_depth)
        )
        self.encoder_norm = norm(D)

        # ----- decoder -----
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq_len, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm,
                  proj_drop=cfg.proj_dropout, attn_drop=cfg.attn_dropout, attn_layer=MARAttention)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = norm(Dd)
        # official: a separate position embedding added to the condition the head receives
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, Dd))

        # ----- optional group (e.g. scale) embedding, only for orderings with several groups -----
        self.num_groups = num_groups
        if num_groups > 1:
            self.group_embed = nn.Embedding(num_groups, D)
            self.decoder_group_embed = nn.Embedding(num_groups, Dd)
        self.register_buffer("groups", torch.zeros(seq_len, dtype=torch.long), persistent=False)

        replace_dropout(self)  # the blocks' nn.Dropout -> the same p with a cheaper CPU mask (sandbox/dropout.py)
        self.initialize_weights()
        set_attention_backend(self, cfg.attention)

    def initialize_weights(self) -> None:
        # official MAR init: N(0, 0.02) embeddings, xavier-uniform linears, unit LayerNorms
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if self.num_groups > 1:
            nn.init.normal_(self.group_embed.weight, std=0.02)
            nn.init.normal_(self.decoder_group_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_groups(self, groups: Tensor) -> None:
        """Take the ordering's (L,) position groups."""
        self.groups.copy_(groups.to(self.groups.device))

    # ----------------------------------------------------------------------------------
    def condition(self, labels: Tensor | None, uncond: Tensor | None, batch: int) -> Tensor:
        """Class embedding per row (B,D); rows where ``uncond`` is True (or all, without labels) get the fake latent."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        cls = self.class_emb(labels)  # (B, D)
        if uncond is None:
            return cls
        return torch.where(uncond[:, None], self.fake_latent.to(cls.dtype), cls)

    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for blk in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_encoder(self, tokens: Tensor, visible: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the buffer plus the visible tokens. Returns (encoded (B, buf+Lv, D), keep index (B, buf+Lv))."""
        B, L, _ = tokens.shape
        buf = self.config.buffer_size
        keep = torch.cat([visible.new_ones(B, buf), visible], dim=1)  # (B, buf+L) buffer is always visible
        fewest, most = torch.stack(torch.aminmax(keep.sum(1))).tolist()  # one device sync, as int(keep[0].sum())
        check_visible_counts(fewest, most)
        n_keep = most
        # positions in ascending order, as the official boolean indexing gives
        idx = keep.nonzero()[:, 1].view(B, n_keep)  # (B, buf+Lv)
        tok_idx = idx[:, buf:] - buf  # (B, Lv)

        # project only the visible tokens: the official projects all L and then drops (same values, more work)
        vis = torch.gather(tokens, 1, tok_idx[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, Lv, C)
        x = torch.cat([cond[:, None, :].expand(-1, buf, -1).to(tokens.dtype), self.z_proj(vis)], dim=1)  # (B, buf+Lv, D)
        pos = self.encoder_pos_embed_learned[0].index_select(0, idx.reshape(-1)).view(B, n_keep, -1)  # (B, buf+Lv, D)
        if self.num_groups > 1:
            grp = torch.cat([self.groups.new_zeros(buf), self.groups])[idx]  # (B, buf+Lv)
            pos = pos + self.group_embed(grp) * (idx >= buf)[..., None]
        x = self.z_proj_ln(x + pos)  # (B, buf+Lv, D)
        x = self._run(self.encoder_blocks, x)  # (B, buf+Lv, D)
        return self.encoder_norm(x), idx

    def forward_decoder(self, x: Tensor, idx: Tensor, query: Tensor | None = None) -> Tensor:
        """Decode to one condition per sequence position: (B, buf+Lv, D) -> (B, L, Dd).

        With ``query`` (B, L) bool (the same count per row), only those positions' conditions,
        (N, Dd) in row-major order (= the full output indexed by ``query``): the last block then
        computes keys and values for every position but queries, projections and its MLP only
        there -- a sampling step needs the few positions it predicts, a training step the ones
        with loss (same values within float rounding; the official decodes every position and
        then selects).
        """
        B = x.shape[0]
        buf = self.config.buffer_size
        x = self.decoder_embed(x)  # (B, buf+Lv, Dd)
        full = self.mask_token.to(x.dtype).expand(B, buf + self.seq_len, -1).clone()  # (B, buf+L, Dd)
        full.scatter_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)  # visible rows replace mask tokens
        x = full + self.decoder_pos_embed_learned  # (B, buf+L, Dd)
        if self.num_groups > 1:
            x[:, buf:] = x[:, buf:] + self.decoder_group_embed(self.groups)
        if query is None or not self.decoder_blocks:
            x = self._run(self.decoder_blocks, x)  # (B, buf+L, Dd)
            x = self.decoder_norm(x)
            z = x[:, buf:] + self.diffusion_pos_embed_learned  # (B, L, Dd)
            return z if query is None else z[query]
        q_idx = query.nonzero()[:, 1].view(B, -1)  # (B, Q) sequence positions, ascending per row
        x = self._run(self.decoder_blocks[:-1], x)  # (B, buf+L, Dd)
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint(_block_at, self.decoder_blocks[-1], x, q_idx + buf, use_reentrant=False)
        else:
            x = _block_at(self.decoder_blocks[-1], x, q_idx + buf)  # (B, Q, Dd)
        pos = self.diffusion_pos_embed_learned[0].index_select(0, q_idx.reshape(-1)).view(B, -1, x.shape[-1])
        x = self.decoder_norm(x) + pos  # (B, Q, Dd)
        return x.reshape(-1, x.shape[-1])  # (N, Dd)

    def forward(self, tokens: Tensor, visible: Tensor, labels: Tensor | None, uncond: Tensor | None = None,
                query: Tensor | None = None) -> Tensor:
        """tokens (B,L,C), visible (B,L) bool, labels (B,) -> conditions z (B,L,Dd).

        ``uncond`` (B,) bool selects rows that use the fake latent instead of their label
        (label drop in training, the unconditional half of classifier-free guidance).
        ``query`` (B, L) bool: return only ``z[query]`` (N, Dd), computed with less work (see forward_decoder).
        """
        cond = self.condition(labels, uncond, tokens.shape[0])  # (B, D)
        x, idx = self.forward_encoder(tokens, visible, cond)  # (B, buf+Lv, D)
        return self.forward_decoder(x, idx, query)  # (B, L, Dd) or (N, Dd)


def _block_at(blk: Block, x: Tensor, rows: Tensor) -> Tensor:
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
    out = attn.attend(attn.q_norm(q), attn.k_norm(k), v)  # (B, H, Q, d)
    xq = torch.gather(x, 1, take) + attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, -1, D))))
    return xq + blk.mlp(blk.norm2(xq))  # (B, Q, D)
