"""The speed paths change no result: each fast path against the straightforward computation, and the whole
model with ``sandbox.fast.apply`` against the plain PyTorch model.

(The official-parity tests cover the rest: the head's network, one sampler step, the transformer.)
"""
from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from conftest import class_tokens, make_mar

from sandbox import fast
from sandbox.core.transformer import MARBackbone, MARConfig
from sandbox.plugins.heads.diffusion import DiffusionHead
from sandbox.plugins.heads.flow import FlowHead
from sandbox.plugins.heads.gaussian_diffusion import (
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from sandbox.plugins.orderings.random import RandomOrdering


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere: the official init zeroes the head's output, which would hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def test_sampler_loop_is_the_step_by_step_reverse_process():
    head = randomized(DiffusionHead(6, 16, width=24, depth=2, num_sampling_steps=10))
    cond, uncond = torch.randn(9, 16), torch.randn(9, 16)  # 9 rows: small-matrix GEMM kernels too
    for cfg, unc in ((1.0, None), (2.5, uncond)):
        fast = head.sample(cond, 0.9, cfg, unc, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the reference: denoise_step (parity-tested) at every step, t as a (1,) tensor
            c_emb = head.net.embed_cond(cond if unc is None else torch.cat([cond, unc]))
            x = torch.randn(9, 6, generator=g)
            for i in reversed(range(10)):
                noise = torch.randn(x.shape, generator=g)
                x = head.denoise_step(x, torch.full((1,), i), c_emb, cfg, noise, 0.9)
        assert torch.isfinite(x).all() and torch.equal(fast, x)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@pytest.mark.parametrize("make", [lambda: DiffusionHead(6, 16, width=24, depth=2, num_sampling_steps=5),
                                  lambda: FlowHead(6, 16, width=24, depth=2, prediction="x", num_sampling_steps=5)],
                         ids=["diffusion", "flow"])
def test_compiled_sampling_matches_the_eager_loop(make):
    import torch._dynamo

    head = randomized(make())
    cond, uncond = torch.randn(9, 16), torch.randn(9, 16)
    eager = head.sample(cond, 0.9, 2.5, uncond, torch.Generator().manual_seed(1))
    twin = copy.deepcopy(head)
    if isinstance(head, DiffusionHead):
        head.compiled_steps_per_call = 3  # 5 steps: a call of 3, then one of 2
    head.compile_sampling()
    assert head.compiled_sampling and not twin.compiled_sampling  # a runtime flag on one head, not in the weights
    assert head.state_dict().keys() == twin.state_dict().keys()
    compiled = head.sample(cond, 0.9, 2.5, uncond, torch.Generator().manual_seed(1))
    # fused kernels round differently (~1 ulp); the samplers keep it there (DDPM's x0 reaches ~1e4 here)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    with torch._dynamo.config.patch(error_on_recompile=True):  # other row counts and scales: the same graph
        for n, scale in ((5, 1.7), (12, 3.0)):
            again = head.sample(torch.randn(n, 16), 1.0, scale, torch.randn(n, 16), torch.Generator().manual_seed(2))
            assert again.shape == (n, 6) and torch.isfinite(again).all()


def test_decoding_only_the_predicted_positions():
    cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=2,
                    decoder_heads=2, buffer_size=3)
    tr = fast.apply(randomized(MARBackbone(cfg, seq_len=16, token_dim=5)))
    seq, labels = torch.randn(4, 16, 5), class_tokens(torch.arange(4), 32)
    known = torch.zeros(4, 16, dtype=torch.bool)
    for step in RandomOrdering((4, 4)).sampling_plan(4, 4, torch.Generator().manual_seed(0)):
        with torch.no_grad():
            full = tr(seq, known, labels)[step.predict]  # (N, D)
            part = tr(seq, known, labels, query=step.predict)  # (N, D)
        assert part.shape == full.shape
        assert (part - full).abs().max() < 1e-6
        known |= step.predict


def test_training_decodes_only_the_loss_positions():
    cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=2,
                    decoder_heads=2, buffer_size=3, attn_dropout=0.0, proj_dropout=0.0)
    tr = fast.apply(randomized(MARBackbone(cfg, seq_len=16, token_dim=5))).train()
    seq, labels = torch.randn(4, 16, 5), class_tokens(torch.arange(4), 32)
    split = RandomOrdering((4, 4)).training_split(seq, torch.Generator().manual_seed(0))
    loss_at = split.weight > 0
    full = tr(split.inputs, split.visible, labels)[loss_at]  # (N, D)
    part = tr(split.inputs, split.visible, labels, query=loss_at)  # (N, D)
    assert (part - full).abs().max() < 1e-6
    up = torch.randn(full.shape)
    g_full = torch.autograd.grad(full, list(tr.parameters()), up, allow_unused=True)
    g_part = torch.autograd.grad(part, list(tr.parameters()), up, allow_unused=True)
    for a, b in zip(g_full, g_part):
        assert (a is None and b is None) or (a - b).abs().max() < 1e-5


