"""A decoder-only transformer with causal attention and a KV cache: the AR rows of MAR's Table 1.

MAR's Table 1 compares, at one model size, AR in raster order with causal attention, random-order AR with
causal attention, and random-order bidirectional models (MAR). The official repository did not release the
causal code (LTH14/mar#34); this is the sandbox's own, built so that raster and random order differ only in the
order: the model is always told which position it predicts, which random order needs.

One sequence, two streams that share every weight (XLNet's two-stream attention):

    prefix    model.buffer_size condition slots (one condition token repeated, or T tokens and padding, as
              MARBackbone's buffer), attending to each other only;
    content   one token per position in the generation order: the token's value (linear) + its position's
              embedding; causal: a content token attends the prefix, itself and the content earlier in the order;
    queries   one per position to predict: a learned mask token + that position's embedding; a query attends the
              prefix and the content strictly earlier in the order, and nobody attends a query.

The final LayerNorm of a query is the condition the head receives for its position. Training is teacher forcing
along the ordering's ``generation_order``: every position is queried, each sees exactly the tokens before it.
Sampling keeps, per block, the keys and values of the prefix and of every revealed content token (the KV cache):
a step feeds the tokens revealed since the previous step (in sequence order among themselves) and the step's
queries, and appends the new keys and values. Several positions per step work as RandAR's parallel decoding:
the step's queries see the cache, not each other. Classifier-free guidance doubles the batch, so the
conditional and the unconditional rows keep their own caches. ``use_cache: false`` recomputes every step from
scratch (``forward`` with the reveal order), the reference the cache is tested against.

Tokens known at the start (editing) are fed first, in sequence order: one more order for a random-order model,
an unseen one for a raster model unless they are a raster prefix.

What it reads of an ordering: ``generation_order`` (training), the sampling plan (which positions each step
predicts), and from ``step_inputs`` only what is known. An ordering whose ``step_inputs`` shows guesses at
positions not yet known (a coarse-to-fine pyramid shows the upsampled coarser scale) is refused: the causal
backbone would ignore the guesses, so the ordering's design would silently not apply. So is a plan that predicts
positions out of a fixed ``generation_order``: training would not rehearse sampling. Orderings' mask-ratio
settings do not apply (teacher forcing trains on every position); position groups (scales) are not embedded
(every position has its own embedding already).

Size: width ``model.encoder_dim``, depth ``model.encoder_depth + model.decoder_depth``, ``model.encoder_heads``
heads, MAR's dropout, MLP ratio and LayerNorm eps, MAR's initialisation -- with ``decoder_dim = encoder_dim``
(every MAR size) it has MAR's transformer parameters, give or take the embeddings. A training step computes
buffer_size + 2L rows per block (two streams), MAR's encoder about buffer_size + 0.15 L and its decoder
buffer_size + L, so at equal steps the causal backbone spends more compute; Table 1 compares at equal size and
epochs, as the recipes in recipes/ablations/ do.

References:
    MAR: Li et al., NeurIPS 2024, sec. 4 and Table 1 (raster / random order, causal / bidirectional).
    XLNet: Yang et al., NeurIPS 2019, sec. 2.3 (two-stream self-attention: a query stream that knows the target
        position but not its content).
    RandAR: Pang et al., "RandAR: Decoder-only Autoregressive Visual Generation in Random Orders", CVPR 2025
        (position instruction tokens; parallel decoding of several positions against one KV cache).
    sigma-GPT: Pannatier et al., ECML 2024 (the alternative: the next position's encoding added to each input).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sandbox.core.checks import broken
from sandbox.core.contracts import Backbone, BackboneSampler, ConditionTokens, Ordering, TrainingSplit
from sandbox.core.transformer import MARConfig, condition_buffer, init_linears_and_norms
from sandbox.errors import UserError


# --------------------------------------------------------------------------------------
# The block: one set of weights for both streams
# --------------------------------------------------------------------------------------
class CausalBlock(nn.Module):
    """A pre-norm transformer block (timm ``Block``'s layout and parameters) whose attention takes explicit keys,
    values and a mask, so the content stream, the query stream and the KV cache share it."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop=proj_drop)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Content rows (B, T, W) -> queries, keys, values (B, H, T, d) each."""
        B, T, W = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, W // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def query(self, g: Tensor) -> Tensor:
        """Query rows (B, Q, W) -> their queries (B, H, Q, d): the query stream needs no keys or values."""
        B, Q, W = g.shape
        q = F.linear(self.norm1(g), self.qkv.weight[:W], self.qkv.bias[:W])  # (B, Q, W)
        return q.view(B, Q, self.heads, W // self.heads).transpose(1, 2)

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Rows x (B, T, W) with their queries q attending keys/values (B, H, S, d) where ``mask`` (broadcast to
        (B, 1, T, S), True: may attend) allows, then the MLP: (B, T, W)."""
        B, T, W = x.shape
        p = self.attn_drop if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=p)
        x = x + self.proj_drop(self.proj(a.transpose(1, 2).reshape(B, T, W)))  # (B, T, W)
        return x + self.mlp(self.norm2(x))  # (B, T, W)

    def forward(self, x: Tensor, g: Tensor, x_mask: Tensor | None, g_mask: Tensor | None, last: bool = False
                ) -> tuple[Tensor, Tensor]:
        """Both streams through the block: content/prefix x (B, S, W), queries g (B, Q, W) attending x's keys.
        ``last``: x is returned as it came (after the last block only the queries are read)."""
        q, k, v = self.project(x)  # (B, H, S, d) each
        g = self.finish(g, self.query(g), k, v, g_mask)  # (B, Q, W)
        return (x if last else self.finish(x, q, k, v, x_mask)), g


# --------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------
class CausalBackbone(Backbone):
    """Decoder-only causal transformer (content + query streams), teacher forcing in training, a KV cache in
    sampling; raster order gives MAR Table 1's AR, a random order its random-order causal AR."""

    contract_args = {}  # the core passes the model settings; the contract kit builds it small
    resumable_args = ("use_cache",)  # how sampling computes, not what is trained

    def __init__(self, model: MARConfig, seq_len: int, token_dim: int, num_groups: int = 1,
                 use_cache: bool = True):  # False: every sampling step from scratch (the cache's reference)
        super().__init__(model, seq_len, token_dim, num_groups)
        if model.attention != "sdpa":
            raise UserError(f"backbone CausalBackbone computes its masked attention with torch SDPA; model.attention "
                            f"{model.attention!r} is MARBackbone's option: set it to sdpa")
        self.config, self.use_cache = model, bool(use_cache)
        W, buf = model.encoder_dim, model.buffer_size
        self.out_dim = self.cond_width = W
        self.z_proj = nn.Linear(token_dim, W)  # a token's value -> the content stream
        self.query_token = nn.Parameter(torch.zeros(1, 1, W))  # the query stream: "predict the token here"
        self.pos_embed = nn.Parameter(torch.zeros(seq_len, W))  # shared by a position's content and query
        self.prefix_pos = nn.Parameter(torch.zeros(1, buf, W))
        self.input_norm = nn.LayerNorm(W, eps=1e-6)  # as MAR's z_proj_ln: on every stream's input
        self.blocks = nn.ModuleList(
            CausalBlock(W, model.encoder_heads, model.mlp_ratio, model.norm_eps, model.attn_dropout,
                        model.proj_dropout)
            for _ in range(model.encoder_depth + model.decoder_depth))
        self.norm = nn.LayerNorm(W, eps=model.norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # as MARBackbone (the official MAR init): N(0, 0.02) embeddings, xavier-uniform linears, unit LayerNorms
        for p in (self.query_token, self.pos_embed, self.prefix_pos):
            nn.init.normal_(p, std=0.02)
        init_linears_and_norms(self)

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    # -- what it works with -------------------------------------------------------------------------------
    def check_ordering(self, ordering: Ordering) -> None:
        problem = ordering_problem(ordering)
        if problem:
            raise UserError(f"backbone {type(self).__name__} and ordering {type(ordering).__name__} cannot work "
                            f"together: {problem}")

    def training_split(self, ordering: Ordering, seq: Tensor, generator: torch.Generator | None = None
                       ) -> TrainingSplit:
        """Teacher forcing: every position visible and with loss 1, along the ordering's generation order."""
        B, L, _ = seq.shape
        order = ordering.generation_order(B, generator, seq.device)  # (B, L)
        ok = isinstance(order, Tensor) and tuple(order.shape) == (B, L) and not order.is_floating_point()
        if not ok or not torch.equal(order.sort(1).values, torch.arange(L, device=order.device).expand(B, L)):
            raise broken(ordering, "ordering", f"generation_order gave {getattr(order, 'shape', order)!s:.60}; "
                                               f"expected ({B}, {L}) integers, each row a permutation of 0..{L - 1}")
        everything = torch.ones(B, L, dtype=torch.bool, device=seq.device)
        return TrainingSplit(inputs=seq, visible=everything, weight=everything.to(seq.dtype), order=order.long())

    # -- embeddings ---------------------------------------------------------------------------------------
    def embed_prefix(self, cond: ConditionTokens) -> tuple[Tensor, Tensor | None]:
        """The condition slots (B, buf, W) and their key mask (B, buf) (None: every slot is real)."""
        tokens, keys = condition_buffer(cond, self.config.buffer_size, "the causal backbone's prefix")
        return self.input_norm(tokens + self.prefix_pos), keys

    def embed_content(self, values: Tensor, positions: Tensor) -> Tensor:
        """Token values (B, m, C) at sequence positions (B, m) -> content rows (B, m, W)."""
        return self.input_norm(self.z_proj(values) + self.pos_embed[positions])

    def embed_queries(self, positions: Tensor) -> Tensor:
        """Positions to predict (B, Q) -> query rows (B, Q, W)."""
        return self.input_norm(self.query_token + self.pos_embed[positions])

    # -- training, and sampling without the cache -----------------------------------------------------------
    def forward(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens, query: Tensor | None = None,
                order: Tensor | None = None) -> Tensor:
        """tokens (B, L, C), visible (B, L) bool, cond, query (B, L) bool, order (B, L) -> z[query] (N, W), or
        (B, L, W) without ``query``.

        The content stream runs along ``order`` (None: the visible positions first, then the others, each in
        sequence order); a content token takes part only where ``visible``, so a position's condition depends
        on the visible tokens before it in the order. Training shows every token (teacher forcing)."""
        L = tokens.shape[1]
        if order is None:
            order = (torch.arange(L, device=tokens.device) + L * (~visible).long()).argsort(1)  # (B, L)
        prefix, prefix_keys = self.embed_prefix(cond)  # (B, buf, W)
        content = self.embed_content(tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1])), order)
        x = torch.cat([prefix.to(content.dtype), content], 1)  # (B, buf+L, W): prefix, then content in order
        g = self.embed_queries(order)  # (B, L, W): the query of the i-th position in the order
        x_mask, g_mask = self.stream_masks(visible.gather(1, order), prefix_keys)
        for i, blk in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, g = checkpoint(blk, x, g, x_mask, g_mask, last, use_reentrant=False)
            else:
                x, g = blk(x, g, x_mask, g_mask, last)
        z = self.norm(g)  # (B, L, W) in order
        z = torch.empty_like(z).scatter_(1, order[..., None].expand(-1, -1, z.shape[-1]), z)  # (B, L, W) in sequence
        return z if query is None else z[query]

    def stream_masks(self, shown: Tensor, prefix_keys: Tensor | None) -> tuple[Tensor, Tensor]:
        """Who attends whom, True: may attend. ``shown`` (B, L): content slot i (in order) holds a visible token.
        Returns the prefix+content mask (B|1, 1, buf+L, buf+L) and the queries' (B|1, 1, L, buf+L): the prefix
        sees the prefix; content i sees the prefix and shown content j <= i; query i the prefix and shown j < i.
        Every row keeps a key: the prefix has a real slot in every row."""
        B, L = shown.shape
        buf, dev = self.config.buffer_size, shown.device
        i = torch.arange(L, device=dev)
        content = torch.cat([torch.ones(L, buf, dtype=torch.bool, device=dev), i[None, :] <= i[:, None]], 1)
        prefix = torch.cat([torch.ones(buf, buf, dtype=torch.bool, device=dev),
                            torch.zeros(buf, L, dtype=torch.bool, device=dev)], 1)
        x_mask = torch.cat([prefix, content], 0)  # (buf+L, buf+L)
        g_mask = torch.cat([torch.ones(L, buf, dtype=torch.bool, device=dev), i[None, :] < i[:, None]], 1)
        if prefix_keys is None and bool(shown.all()):
            return x_mask[None, None], g_mask[None, None]
        keys = torch.cat([prefix_keys if prefix_keys is not None else shown.new_ones(B, buf), shown], 1)
        return x_mask[None, None] & keys[:, None, None], g_mask[None, None] & keys[:, None, None]

    # -- sampling with the cache ----------------------------------------------------------------------------
    def start_sampling(self, cond: ConditionTokens) -> BackboneSampler:
        return CausalSampler(self, cond)

    @torch.no_grad()
    def prefill(self, cond: ConditionTokens) -> KVCache:
        """The prefix through every block, its keys and values in a cache with room for L content tokens (in the
        dtype the blocks compute in: bf16 under a bf16 autocast)."""
        x, prefix_keys = self.embed_prefix(cond)  # (B, buf, W)
        buf, L = x.shape[1], self.seq_len
        cache = KVCache([], prefix_keys, buf)
        mask = None if prefix_keys is None else prefix_keys[:, None, None]  # (B, 1, 1, buf)
        for blk in self.blocks:
            q, k, v = blk.project(x)  # (B, H, buf, d)
            K = k.new_empty(*k.shape[:2], buf + L, k.shape[-1])
            V = v.new_empty(*v.shape[:2], buf + L, v.shape[-1])
            K[:, :, :buf], V[:, :, :buf] = k, v
            cache.kv.append((K, V))
            if blk is not self.blocks[-1]:  # the last block's outputs feed nothing
                x = blk.finish(x, q, k, v, mask)
        return cache

    @torch.no_grad()
    def extend(self, cache: KVCache, values: Tensor, positions: Tensor, queries: Tensor) -> Tensor:
        """Append the content tokens ``values`` (B, m, C) at ``positions`` (B, m) to ``cache`` (in that order) and
        return the conditions of the positions ``queries`` (B, Q): (B, Q, W). The queries see the whole cache,
        the new tokens included, and not each other."""
        n, m = cache.length, positions.shape[1]
        x = self.embed_content(values, positions)  # (B, m, W)
        g = self.embed_queries(queries)  # (B, Q, W)
        x_mask, g_mask = cache.masks(m)
        for blk, (K, V) in zip(self.blocks, cache.kv):
            if m:
                q, k, v = blk.project(x)  # (B, H, m, d)
                K[:, :, n : n + m], V[:, :, n : n + m] = k, v
            keys, values_ = K[:, :, : n + m], V[:, :, : n + m]
            if m and blk is not self.blocks[-1]:  # the content's last-block outputs feed nothing
                x = blk.finish(x, q, keys, values_, x_mask)
            g = blk.finish(g, blk.query(g), keys, values_, g_mask)
        cache.length = n + m
        return self.norm(g)  # (B, Q, W)


