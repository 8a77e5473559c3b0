"""The MAR backbone: tokens + visible mask + condition -> a condition vector z per position.

A bidirectional MAE-style encoder-decoder ViT (timm ``Block``s). The encoder
reads ``buffer_size`` condition tokens plus the visible tokens only; the decoder
puts a learned mask token at every hidden position and returns one condition
vector per sequence position for the per-token head. One condition token (a
class) fills every buffer slot, as MAR's class embedding does; several (a
caption) fill the first slots and the rest are masked out of attention.

Parameter names follow the official implementation, so its checkpoints load
after a prefix rename (see ``sandbox/lab/official.py``). This is the plain
PyTorch model (timm's attention through torch SDPA); the speed paths
(``sandbox.fast``: CPU dropout masks and attention, the decoder's last block at
the predicted rows only) are applied to a built model from outside.

References:
    MAR: Li et al., NeurIPS 2024 (arXiv 2406.11838), sec. 3-5; official code github.com/LTH14/mar (models/mar.py).
    MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (encoder on visible tokens only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sandbox.core.checks import check_visible_counts
from sandbox.core.contracts import Backbone, ConditionTokens
from sandbox.errors import UserError


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
    # the attention kernel (applied by sandbox.fast): torch SDPA picks flash / memory-efficient kernels itself;
    # xformers' kernels run on CUDA only
    attention: Literal["sdpa", "xformers"] = "sdpa"

    def __post_init__(self):  # checked when the recipe is built, before a run directory is written
        for part in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{part}_dim"), getattr(self, f"{part}_heads")
            if heads < 1 or dim < 1 or dim % heads:
                raise ValueError(f"model.{part}_dim ({dim}) must be a positive multiple of model.{part}_heads ({heads})")
        # the class enters through the buffer alone: without one, the first sampling step sees no token at all
        for name in ("encoder_depth", "decoder_depth", "head_batch_mul", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f"model.label_drop_prob must be in [0, 1], got {self.label_drop_prob}")
        for name in ("attn_dropout", "proj_dropout"):  # a rate of 1 drops everything
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("mlp_ratio", "norm_eps"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"model.attention must be sdpa or xformers, got {self.attention!r}")


def condition_buffer(cond: ConditionTokens, size: int, owner: str) -> tuple[Tensor, Tensor | None]:
    """Condition tokens in ``size`` slots: (B, size, W) tokens and a (B, size) key mask (None: every slot is real).
    One condition token fills every slot (MAR's class embedding); T tokens fill the first T slots, the rest are
    padding to keep out of attention. ``owner`` names the slots in the error (e.g. "the MAR buffer")."""
    B, T, D = cond.tokens.shape
    if T == 1:
        return cond.tokens.expand(-1, size, -1), None  # (B, size, W)
    if T > size:
        raise UserError(f"the condition gives {T} tokens but {owner} holds {size}; raise "
                        f"model.buffer_size to at least {T}")
    mask = cond.mask if cond.mask is not None else cond.tokens.new_ones(B, T, dtype=torch.bool)
    pad = cond.tokens.new_zeros(B, size - T, D)
    return torch.cat([cond.tokens, pad], 1), torch.cat([mask, mask.new_zeros(B, size - T)], 1)


def init_linears_and_norms(module: nn.Module) -> None:
    """The official MAR init of ``module``'s layers: xavier-uniform linears with zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MARBackbone(Backbone):
    """MAR: a bidirectional encoder-decoder that turns partly visible token sequences into per-position conditions."""

    contract_args = {}  # the core passes the model settings; the contract kit builds it small
    resumable_args = ()

    def __init__(self, model: MARConfig, seq_len: int, token_dim: int, num_groups: int = 1):
        super().__init__(model, seq_len, token_dim, num_groups)
        self.config = config = model
        cfg, D, Dd, buf = config, config.encoder_dim, config.decoder_dim, config.buffer_size
        self.out_dim, self.cond_width = Dd, D
        self.max_condition_tokens = buf  # T condition tokens fill the first T of the buffer's slots
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)

        # ----- encoder -----
        self.z_proj = nn.Linear(token_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)  # official: eps 1e-6 here whatever norm_eps is
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq_len, D))
        self.encoder_blocks = nn.ModuleList(
            Block(D, cfg.encoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm,
                  proj_drop=cfg.proj_dropout, attn_drop=cfg.attn_dropout)
            for _ in range(cfg.encoder_depth)
        )
        self.encoder_norm = norm(D)

        # ----- decoder -----
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq_len, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm,
                  proj_drop=cfg.proj_dropout, attn_drop=cfg.attn_dropout)
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

        self.initialize_weights()

    def initialize_weights(self) -> None:
        # official MAR init: N(0, 0.02) embeddings, xavier-uniform linears, unit LayerNorms
        for p in (self.mask_token, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if self.num_groups > 1:
            nn.init.normal_(self.group_embed.weight, std=0.02)
            nn.init.normal_(self.decoder_group_embed.weight, std=0.02)
        init_linears_and_norms(self)

    def set_groups(self, groups: Tensor) -> None:
        """Take the ordering's (L,) position groups."""
        self.groups.copy_(groups.to(self.groups.device))

    # ----------------------------------------------------------------------------------
    def buffer(self, cond: ConditionTokens) -> tuple[Tensor, Tensor | None]:
        """The condition in the buffer: (B, buf, D) tokens and a (B, buf) key mask (None: every slot is real)."""
        return condition_buffer(cond, self.config.buffer_size, "the MAR buffer")

    def repeated_blocks(self) -> list[nn.Module]:
        """What ``torch.compile`` compiles one by one (``sandbox.fast.compile``)."""
        return [*self.encoder_blocks, *self.decoder_blocks]

    def run_blocks(self, blocks, x: Tensor, keys: Tensor | None = None) -> Tensor:
        """x through ``blocks`` in order, recomputed in backward when ``grad_checkpointing`` is set; ``keys``
        (B, T) bool: the positions every row may attend to (None: all)."""
        mask = None if keys is None else keys[:, None, None, :]  # (B, 1, 1, T): SDPA broadcasts it
        for blk in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask=mask, use_reentrant=False)
            else:
                x = blk(x) if mask is None else blk(x, attn_mask=mask)
        return x

    def forward_encoder(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Encode the buffer plus the visible tokens. Returns (encoded (B, buf+Lv, D), keep index (B, buf+Lv),
        the buffer's key mask (B, buf) or None)."""
        x, idx, buffer_keys = self.encoder_input(tokens, visible, cond)  # (B, buf+Lv, D)
        keys = None
        if buffer_keys is not None:  # the padded buffer slots stay out of attention
            keys = torch.cat([buffer_keys, visible.new_ones(x.shape[0], x.shape[1] - buffer_keys.shape[1])], 1)
        x = self.run_blocks(self.encoder_blocks, x, keys)  # (B, buf+Lv, D)
        return self.encoder_norm(x), idx, buffer_keys

    def encoder_input(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The encoder's input rows: the buffer plus the visible tokens with their position (and group)
        embeddings, in ascending position order. Returns (x (B, buf+Lv, D), keep index (B, buf+Lv): each row's
        position in the buffer + sequence, the buffer's key mask (B, buf) or None)."""
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
        buffer, buffer_keys = self.buffer(cond)  # (B, buf, D), (B, buf) or None
        x = torch.cat([buffer.to(tokens.dtype), self.z_proj(vis)], dim=1)  # (B, buf+Lv, D)
        pos = self.encoder_pos_embed_learned[0].index_select(0, idx.reshape(-1)).view(B, n_keep, -1)  # (B, buf+Lv, D)
        if self.num_groups > 1:
            grp = torch.cat([self.groups.new_zeros(buf), self.groups])[idx]  # (B, buf+Lv)
            pos = pos + self.group_embed(grp) * (idx >= buf)[..., None]
        return self.z_proj_ln(x + pos), idx, buffer_keys  # (B, buf+Lv, D)

    def decoder_input(self, x: Tensor, idx: Tensor) -> Tensor:
        """The decoder's input: encoded rows (B, buf+Lv, D) back in place among mask tokens, with the decoder's
        position (and group) embeddings -> (B, buf+L, Dd)."""
        B = x.shape[0]
        buf = self.config.buffer_size
        x = self.decoder_embed(x)  # (B, buf+Lv, Dd)
        full = self.mask_token.to(x.dtype).expand(B, buf + self.seq_len, -1).clone()  # (B, buf+L, Dd)
        full.scatter_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)  # visible rows replace mask tokens
        x = full + self.decoder_pos_embed_learned  # (B, buf+L, Dd)
        if self.num_groups > 1:
            x[:, buf:] = x[:, buf:] + self.decoder_group_embed(self.groups)
        return x

    def forward_decoder(self, x: Tensor, idx: Tensor, query: Tensor | None = None,
                        buffer_keys: Tensor | None = None) -> Tensor:
        """Decode to one condition per sequence position: (B, buf+Lv, D) -> (B, L, Dd), or with ``query``
        (B, L) bool only those positions' conditions, (N, Dd) in row-major order (``z[query]``)."""
        keys = None
        if buffer_keys is not None:  # the padded buffer slots stay out of attention in the decoder too
            keys = torch.cat([buffer_keys, buffer_keys.new_ones(x.shape[0], self.seq_len)], 1)  # (B, buf+L)
        x = self.run_blocks(self.decoder_blocks, self.decoder_input(x, idx), keys)  # (B, buf+L, Dd)
        z = self.decoder_norm(x)[:, self.config.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, Dd)
        return z if query is None else z[query]

    def forward(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens, query: Tensor | None = None,
                order: Tensor | None = None) -> Tensor:
        """tokens (B,L,C), visible (B,L) bool, cond (B rows: the condition tokens) -> conditions z (B,L,Dd).

        ``query`` (B, L) bool: return only ``z[query]`` (N, Dd), the rows the head needs. ``order`` is not
        used: MAR is bidirectional.
        """
        x, idx, buffer_keys = self.forward_encoder(tokens, visible, cond)  # (B, buf+Lv, D)
        return self.forward_decoder(x, idx, query, buffer_keys)  # (B, L, Dd) or (N, Dd)


MARTransformer = MARBackbone  # the name before the backbone kind (0.2)