def test_decoder_nll_only_where_t_is_zero():
    head = randomized(DiffusionHead(6, 16, width=24, depth=1))
    d = head.train_diffusion
    target, cond, noise = torch.rand(40, 6) * 2 - 1, torch.randn(40, 16), torch.randn(40, 6)
    t = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0))
    t[::7] = 0
    got = head.losses(target, cond, t, noise)["vb"]
    with torch.no_grad():  # the official: the NLL on every row, then where(t == 0, nll, kl)
        xt = d.q_sample(target, t, noise)
        out = head.net(xt, t, cond)
        true_mean, true_log_var = d.q_posterior(target, xt, t)
        mean, log_var, _ = d.p_mean_variance(out[:, :6], out[:, 6:], xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
    assert torch.equal(got, torch.where(t == 0, nll, kl))


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # with dropout, the recomputed blocks must replay the masks
def test_gradient_checkpointing_changes_no_gradient(dropout):

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1,
                        decoder_heads=2, buffer_size=2, attn_dropout=dropout, proj_dropout=dropout,
                        grad_checkpointing=checkpointing)
        model = make_mar(cfg, 16, 5, 4, DiffusionHead(5, 32, width=24, depth=2,
                                                      grad_checkpointing=checkpointing)).train()
        seq = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        torch.manual_seed(3)  # the dropout masks
        model(seq, RandomOrdering((4, 4)).training_split(seq, g), torch.arange(3), g).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6), name


# --------------------------------------------------------------------------------------
# CPU kernels: the cheaper dropout mask, explicit (chunked) attention, fused training multiply-adds
# --------------------------------------------------------------------------------------
def test_cpu_dropout_mask_rate_scale_and_seed():
    from sandbox.fast.dropout import dropout

    x = torch.ones(512, 1024)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    kept = y[y != 0]
    assert abs((y == 0).float().mean().item() - 0.1) < 2e-3  # 524k draws: 4 standard deviations
    assert torch.all(kept == kept[0]) and abs(kept[0].item() - 1 / (1 - 6554 / 65536)) < 1e-6
    assert abs(y.mean().item() - 1.0) < 3e-3  # the expectation is the input
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1), y)  # the default generator's seed fixes the mask
    assert not torch.equal(dropout(x, 0.1), y)
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    half = dropout(torch.ones(64, 64, dtype=torch.bfloat16), 0.1)  # other dtypes: F.dropout, dtype kept
    assert half.dtype == torch.bfloat16


def test_cpu_dropout_gradient_uses_the_forward_mask():
    from sandbox.fast.dropout import dropout

    x = torch.randn(300, 70, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, y == 0)
    assert torch.allclose(x.grad[y != 0], (y / x)[y != 0])


def test_transformer_blocks_use_the_cpu_dropout():
    from sandbox.fast.dropout import Dropout

    tr = MARBackbone(MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32,
                               decoder_depth=1, decoder_heads=2, proj_dropout=0.2), 16, 5)
    drops = [m for m in tr.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is torch.nn.Dropout for m in drops)  # built plain
    fast.apply(tr)
    assert all(type(m) is Dropout for m in drops)
    fast.apply(tr, enabled=False)
    assert all(type(m) is torch.nn.Dropout for m in drops)
    assert {m.p for m in drops} == {0.2, 0.1}  # proj/MLP 0.2, attention 0.1: p kept


def test_explicit_attention_equals_sdpa():
    from sandbox.fast.attention import explicit_attention

    g = torch.Generator().manual_seed(0)
    for B, H, Tq, T, d in ((5, 2, 9, 9, 8), (7, 3, 4, 30, 16), (2, 1, 1, 1, 4)):
        q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (Tq, T, T))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        for block in (1 << 18, 2 * H * Tq * T, 1):  # one chunk, chunks of two rows, one row at a time
            assert (explicit_attention(q, k, v, d ** -0.5, block=block) - want).abs().max() < 1e-6


def test_mar_attention_matches_timm_on_short_and_long_sequences():
    from timm.layers import Attention

    from sandbox.fast.attention import FastAttention

    ours, ref = FastAttention(32, num_heads=4).eval(), Attention(32, num_heads=4).eval()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    for T in (20, FastAttention.cpu_explicit_max_keys + 40):  # explicit path, then SDPA's kernel
        x = torch.randn(3, T, 32, generator=g)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_fused_training_head_equals_the_official_order():
    head = fast.apply(randomized(DiffusionHead(6, 16, width=24, depth=2)))
    x, t, z = torch.randn(50, 6), torch.randint(0, 1000, (50,)), torch.randn(50, 16)
    with torch.no_grad():
        official = head.net(x, t, z)  # eval: the official order of operations
        fused = head.net.train()(x, t, z)  # training: the fused residual blocks
    assert (fused - official).abs().max() < 1e-5


