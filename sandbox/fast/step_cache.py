"""Caching across the steps of one generation: reuse what did not change since the previous step (``--cache``,
the recipe's ``sample.cache``). Applied from outside: the sampling core takes the sampler this file starts
(``sample_tokens(..., sampler=sampler_for(spec))``) in place of the backbone's own.

    off           every step computed in full (the default until measured: .ci/measure_fast_sampling.sh)
    exact         the samples of ``off`` within float rounding. A bidirectional backbone attends every visible
                  token from every position, so after its first attention every feature of a step depends on
                  every token revealed so far: only what comes before that attention is unchanged. MAR's first
                  encoder block keeps the q/k/v rows of the buffer and of every token whose value did not change,
                  its first decoder block those of the hidden positions (a mask token at a fixed position); the
                  rest is computed as without a cache. (Recomputing a subset of rows runs other GEMM kernels,
                  which round differently: ~1e-7.)
    approx:N[:W]  LazyMAR's two caches, with a full step at steps i < W and i % N == 0 (W = 1 by default):
                  token cache -- between full steps only the rows whose input changed are computed, in every
                  block (the buffer; the tokens revealed or changed since the previous step; in the decoder also
                  the positions the step predicts); every other position is a key and a value from the step that
                  last computed it. Condition cache -- with classifier-free guidance, between full steps the
                  unconditional branch is not run: its conditions are the conditional ones plus the difference
                  z_uncond - z_cond the last full step left at each position.

The refresh rule and what is reused follow LazyMAR, simplified: LazyMAR computes the first 5 of 64 steps and
every 9th after in full (``approx:9:5`` here), recomputes in the encoder the buffer and the tokens revealed at the
previous step (as here), and in the decoder the tokens whose value vectors changed most, by a retain-ratio table
per step of a 64-step plan; here the decoder recomputes the rows whose input changed and the predicted ones,
which needs no table for other step counts. Its condition cache adds the difference before the decoder's last
norm; here after it, to the backbone's output, so it serves any backbone. A plan step whose changed rows differ
in number between images (an editing mask, say) is computed in full.

What applies where: MAR's backbone gets both caches; another backbone without a sampler of its own gets the
condition cache (``approx``) and nothing for ``exact`` (nothing is known to be unchanged inside it); a backbone
with its own sampler (a causal backbone's KV cache, exact already) keeps it for ``exact`` and refuses ``approx``.

References:
    LazyMAR: Yan et al., "LazyMAR: Accelerating Masked Autoregressive Models via Feature Caching", ICCV 2025
        (arXiv 2503.12450; github.com/feihongyan1/LazyMAR, models/mar_cache.py and models/basic.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.core.contracts import Backbone, BackboneSampler, ConditionTokens
from sandbox.core.transformer import MARBackbone
from sandbox.errors import UserError

CACHE_SYNTAX = "off, exact, or approx:N[:W] (a full step every N steps and at the first W, e.g. approx:2)"


@dataclass(frozen=True)
class CacheMode:
    """A parsed ``--cache``: ``kind`` off / exact / approx; approx's ``period`` N and ``warmup`` W."""

    kind: str = "off"
    period: int = 1
    warmup: int = 1

    @classmethod
    def parse(cls, spec) -> "CacheMode":
        if isinstance(spec, CacheMode):
            return spec
        if spec is False:  # YAML's reading of a bare `off`
            return cls("off")
        parts = str(spec).split(":") if isinstance(spec, str) else []
        if parts and parts[0] in ("off", "exact") and len(parts) == 1:
            return cls(parts[0])
        numbers = parts[1:]
        if parts[:1] == ["approx"] and len(numbers) in (1, 2) and all(p.isdigit() and int(p) >= 1 for p in numbers):
            return cls("approx", int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else 1)
        raise ValueError(f"{spec!r} is not {CACHE_SYNTAX}")

    def __str__(self) -> str:
        if self.kind != "approx":
            return self.kind
        return f"approx:{self.period}" + (f":{self.warmup}" if self.warmup != 1 else "")

    def full_at(self, i: int) -> bool:
        """Whether step i of a generation is computed in full."""
        return self.kind != "approx" or i < self.warmup or i % self.period == 0


