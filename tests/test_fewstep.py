"""Few-step sampling (issue 22): per-call step counts on every head with steps, and the shortcut head.

1. ``sample(..., num_steps=k)`` runs exactly the scheduled network calls, and ``num_steps=k`` on a head
   configured with another count gives the samples of a head configured with k (same weights, same seed),
   so a step schedule is the configured sampler at each count; None is the configured count.
2. ``ShortcutHead`` learns tests/test_heads.py's class-conditional 2-D mixture, sampled in 1 and in 4 steps,
   within the same tolerances, at the same model size and training budget (2 x 64, 400 Adam steps).
"""
from __future__ import annotations

import copy
import shutil
from itertools import pairwise

import pytest
import torch
from test_heads import CLASS_VEC, COV_TOL, MEAN_TOL, MEANS, N_SAMPLES, WEIGHT_TOL, WEIGHTS, draw, mixture_stats

from sandbox.core.contracts import Head
from sandbox.plugins.heads.diffusion import DiffusionHead, compiled_runs
from sandbox.plugins.heads.flow import FlowHead
from sandbox.plugins.heads.shortcut import ShortcutHead, dyadic_steps
from sandbox.testing import check_head

# diffusers 0.42 builds a numpy array from a tensor in DPMSolverMultistepScheduler.set_timesteps (harmless)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def randomized(head: Head, seed: int = 0) -> Head:
    """Random values everywhere: the adaLN-zero init makes every output 0, which would hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return head.eval()


# --------------------------------------------------------------------------------------
# 1. Per-call step counts
# --------------------------------------------------------------------------------------
# (class, init_args, network calls for k steps); guidance evaluates both branches in the same call
STEPPED = {
    "ddpm": (DiffusionHead, {"sampler": "ddpm"}, lambda k: k),
    "ddim": (DiffusionHead, {"sampler": "ddim"}, lambda k: k),
    "dpm++": (DiffusionHead, {"sampler": "dpm++"}, lambda k: k),
    "euler": (FlowHead, {"sampler": "euler"}, lambda k: k),
    "heun": (FlowHead, {"sampler": "heun"}, lambda k: 2 * k - 1),  # the last step is Euler
    "shortcut": (ShortcutHead, {"finest_steps": 8}, lambda k: k),
}


def stepped(name: str, steps: int) -> Head:
    cls, args, _ = STEPPED[name]
    return randomized(cls(6, 16, width=24, depth=2, num_sampling_steps=steps, **args))


def count_calls(head: Head, **kw) -> tuple[int, torch.Tensor]:
    """Network evaluations of one ``sample`` call, counted at the output layer: every sampler ends each
    evaluation there, also DDPM's step, which calls the network's parts and not ``head.net`` itself."""
    calls = []
    hook = head.net.final_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = head.sample(torch.randn(9, 16, generator=torch.Generator().manual_seed(3)),
                          generator=torch.Generator().manual_seed(1), **kw)
    finally:
        hook.remove()
    return len(calls), out


def test_every_head_with_steps_declares_it():
    assert Head.supports_num_steps is False
    assert all(cls.supports_num_steps for cls, _, _ in STEPPED.values())


@pytest.mark.parametrize("name", list(STEPPED))
def test_num_steps_sets_the_network_calls(name):
    head, calls_for = stepped(name, 5), STEPPED[name][2]
    unc = torch.randn(9, 16)
    for k in (2, 3, 5, 9, 16):
        for kw in ({}, {"cfg": 2.5, "uncond": unc, "temperature": 0.8}):
            calls, out = count_calls(head, num_steps=k, **kw)
            assert calls == calls_for(k), (k, kw)
            assert out.shape == (9, 6) and torch.isfinite(out).all()
    assert count_calls(head)[0] == calls_for(5)  # None: the configured count, after other counts


@pytest.mark.parametrize("name", list(STEPPED))
def test_num_steps_samples_as_a_head_configured_with_that_count(name):
    head, cond, unc = stepped(name, 5), torch.randn(9, 16), torch.randn(9, 16)
    for k in (3, 8, 5):  # another count, then back to the configured one: caches keep each count apart
        twin = stepped(name, k)  # the same weights (same seed), configured with k
        for args in ((1.0, 1.0, None), (0.8, 2.5, unc)):
            ours = head.sample(cond, *args, torch.Generator().manual_seed(1), num_steps=k)
            theirs = twin.sample(cond, *args, torch.Generator().manual_seed(1))
            assert torch.equal(ours, theirs), (k, args[1])
    plain = head.sample(cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(head.sample(cond, generator=torch.Generator().manual_seed(1), num_steps=None), plain)


@pytest.mark.parametrize("name,bad", [("ddpm", 1), ("ddim", 0), ("ddpm", 1001), ("euler", 0), ("shortcut", 0),
                                      ("heun", 2.0), ("shortcut", True)])
def test_impossible_step_counts_are_refused(name, bad):
    with pytest.raises(ValueError, match="num_steps"):
        stepped(name, 5).sample(torch.randn(2, 16), num_steps=bad)


def test_compiled_runs_cover_the_steps_with_few_lengths():
    lengths = set()
    for S in range(1, 101):
        runs = compiled_runs(S, 10)
        assert runs[0][0] == 0 and runs[-1][1] == S and all(a[1] == b[0] for a, b in pairwise(runs))
        lengths |= {b - a for a, b in runs}
    assert lengths == {10, 8, 4, 2, 1}  # one compiled graph per length, under dynamo's 8 per function
    assert compiled_runs(50, 10) == [(a, a + 10) for a in range(0, 50, 10)]  # the quickstart's 50: unchanged


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@pytest.mark.parametrize("name", ["ddpm", "shortcut"])
def test_compiled_sampling_takes_num_steps(name):
    import torch._dynamo

    head = stepped(name, 5)
    cond, unc = torch.randn(9, 16), torch.randn(9, 16)
    eager = head.sample(cond, 0.9, 2.5, unc, torch.Generator().manual_seed(1), num_steps=3)
    if isinstance(head, DiffusionHead):
        head.compiled_steps_per_call = 2  # 3 steps: runs of 2 and 1, the two graphs every count reuses
    head.compile_sampling()
    compiled = head.sample(cond, 0.9, 2.5, unc, torch.Generator().manual_seed(1), num_steps=3)
    assert (compiled - eager).abs().max() <= 1e-5 * max(1.0, eager.abs().max().item())
    with torch._dynamo.config.patch(error_on_recompile=True):  # other counts reuse the run lengths' graphs
        for k in (5, 4, 2):
            out = head.sample(torch.randn(5, 16), 1.0, 1.7, torch.randn(5, 16), torch.Generator().manual_seed(2),
                              num_steps=k)
            assert out.shape == (5, 6) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------
# 2. The shortcut head
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 100])
def test_dyadic_steps(k):
    sizes = dyadic_steps(k)
    assert len(sizes) == k and sum(sizes) == 1.0  # exact: sums of powers of two
    assert all(s == 2.0 ** round(torch.tensor(s).log2().item()) for s in sizes)
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= 2 * min(sizes)


def test_shortcut_variants_keep_the_contract():
    check_head(ShortcutHead, width=32, depth=1, num_sampling_steps=3, finest_steps=1)  # one size: d = 1
    check_head(ShortcutHead, width=32, depth=1, num_sampling_steps=1, finest_steps=4, sc_fraction=0.0)
    check_head(ShortcutHead, width=32, depth=1, num_sampling_steps=9, finest_steps=4)  # beyond M: the flow


_trained: dict[str, dict] = {}


def trained_shortcut() -> ShortcutHead:
    """ShortcutHead (its defaults, 2 x 64) trained on the mixture as tests/test_heads.py trains the other heads:
    400 Adam steps of 256 rows, lr 3e-3 decayed linearly; once per session."""
    if "state" not in _trained:
        torch.manual_seed(0)
        head = ShortcutHead(2, 8, width=64, depth=2)
        g = torch.Generator().manual_seed(1)
        steps = 400
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        for _ in range(steps):
            labels = torch.randint(0, 3, (256,), generator=g)
            loss = head.loss(draw(labels, g), CLASS_VEC[labels], g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        _trained["state"] = copy.deepcopy(head.state_dict())
    head = ShortcutHead(2, 8, width=64, depth=2)
    head.load_state_dict(_trained["state"])
    return head.eval()


def samples(head, k: int, steps: int, n: int = N_SAMPLES, seed: int = 2, **kw) -> torch.Tensor:
    return head.sample(CLASS_VEC[k].expand(n, -1), generator=torch.Generator().manual_seed(seed + k),
                       num_steps=steps, **kw)


@pytest.mark.parametrize("steps", [1, 4])
def test_shortcut_head_learns_the_mixture(steps):
    head = trained_shortcut()
    for k in range(3):
        s = samples(head, k, steps)
        mean, cov = mixture_stats(k)
        assert torch.isfinite(s).all()
        err_mean = (s.mean(0) - mean).abs().max().item()
        err_cov = (torch.cov(s.T) - cov).abs().max().item()
        assert err_mean < MEAN_TOL, f"{steps} step(s), class {k}: mean off by {err_mean:.3f}"
        assert err_cov < COV_TOL, f"{steps} step(s), class {k}: covariance off by {err_cov:.3f}"
        if k < 2:
            nearest = torch.cdist(s, MEANS[k]).argmin(1)
            weights = torch.bincount(nearest, minlength=2).float() / len(s)
            err_w = (weights - WEIGHTS[k]).abs().max().item()
            assert err_w < WEIGHT_TOL, f"{steps} step(s), class {k}: mode weights {weights.tolist()}"


@pytest.mark.parametrize("steps", [1, 4])
def test_shortcut_temperature_scales_the_initial_noise(steps):
    head = trained_shortcut()
    k = 2  # the single Gaussian: with many steps the map from x_1 is affine and the std scales by T; a young
    # few-step map shrinks it less (the module docstring gives the measured ratios), but always some
    spread = {T: torch.cov(samples(head, k, steps, temperature=T).T).trace().sqrt().item() for T in (1.0, 0.5, 0.0)}
    assert spread[0.0] < 1e-5 < spread[0.5] < spread[1.0], spread  # T = 0: every row is the image of x_1 = 0
    if steps > 1:
        assert spread[0.5] / spread[1.0] < 0.75, f"temperature 0.5 kept {spread[0.5] / spread[1.0]:.2f} of the spread"


@pytest.mark.parametrize("steps", [1, 4])
def test_shortcut_guidance(steps):
    head = trained_shortcut()
    cond = CLASS_VEC[torch.arange(64) % 3]
    uncond = CLASS_VEC[(torch.arange(64) + 1) % 3]  # a different condition, so guidance would show

    def run(**kw):
        return head.sample(cond, generator=torch.Generator().manual_seed(5), num_steps=steps, **kw)

    plain = run()
    assert torch.equal(run(cfg=1.0, uncond=uncond), plain)  # scale 1: the conditional sample, one branch
    assert torch.allclose(run(cfg=1.0 + 1e-6, uncond=uncond), plain, atol=1e-3)  # both branches, batched
    assert (run(cfg=3.0, uncond=uncond) - plain).abs().max() > 1e-2


def test_quickstart_shortcut_recipe_is_the_quickstart_but_for_the_head():
    from conftest import REPO

    from sandbox.config.build import build
    from sandbox.config.files import expand_bases
    from sandbox.config.recipe import recipe_parser

    def parse(name):
        return recipe_parser().parse_args(expand_bases(["--config", str(REPO / "recipes" / name)]))

    cfg = parse("quickstart_shortcut.yaml")
    head = build(cfg).model.head
    assert type(head).__name__ == "ShortcutHead" and head.num_sampling_steps <= 4
    quickstart = parse("quickstart_v1.yaml").as_dict()
    for key in ("data", "tokenizer", "ordering", "model", "train", "sample", "seed"):
        assert cfg.as_dict()[key] == quickstart[key], key