def test_fused_residual_block_gradients():
    from sandbox.core.adaln_mlp import ResBlock
    from sandbox.fast.adaln import fused_res_block

    block = randomized(ResBlock(12).double())
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(6.0)  # modulations of order 1: every term of the backward matters
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(7, 12, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    up = torch.randn(7, 12, dtype=torch.float64, generator=g)
    grads = {}
    for name, fn in (("fused", lambda: fused_res_block(block, x, y)), ("autograd", lambda: block(x, y))):
        out = fn()
        inputs = (x, y, *block.parameters())
        grads[name] = (out, *torch.autograd.grad(out, inputs, up))
    for a, b in zip(grads["fused"], grads["autograd"]):  # the module in eval mode: plain autograd
        assert (a - b).abs().max() < 1e-12
    assert torch.autograd.gradcheck(lambda x, y: fused_res_block(block, x, y), (x, y))


def test_keep_freed_memory_opt_out(monkeypatch):
    from sandbox.fast.allocator import keep_freed_memory

    monkeypatch.setenv("SANDBOX_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("SANDBOX_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # a user's own malloc settings win
    assert keep_freed_memory() is False


def test_explicit_attention_dropout_is_seeded_and_chunk_independent():
    from sandbox.fast.attention import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 10, 8, generator=g) for _ in range(3))
    outs = []
    for block in (1 << 18, 2 * 2 * 10 * 10, 1):  # one chunk, chunks of two rows, one row at a time
        torch.manual_seed(5)
        outs.append(explicit_attention(q, k, v, 8 ** -0.5, p=0.3, block=block))
    assert all((o - outs[0]).abs().max() < 1e-6 for o in outs)
    torch.manual_seed(6)
    assert (explicit_attention(q, k, v, 8 ** -0.5, p=0.3) - outs[0]).abs().max() > 1e-3


def test_cpu_kernels_step_aside_under_torch_compile():
    from sandbox.core.adaln_mlp import ResBlock

    torch.manual_seed(0)
    cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1,
                    decoder_heads=2, buffer_size=2)
    model = fast.apply(make_mar(cfg, 16, 5, 4, DiffusionHead(5, 32, width=24, depth=1))).train()
    for blk in list(model.backbone.encoder_blocks) + list(model.backbone.decoder_blocks):
        blk.compile(backend="aot_eager", dynamic=True)  # traced like inductor, without a C++ compiler
    for block in model.head.net.res_blocks:
        assert isinstance(block, ResBlock)
        block.compile(backend="aot_eager", dynamic=True)
    seq = torch.randn(3, 16, 5)
    g = torch.Generator().manual_seed(2)
    loss = model(seq, RandomOrdering((4, 4)).training_split(seq, g), torch.arange(3), g)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.head.parameters())


# --------------------------------------------------------------------------------------
# The whole model: sandbox.fast.apply against the plain PyTorch model
# --------------------------------------------------------------------------------------
def _twins():
    """A plain MAR with random weights and its copy with the speed paths on (no dropout: the CPU masks draw
    other random numbers than nn.Dropout, by design)."""

    torch.manual_seed(0)
    cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=2,
                    decoder_heads=2, buffer_size=2, attn_dropout=0.0, proj_dropout=0.0)
    plain = randomized(make_mar(cfg, 16, 5, 4, DiffusionHead(5, 32, width=24, depth=2, x0_clip=1.0,
                                                             num_sampling_steps=5)))
    return plain, fast.apply(copy.deepcopy(plain))


def test_fast_paths_train_like_the_plain_model():
    plain, quick = _twins()
    assert type(quick.backbone) is not type(plain.backbone)  # the twin classes are in place
    seq, labels = torch.randn(6, 16, 5, generator=torch.Generator().manual_seed(1)), torch.arange(6) % 4
    losses, grads = [], []
    for model in (plain, quick):
        model.train()
        g = torch.Generator().manual_seed(2)
        loss = model(seq, RandomOrdering((4, 4)).training_split(seq, g), labels, g)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert (losses[0] - losses[1]).abs() <= 1e-5 * losses[0].abs()  # measured: ~1e-7 relative
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max() <= 1e-4 * (1 + g.abs().max()), name


def test_fast_paths_sample_like_the_plain_model():
    from sandbox.core.sampling import sample_tokens

    plain, quick = _twins()
    out = [sample_tokens(m.eval(), RandomOrdering((4, 4)), 5, torch.arange(8) % 4, num_iter=4, cfg=2.0,
                         generator=torch.Generator().manual_seed(3)) for m in (plain, quick)]
    assert torch.isfinite(out[0]).all()
    assert (out[0] - out[1]).abs().max() < 1e-4  # x0 clipped to [-1, 1]: rounding stays small (measured ~1e-6)