def sampler_for(spec):
    """The ``sampler`` argument of ``sample_tokens`` for a cache spec: None for off (the backbone's own)."""
    mode = CacheMode.parse(spec)
    return None if mode.kind == "off" else partial(start_cached, mode)


def check_cache(spec, backbone: Backbone) -> CacheMode:
    """``spec`` parsed, and refused as one UserError line when ``backbone`` cannot follow it: ``approx`` with a
    backbone that keeps its own state across steps (a causal backbone's KV cache)."""
    try:
        mode = CacheMode.parse(spec)
    except ValueError as e:
        raise UserError(f"cache: {e}") from None
    if mode.kind == "approx" and type(backbone).start_sampling is not Backbone.start_sampling:
        raise UserError(f"cache {mode} skips the unconditional branch and recomputes only some positions, which "
                        f"backbone {type(backbone).__name__} cannot follow: it keeps its own state across steps "
                        "(its own cache); use cache off or exact")
    return mode


def start_cached(mode: CacheMode, backbone: Backbone, cond: ConditionTokens, guided: bool) -> BackboneSampler:
    """A new generation's sampler with ``mode``'s reuse for ``backbone`` (the module docstring's table)."""
    check_cache(mode, backbone)
    if type(backbone).start_sampling is not Backbone.start_sampling:  # its own sampler: exact (or off) only
        return backbone.start_sampling(cond)
    if isinstance(backbone, MARBackbone):
        return MARStepCache(backbone, cond, guided, mode)
    if mode.kind == "exact":
        return backbone.start_sampling(cond)
    return GuidanceCache(backbone, cond, guided, mode)


def half(cond: ConditionTokens, rows: int) -> ConditionTokens:
    """The first ``rows`` rows of ``cond`` (the conditional half of a guided batch)."""
    return ConditionTokens(cond.tokens[:rows], None if cond.mask is None else cond.mask[:rows])


# --------------------------------------------------------------------------------------
# The condition cache alone (any backbone that recomputes each step)
# --------------------------------------------------------------------------------------
class GuidanceCache(BackboneSampler):
    """LazyMAR's condition cache over ``backbone.forward``: full steps run both branches at every position and
    keep z_uncond - z_cond; the others run the conditional branch alone."""

    def __init__(self, backbone: Backbone, cond: ConditionTokens, guided: bool, mode: CacheMode):
        super().__init__(backbone, cond)
        self.guided, self.mode, self.index, self.diff = guided, mode, 0, None

    def step(self, tokens: Tensor, visible: Tensor, predict: Tensor) -> Tensor:
        i, self.index = self.index, self.index + 1
        if not self.guided:
            return self.backbone(tokens, visible, self.cond, query=predict)
        B = tokens.shape[0] // 2
        if self.mode.full_at(i) or self.diff is None:
            z = self.backbone(tokens, visible, self.cond)  # (2B, L, D): every position, for the difference
            self.diff = z[B:] - z[:B]  # (B, L, D)
            return z[predict]
        z = self.backbone(tokens[:B], visible[:B], half(self.cond, B), query=predict[:B])  # (N, D)
        return torch.cat([z, z + self.diff[predict[:B]]])  # (2N, D)