@dataclass
class KVCache:
    """Per block the keys and values (B, H, buf+L, d) of the prefix and the content fed so far (the first
    ``length`` slots), and the prefix's key mask (B, buf) or None."""

    kv: list[tuple[Tensor, Tensor]]
    prefix_keys: Tensor | None
    length: int

    def masks(self, m: int) -> tuple[Tensor | None, Tensor | None]:
        """Masks for m new content rows (causal among themselves, after the cache) and for the queries (the
        cache and the m new rows), broadcastable to (B, 1, rows, length + m); None where every key is allowed."""
        n = self.length
        dev = self.kv[0][0].device
        keys = None
        if self.prefix_keys is not None:
            B, buf = self.prefix_keys.shape
            keys = torch.cat([self.prefix_keys, self.prefix_keys.new_ones(B, n + m - buf)], 1)[:, None, None]
        x_mask = None
        if m > 1:
            i = torch.arange(m, device=dev)
            x_mask = torch.cat([torch.ones(m, n, dtype=torch.bool, device=dev), i[None, :] <= i[:, None]], 1)
            x_mask = x_mask[None, None]  # (1, 1, m, n+m)
        if keys is not None:
            x_mask = keys if x_mask is None else x_mask & keys
        return x_mask, keys


class CausalSampler(BackboneSampler):
    """One generation of a causal backbone: what it has been shown (in which order) and, with ``use_cache``, the
    KV cache. ``step`` feeds the positions that became known since the previous step, then queries the step's."""

    def __init__(self, backbone: CausalBackbone, cond: ConditionTokens):
        super().__init__(backbone, cond)
        self.fed: Tensor | None = None  # (B, L) bool: positions whose tokens the backbone has read
        self.rank: Tensor | None = None  # (B, L) long: the order they were read in (L + position for the rest)
        self.cache: KVCache | None = None  # made at the first step, under the caller's autocast
        self.count = 0  # positions read so far (the same in every row)
        self.use_cache = backbone.use_cache  # fixed for the generation

    def step(self, tokens: Tensor, visible: Tensor, predict: Tensor) -> Tensor:
        B, L = visible.shape
        if self.fed is None:
            self.fed = torch.zeros_like(visible)
            self.rank = L + torch.arange(L, device=visible.device).expand(B, L).clone()
        new, counts = self.newly_known(visible, predict)
        n, m = self.count, counts
        new_idx = new.nonzero()[:, 1].view(B, m)  # (B, m) in sequence order
        self.rank.scatter_(1, new_idx, torch.arange(n, n + m, device=new.device).expand(B, m))
        self.fed |= new
        self.count += m
        q_idx = predict.nonzero()[:, 1].view(B, -1)  # (B, Q): the plan predicts as many positions in every row
        bb = self.backbone
        if not self.use_cache:
            return bb(tokens, self.fed, self.cond, predict, self.rank.argsort(1))  # (N, W)
        if self.cache is None:
            self.cache = bb.prefill(self.cond)
        values = tokens.gather(1, new_idx[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, m, C)
        z = bb.extend(self.cache, values, new_idx, q_idx)  # (B, Q, W)
        return z.reshape(-1, z.shape[-1])  # (N, W) row-major

    def newly_known(self, visible: Tensor, predict: Tensor) -> tuple[Tensor, int]:
        """The positions known since the previous step (B, L) bool and their count per row; one error line when
        the ordering shows a position it is predicting, hides a known one, or rows differ."""
        name = type(self.backbone).__name__
        if bool((visible & predict).any()):
            raise UserError(f"backbone {name}: a sampling step shows the encoder positions it predicts (guesses); a "
                            "causal backbone reads known tokens only -- use an ordering whose step_inputs shows "
                            "what is known (check_ordering refuses the built-in ones that do not)")
        if bool((self.fed & ~visible).any()):
            raise UserError(f"backbone {name}: a sampling step hides a position an earlier step showed; a causal "
                            "backbone's cache cannot forget a token")
        new = visible & ~self.fed
        counts = new.sum(1)
        if bool((counts != counts[:1]).any()):
            raise UserError(f"backbone {name}: rows learned different numbers of tokens in one step "
                            f"({counts.tolist()}); every row must reveal the same count")
        return new, int(counts[0]) if len(counts) else 0


# --------------------------------------------------------------------------------------
# Orderings a causal backbone can serve
# --------------------------------------------------------------------------------------
def ordering_problem(ordering: Ordering, batch: int = 2) -> str | None:
    """Why a causal backbone cannot sample with ``ordering`` (None: it can), found by walking a short plan:
    ``step_inputs`` must show exactly the known positions, and a fixed ``generation_order`` (the same from two
    seeds) must be the order the plan predicts in, chunk after chunk."""
    L = ordering.seq_len
    plan = ordering.sampling_plan(batch, min(L, 8), torch.Generator().manual_seed(0))
    order = ordering.generation_order(batch, torch.Generator().manual_seed(0))
    fixed = torch.equal(order, ordering.generation_order(batch, torch.Generator().manual_seed(1)))
    rank = order.argsort(1) if fixed else None  # (B, L): where each position comes in the order
    tokens, known, done = torch.zeros(batch, L, 1), torch.zeros(batch, L, dtype=torch.bool), 0
    for i, step in enumerate(plan):
        _, visible = ordering.step_inputs(tokens, known, step)
        if not torch.equal(visible.bool(), known):
            shown = int((visible.bool() & ~known).sum()) // batch
            return (f"at sampling step {i} its step_inputs shows {shown} positions that are not known yet (a "
                    "guess); a causal backbone conditions on known tokens only, in the order they were generated, "
                    "so it would ignore the guesses and the ordering's design would not apply")
        n = int(step.predict[0].sum())
        if rank is not None:
            ranks = rank[step.predict].view(batch, n).sort(1).values
            if not torch.equal(ranks, torch.arange(done, done + n).expand(batch, n)):
                return (f"sampling step {i} predicts positions out of its generation_order; a causal backbone "
                        "trains by teacher forcing along generation_order, so sampling must follow it")
        done += n
        known = known | step.predict
    return None