# --------------------------------------------------------------------------------------
# MAR's token cache (and the condition cache)
# --------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The rows of a pass through one stack of blocks: ``x`` (B, A, W) the inputs of the rows computed, ``pos``
    (B, A) their slots (buffer + sequence positions), ``keys`` (B, K) the slots attended, ``mask`` (B, K) bool
    or None (padded buffer slots out)."""

    x: Tensor
    pos: Tensor
    keys: Tensor
    mask: Tensor | None


class MARStepCache(BackboneSampler):
    """One MAR generation with a cache (the module docstring): ``exact`` reuses the first blocks' q/k/v rows,
    ``approx`` every block's keys and values between full steps and the unconditional branch's difference.
    Caches hold one row per (image, slot) -- slot = buffer + sequence position -- in (R * S, width) tensors, so
    writing and reading rows are ``index_copy_`` / ``index_select`` of whole rows."""

    def __init__(self, backbone: MARBackbone, cond: ConditionTokens, guided: bool, mode: CacheMode):
        super().__init__(backbone, cond)
        self.guided, self.mode, self.index = guided, mode, 0
        self.slots = backbone.config.buffer_size + backbone.seq_len  # S
        self.prev: tuple[Tensor, Tensor] | None = None  # the last step's (tokens, visible), every row
        self.kv: dict[tuple[str, int], Tensor] = {}  # approx: (stack, block) -> [k | v] rows (R * S, 2W)
        self.qkv0: dict[str, tuple[Tensor, Tensor]] = {}  # exact: stack -> (q/k/v rows (R * S, 3W), valid (R, S))
        self.diff: Tensor | None = None  # approx with guidance: z_uncond - z_cond (B, L, D) of the last full step

    def step(self, tokens: Tensor, visible: Tensor, predict: Tensor) -> Tensor:
        i, self.index = self.index, self.index + 1
        changed = self.changed(tokens, visible)  # (R, L) inputs that differ from the previous step's
        self.prev = (tokens.clone(), visible.clone())  # the loop writes into its tensors after the step
        if self.mode.kind == "exact":
            return self.exact_step(tokens, visible, predict, changed)
        B = tokens.shape[0] // 2 if self.guided else tokens.shape[0]
        if not self.mode.full_at(i) and self.kv:  # step 0 is always full, so the caches hold one
            z = self.lazy_step(tokens[:B], visible[:B], predict[:B], changed[:B], half(self.cond, B))  # (N, D)
            if z is not None:
                return torch.cat([z, z + self.diff[predict[:B]]]) if self.guided else z
        return self.full_step(tokens, visible, predict, B)

    def changed(self, tokens: Tensor, visible: Tensor) -> Tensor:
        """(R, L) bool: positions whose encoder input differs from the previous step's (all, at the first)."""
        if self.prev is None:
            return torch.ones_like(visible)
        old_tokens, old_visible = self.prev
        return (visible != old_visible) | (visible & (tokens != old_tokens).any(-1))

    def flat(self, slots: Tensor) -> Tensor:
        """(B, A) slots of images 0..B-1 -> their rows (B * A,) in an (R * S, width) cache."""
        return (torch.arange(slots.shape[0], device=slots.device)[:, None] * self.slots + slots).reshape(-1)

    # -- approx: every block's keys and values ---------------------------------------------
    def full_step(self, tokens: Tensor, visible: Tensor, predict: Tensor, B: int) -> Tensor:
        """Every row of every block computed and its keys and values kept -> z at the predicted positions
        (N, D); with guidance the last block also runs at every hidden position, for z_uncond - z_cond there."""
        R, L = tokens.shape[0], tokens.shape[1]
        every = visible.new_ones(R, self.slots)  # (R, S)
        enc, slots, buffer_keys = self.encode(tokens, visible, self.cond, every)
        # the positions whose conditions are needed: the predicted ones (an ordering may show them, with a
        # guess) and, with guidance, every one still to come, for the difference there
        wanted = ~visible | predict if self.guided else predict  # (R, L)
        query = torch.cat([visible.new_zeros(R, self.slots - L), wanted], 1)
        z, pos = self.decode(enc, slots, every, buffer_keys, query)  # (R, Q, D), (R, Q)
        if self.guided:
            self.diff = z.new_zeros(B, L, z.shape[-1])
            self.diff[wanted[:B]] = (z[B:] - z[:B]).reshape(-1, z.shape[-1])
        return z[predict.gather(1, pos - (self.slots - L))]  # (N, D) row-major

    def lazy_step(self, tokens: Tensor, visible: Tensor, predict: Tensor, changed: Tensor,
                  cond: ConditionTokens) -> Tensor | None:
        """The token cache: only the buffer and the changed rows in the encoder, those and the predicted ones in
        the decoder; the other rows' keys and values from the cache -> z at the predicted positions (N, D), or
        None when the images have different numbers of such rows (the step is then computed in full)."""
        B, buf = tokens.shape[0], self.slots - tokens.shape[1]
        ones = visible.new_ones(B, buf)
        enc_active = torch.cat([ones, changed & visible], 1)  # (B, S)
        dec_active = torch.cat([ones, changed | predict], 1)  # (B, S)
        if not (same_count(enc_active) and same_count(dec_active)):
            return None
        enc, slots, buffer_keys = self.encode(tokens, visible, cond, enc_active)
        query = torch.cat([torch.zeros_like(ones), predict], 1)
        z, _ = self.decode(enc, slots, dec_active, buffer_keys, query)  # (B, Q, D)
        return z.reshape(-1, z.shape[-1])  # (N, D) row-major

    def encode(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens, active: Tensor
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The encoder at the ``active`` (B, S) slots among the kept ones (the buffer and the visible tokens) ->
        (normed outputs (B, A, D), their slots (B, A), the buffer's key mask or None)."""
        bb = self.backbone
        x, kept, buffer_keys = bb.encoder_input(tokens, visible, cond)  # (B, n, D), (B, n)
        pick = active.gather(1, kept)  # (B, n)
        B, A = x.shape[0], int(pick[0].sum())
        sel = Rows(x[pick].view(B, A, -1), kept[pick].view(B, A), kept, key_mask(buffer_keys, kept, bb.seq_len))
        return bb.encoder_norm(self.run_stack("encoder", bb.encoder_blocks, sel)), sel.pos, buffer_keys

    def decode(self, enc: Tensor, slots: Tensor, active: Tensor, buffer_keys: Tensor | None, query: Tensor
               ) -> tuple[Tensor, Tensor]:
        """The decoder at the ``active`` (B, S) slots, given the encoder's outputs ``enc`` (B, A', D) at
        ``slots``; its last block at the ``query`` (B, S) slots -> (z there (B, Q, D), their slots (B, Q))."""
        bb = self.backbone
        full = bb.decoder_input(enc, slots)  # (B, S, D): the computed rows in place, mask tokens elsewhere
        B, A = full.shape[0], int(active[0].sum())
        pos = active.nonzero()[:, 1].view(B, A)  # (B, A)
        x = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))  # (B, A, D)
        sel = Rows(x, pos, None, key_mask(buffer_keys, None, bb.seq_len))
        out, pos = self.run_stack("decoder", bb.decoder_blocks, sel, query)  # (B, Q, D)
        at = (pos - bb.config.buffer_size).reshape(-1)
        z = bb.decoder_norm(out) + bb.diffusion_pos_embed_learned[0].index_select(0, at).view(out.shape)
        return z, pos

    def run_stack(self, name: str, blocks, sel: "Rows", query: Tensor | None = None):
        """``sel``'s rows through ``blocks``; each block's keys and values of those rows go into the cache, and
        the rows attend every key slot ``sel`` names. ``query`` (B, S): the slots the last block computes ->
        (outputs (B, Q, D), their slots (B, Q)); without it, the outputs of every row (B, A, D)."""
        x, pos = sel.x, sel.pos
        for j, blk in enumerate(blocks):
            qkv = blk.attn.qkv(blk.norm1(x))  # (B, A, 3D)
            k, v = self.store((name, j), blk, qkv, sel)  # (B, H, K, d)
            q = split_qkv(blk, qkv)[0]  # (B, H, A, d)
            if query is not None and j == len(blocks) - 1:
                x, q, pos = rows_at(query, pos, x, q)
            x = finish(blk, x, q, k, v, sel.mask)
        return x if query is None else (x, pos)

    def store(self, key, blk, qkv: Tensor, sel: "Rows") -> tuple[Tensor, Tensor]:
        """Write the fresh keys and values (``qkv``'s rows at ``sel.pos``) into the cache ``key`` -> the keys
        and values (B, H, K, d) of every slot ``sel`` attends (the fresh ones when every slot was computed)."""
        (B, A, _), W = qkv.shape, qkv.shape[-1] // 3
        if key not in self.kv:
            self.kv[key] = qkv.new_zeros(self.cond.tokens.shape[0] * self.slots, 2 * W)
        cache, fresh = self.kv[key], qkv[..., W:]  # (R * S, 2W), (B, A, 2W)
        cache.index_copy_(0, self.flat(sel.pos), fresh.reshape(B * A, 2 * W))
        keys = self.slots if sel.keys is None else sel.keys.shape[1]
        if A == keys:  # a full pass: every slot attended is a fresh row, in the same order
            rows = fresh
        elif sel.keys is None:  # every slot of the first B images
            rows = cache[: B * self.slots].view(B, self.slots, 2 * W)
        else:
            rows = cache.index_select(0, self.flat(sel.keys)).view(B, keys, 2 * W)
        return split_kv(blk, rows)

    # -- exact: the first blocks' q/k/v rows -----------------------------------------------
    def exact_step(self, tokens: Tensor, visible: Tensor, predict: Tensor, changed: Tensor) -> Tensor:
        """Every row computed, as without a cache, but the first encoder block's q/k/v rows of the buffer and of
        unchanged tokens, and the first decoder block's of hidden positions, come from the previous step ->
        z at the predicted positions (N, D)."""
        bb, (R, L) = self.backbone, visible.shape
        buf = self.slots - L
        x, kept, buffer_keys = bb.encoder_input(tokens, visible, self.cond)  # (R, n, D)
        stale = torch.cat([visible.new_zeros(R, buf), changed], 1).gather(1, kept)  # (R, n) inputs that changed
        kept_slots = torch.zeros(R, self.slots, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
        x = self.exact_stack("encoder", bb.encoder_blocks, x, kept, stale, key_mask(buffer_keys, kept, L),
                             kept_slots)
        full = bb.decoder_input(bb.encoder_norm(x), kept)  # (R, S, D)
        hidden = torch.cat([visible.new_zeros(R, buf), ~visible], 1)  # (R, S) mask-token rows
        slots = torch.arange(self.slots, device=kept.device).expand(R, -1)
        query = torch.cat([visible.new_zeros(R, buf), predict], 1)  # (R, S)
        out = self.exact_stack("decoder", bb.decoder_blocks, full, slots, ~hidden, key_mask(buffer_keys, None, L),
                               hidden, query)  # (R, Q, D)
        at = predict.nonzero()[:, 1]  # (N,) row-major
        return bb.decoder_norm(out.reshape(-1, out.shape[-1])) + bb.diffusion_pos_embed_learned[0].index_select(0, at)

    def exact_stack(self, name: str, blocks, x: Tensor, slots: Tensor, stale: Tensor, mask: Tensor | None,
                    valid: Tensor, query: Tensor | None = None) -> Tensor:
        """Every row of x (B, A, D) at ``slots`` through ``blocks``; the first block's q/k/v rows come from the
        cache but where ``stale`` (B, A) or not cached, and ``valid`` (B, S) marks the slots whose rows stay
        reusable; ``query`` (B, S): the rows the last block computes (None: all) -> (B, Q, D)."""
        for j, blk in enumerate(blocks):
            q, k, v = split_qkv(blk, self.first_qkv(name, blk, x, slots, stale, valid) if j == 0
                                else blk.attn.qkv(blk.norm1(x)))
            if query is not None and j == len(blocks) - 1:
                x, q, _ = rows_at(query, slots, x, q)
            x = finish(blk, x, q, k, v, mask)
        return x

    def first_qkv(self, name: str, blk, x: Tensor, slots: Tensor, stale: Tensor, valid: Tensor) -> Tensor:
        """The first block's q/k/v rows (B, A, 3D): cached where still valid, computed elsewhere; the cache then
        holds this step's rows, reusable at ``valid`` (B, S)."""
        B, A, _ = x.shape
        cached = self.qkv0.get(name)
        if cached is None:  # the first step: every row
            qkv = blk.attn.qkv(blk.norm1(x))  # (B, A, 3D)
            cache = qkv.new_zeros(B * self.slots, qkv.shape[-1])
            cache.index_copy_(0, self.flat(slots), qkv.reshape(B * A, -1))
        else:
            cache, reusable = cached
            fresh = stale | ~reusable.gather(1, slots)  # (B, A)
            qkv = cache.index_select(0, self.flat(slots)).view(B, A, -1)  # (B, A, 3D)
            rows = blk.attn.qkv(blk.norm1(x[fresh]))  # (F, 3D)
            qkv[fresh] = rows
            cache.index_copy_(0, self.flat(slots)[fresh.reshape(-1)], rows)
        self.qkv0[name] = (cache, valid)
        return qkv


# --------------------------------------------------------------------------------------
# One timm Block, taken apart (MAR builds them without layer scale or drop path)
# --------------------------------------------------------------------------------------
def split_qkv(blk, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A block's q/k/v projection rows (B, A, 3D) -> q, k, v (B, H, A, d), normalised as the block does."""
    attn = blk.attn
    B, A, _ = qkv.shape
    q, k, v = qkv.view(B, A, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k), v


def split_kv(blk, kv: Tensor) -> tuple[Tensor, Tensor]:
    """A block's key/value projection rows (B, K, 2D) -> k, v (B, H, K, d), the keys normalised."""
    attn = blk.attn
    B, K, _ = kv.shape
    k, v = kv.reshape(B, K, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.k_norm(k), v


def rows_at(query: Tensor, slots: Tensor, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of x (B, A, D) and q (B, H, A, d) whose ``slots`` (B, A) are in ``query`` (B, S) -> (x, q,
    slots) at those rows (the same number in each image)."""
    B = x.shape[0]
    rows = query.gather(1, slots).nonzero()[:, 1].view(B, -1)  # (B, Q)
    x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    return x, q, slots.gather(1, rows)


def finish(blk, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The rest of the block at the rows x (B, Q, D) whose queries are q (B, H, Q, d), attending k, v
    (B, H, K, d) where ``mask`` (B, K) is True (None: every key) -> (B, Q, D)."""
    attn = blk.attn
    if mask is None and hasattr(attn, "attend"):  # sandbox.fast's attention: its kernel choice
        out = attn.attend(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    B, Q, D = x.shape
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, Q, D))))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def key_mask(buffer_keys: Tensor | None, slots: Tensor | None, seq_len: int) -> Tensor | None:
    """The key mask (B, K) of ``slots`` (B, K; None: every slot) from the buffer's (B, buf); None without one."""
    if buffer_keys is None:
        return None
    every = torch.cat([buffer_keys, buffer_keys.new_ones(buffer_keys.shape[0], seq_len)], 1)  # (B, S)
    return every if slots is None else every.gather(1, slots)


def same_count(rows: Tensor) -> bool:
    """Whether every row of a (B, S) bool tensor has as many True values (the rows then stack as (B, A))."""
    counts = rows.sum(1)
    return bool((counts == counts[:1]).all())
