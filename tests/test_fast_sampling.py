"""Fast sampling (issue 22): head-step annealing, caching across plan steps, and that every option stacks.

1. A head-step schedule is DiSA's annealing: its counts are what the head runs, so the head's network calls drop
   by exactly the steps the schedule takes away; a bad schedule, or one a head cannot follow, is one line.
2. ``cache exact`` gives the samples of no cache (same seed, within float rounding); ``approx`` recomputes only
   what changed between full steps and skips the unconditional branch there; a backbone with its own state
   refuses it.
4. Every combination of the options -- with guidance, every ordering, the few-step head, the compiled head and
   the causal backbone's KV cache -- runs and returns finite samples.
"""
from __future__ import annotations

import copy
import itertools
import shutil

import pytest
import torch
from conftest import TINY_RECIPE

import sandbox
from sandbox import fast
from sandbox.core.contracts import Head
from sandbox.core.sampling import check_head_steps, sample_tokens
from sandbox.core.schedules import HeadSteps
from sandbox.errors import UserError
from sandbox.fast.step_cache import CacheMode, GuidanceCache, MARStepCache, check_cache, sampler_for

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

HEADS = {  # (head recipe, network calls of one sample call with k steps)
    "ddpm": ({"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 10,
                                                           "x0_clip": 1.0}}, lambda k: k),
    "dpm++": ({"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 10,
                                                            "x0_clip": 1.0, "sampler": "dpm++"}}, lambda k: k),
    "heun": ({"class_path": "FlowHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 10,
                                                      "sampler": "heun"}}, lambda k: 2 * k - 1),
    "shortcut": ({"class_path": "ShortcutHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 4}},
                 lambda k: k),
}
ORDERINGS = {"random": {"class_path": "RandomOrdering"}, "raster": {"class_path": "RasterOrdering"},
             "multiscale": {"class_path": "MultiscaleOrdering"}}



def tiny(head: str = "ddpm", ordering: str = "random", backbone: dict | None = None, fast_paths: bool = True,
         scale: float = 0.05):
    """The tiny recipe's parts with ``head`` / ``ordering`` (/ ``backbone``), random weights (the official init
    zeroes the head's output, which would hide differences) of std ``scale`` (the head's: 0.05, beyond which a
    random DDPM head's learned variance overflows), in eval mode."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["head"], recipe["ordering"] = copy.deepcopy(HEADS[head][0]), copy.deepcopy(ORDERINGS[ordering])
    if backbone is not None:
        recipe["backbone"] = backbone
    exp = sandbox.build(recipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in exp.model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name.startswith("head.") else scale))
    fast.apply(exp.model, fast_paths)
    exp.model.eval()
    return exp


def sample(exp, cfg: float = 3.0, num_iter: int = 4, seed: int = 1, **kw) -> torch.Tensor:
    return sample_tokens(exp.model, exp.ordering, exp.tokenizer.token_dim, torch.arange(6) % 4, num_iter=num_iter,
                         cfg=cfg, temperature=0.9, generator=torch.Generator().manual_seed(seed), **kw)


def head_calls(exp, **kw) -> int:
    """The head's network evaluations over one generation, counted at its output layer (tests/test_fewstep.py)."""
    calls = []
    hook = exp.model.head.net.final_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        sample(exp, **kw)
    finally:
        hook.remove()
    return len(calls)


# --------------------------------------------------------------------------------------
# 1. Head-step annealing
# --------------------------------------------------------------------------------------
def test_schedules_go_from_start_to_end_over_the_plan():
    linear, cosine = HeadSteps.parse("linear:50:5"), HeadSteps.parse("cosine:50:5")
    for n in (1, 2, 7, 16, 64):
        lin, cos = [linear.at(i, n) for i in range(n)], [cosine.at(i, n) for i in range(n)]
        assert lin[0] == cos[0] == 50 and (n == 1 or lin[-1] == cos[-1] == 5)
        assert lin == sorted(lin, reverse=True) and cos == sorted(cos, reverse=True)
        half = (n + 1) // 2  # cosine keeps more steps than linear in the first half, fewer in the second
        assert all(c >= s for c, s in zip(cos[:half], lin)) and all(c <= s for c, s in zip(cos[half:], lin[half:]))
    assert [linear.at(i, 10) for i in range(10)] == [50, 45, 40, 35, 30, 25, 20, 15, 10, 5]
    assert [HeadSteps.parse([9, 3]).at(i, 4) for i in range(4)] == [9, 9, 3, 3]  # a list spread over the plan
    assert HeadSteps.parse("linear:100%:10%").resolve(50) == HeadSteps("linear", (50, 5))
    assert HeadSteps.parse("50%").resolve(7).at(0, 3) == 4  # 3.5 rounds half up
    assert HeadSteps.parse("linear:4:1").at(1, 3) == 3  # 2.5 rounds half up
    assert HeadSteps.parse(12).at(5, 8) == 12 and HeadSteps.parse("12").at(0, 1) == 12


@pytest.mark.parametrize("bad", ["lin:50:5", "linear:0:5", "linear:5", "linear:5:x%", "", "-3", "0%", [], [3, 0],
                                 0, True, 2.5])
def test_a_bad_schedule_is_one_error_naming_the_syntax(bad):
    with pytest.raises(ValueError, match="linear:50:5"):
        HeadSteps.parse(bad)
    exp = tiny()
    with pytest.raises(UserError, match="^head_steps: "):
        sample(exp, head_steps=bad)


@pytest.mark.parametrize("name", list(HEADS))
def test_annealed_steps_cut_the_head_calls_by_the_scheduled_count(name):
    exp, calls_for = tiny(name), HEADS[name][1]
    own = exp.model.head.default_num_steps
    n = len(exp.ordering.sampling_plan(6, 4))
    for spec in ("linear:100%:25%", "cosine:10:2", [6, 3, 2], 3):
        schedule = HeadSteps.parse(spec).resolve(own)
        for cfg in (1.0, 3.0):  # guidance evaluates both branches in each call
            saved = head_calls(exp, cfg=cfg) - head_calls(exp, cfg=cfg, head_steps=spec)
            assert saved == sum(calls_for(own) - calls_for(schedule.at(i, n)) for i in range(n)), (spec, cfg)


def test_a_head_without_step_counts_refuses_a_schedule():
    class Fixed(Head):  # supports_num_steps stays False
        def sample(self, cond, temperature=1.0, cfg=1.0, uncond=None, generator=None, num_steps=None):
            return torch.zeros(cond.shape[0], self.token_dim)

    with pytest.raises(UserError, match="Fixed takes no step count .* drop head_steps"):
        check_head_steps(Fixed(4, 8), "linear:10:2")
    exp = tiny()
    with pytest.raises(UserError, match="refuses 1 steps"):  # DDPM needs two: the head says so, before sampling
        check_head_steps(exp.model.head, "linear:10:1")
    with pytest.raises(UserError, match="share of the head's own step count"):
        check_head_steps(Fixed(4, 8), "50%")
    check_head_steps(exp.model.head, "cosine:100%:20%")


def test_fast_fits_its_schedule_to_the_head_s_fewest_steps():
    """`--fast`'s share of the head's own count, lifted to the fewest steps the head takes (DDPM: 2)."""
    from sandbox.fast.sampling import fit_schedule

    ddpm, heun = tiny("ddpm").model.head, tiny("heun").model.head  # 10 own steps each
    assert fit_schedule(ddpm, "20%") == "2" and fit_schedule(ddpm, "10%") == "2"  # 1 step: lifted to DDPM's 2
    assert fit_schedule(heun, "10%") == "1"  # a flow head takes one step
    assert fit_schedule(ddpm, "linear:100%:10%") == "linear:10:2" and fit_schedule(ddpm, "100%") == "10"


# --------------------------------------------------------------------------------------
# 2. Caching across plan steps
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ordering", list(ORDERINGS))
@pytest.mark.parametrize("fast_paths", [True, False])
def test_an_exact_cache_gives_the_samples_of_no_cache(ordering, fast_paths):
    exp = tiny(ordering=ordering, fast_paths=fast_paths, scale=0.3)  # large enough weights that inputs matter
    for cfg in (1.0, 3.0):
        plain = sample(exp, cfg=cfg, num_iter=5)
        cached = sample(exp, cfg=cfg, num_iter=5, sampler=sampler_for("exact"))
        assert torch.isfinite(plain).all()
        # x0 clipped, so rounding stays small (measured up to ~2e-5 after DDPM's amplification); the bound of
        # tests/test_fast_paths.py for a path that rounds differently
        assert (cached - plain).abs().max() < 1e-4, (ordering, cfg)
        full_every_step = sample(exp, cfg=cfg, num_iter=5, sampler=sampler_for("approx:1"))  # its own block loop
        assert (full_every_step - plain).abs().max() < 1e-4


def test_the_token_cache_recomputes_only_what_changed():
    """Between full steps, a step that changed nothing reproduces the full step's conditions from the cache
    alone; one that changed something does not compute every row (its conditions differ a little)."""
    exp = tiny(scale=0.3)
    bb, plan = exp.model.backbone, exp.ordering.sampling_plan(3, 5, torch.Generator().manual_seed(0))
    cond = exp.model.conditions(torch.arange(3), 3)
    tokens, known = torch.randn(3, 16, 12), torch.zeros(3, 16, dtype=torch.bool)
    cache, errors = MARStepCache(bb, cond, False, CacheMode.parse("approx:100")), []
    with torch.no_grad():
        for step in plan:
            z = cache.step(tokens.clone(), known, step.predict)
            errors.append((z - bb(tokens, known, cond, query=step.predict)).abs().max().item())
            assert torch.allclose(cache.step(tokens.clone(), known, step.predict), z, atol=1e-5)  # nothing changed
            known |= step.predict
    assert errors[0] < 1e-5 and max(errors[1:]) > 1e-3, errors  # step 0 is a full step; later ones reuse


def test_the_condition_cache_skips_the_unconditional_branch_between_full_steps():
    exp = tiny(scale=0.3)
    bb, seen = exp.model.backbone, []
    # a backbone other than MAR's, without a sampler of its own: the condition cache alone, over its forward
    sampler = GuidanceCache(bb, exp.model.conditions(torch.arange(3), 3, guided=True), True, CacheMode.parse("approx:2"))
    tokens, known = torch.zeros(6, 16, 12), torch.zeros(6, 16, dtype=torch.bool)
    original = type(bb).forward

    def counting(self, tokens, *args, **kw):
        seen.append(tokens.shape[0])
        return original(self, tokens, *args, **kw)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(type(bb), "forward", counting)
        for step in exp.ordering.sampling_plan(3, 4, torch.Generator().manual_seed(0)):
            predict = torch.cat([step.predict] * 2)
            assert sampler.step(tokens, known, predict).shape == (int(predict.sum()), bb.out_dim)
            known |= predict
    assert seen == [6, 3, 6, 3]  # both branches at the full steps only


def test_a_backbone_with_its_own_cache_keeps_it_and_refuses_approx():
    exp = tiny(ordering="raster", backbone={"class_path": "CausalBackbone"}, scale=0.3)
    plain = sample(exp, num_iter=16)
    assert torch.equal(sample(exp, num_iter=16, sampler=sampler_for("exact")), plain)  # its own KV cache
    with pytest.raises(UserError, match="CausalBackbone cannot follow"):
        check_cache("approx:2", exp.model.backbone)
    with pytest.raises(UserError, match="CausalBackbone cannot follow"):
        sample(exp, num_iter=16, sampler=sampler_for("approx:2"))


@pytest.mark.parametrize("bad", ["on", "approx", "approx:0", "approx:2:0", "exact:2", "approx:x", ""])
def test_a_bad_cache_is_one_error_naming_the_syntax(bad):
    with pytest.raises(ValueError, match="approx:N"):
        CacheMode.parse(bad)


def test_refresh_rule():
    assert [CacheMode.parse("approx:3").full_at(i) for i in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert [CacheMode.parse("approx:9:5").full_at(i) for i in range(10)] == [1] * 5 + [0] * 4 + [1]  # ~LazyMAR
    assert all(CacheMode.parse("exact").full_at(i) for i in range(5))


# --------------------------------------------------------------------------------------
# 4. Stacking
# --------------------------------------------------------------------------------------
GRID = list(itertools.product(["ddpm", "shortcut"], list(ORDERINGS), [None, "linear:100%:50%"],
                              ["off", "exact", "approx:2"], [1.0, 3.0]))


@pytest.mark.parametrize("head,ordering", list(itertools.product(["ddpm", "shortcut"], list(ORDERINGS))))
def test_every_option_combination_returns_finite_samples(head, ordering):
    exp = tiny(head, ordering, scale=0.3)
    for _, _, head_steps, cache, cfg in (g for g in GRID if g[:2] == (head, ordering)):
        out = sample(exp, cfg=cfg, num_iter=3, head_steps=head_steps, sampler=sampler_for(cache))
        assert out.shape == (6, exp.ordering.seq_len, 12) and torch.isfinite(out).all(), (head_steps, cache, cfg)


def test_the_causal_backbone_stacks_with_what_it_can_follow():
    exp = tiny(ordering="raster", backbone={"class_path": "CausalBackbone"}, scale=0.3)
    for head_steps, cache, cfg in itertools.product([None, "linear:100%:50%"], ["off", "exact"], [1.0, 3.0]):
        assert torch.isfinite(sample(exp, cfg=cfg, num_iter=16, head_steps=head_steps,
                                     sampler=sampler_for(cache))).all()


@pytest.mark.slow  # about a minute of inductor compiles on 2 cores; the compiled head itself: test_fast_paths.py
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_the_compiled_head_stacks_with_every_option():
    exp = tiny(scale=0.3)
    eager = {}
    for head_steps, cache in itertools.product([None, "linear:100%:50%"], ["off", "exact", "approx:2"]):
        eager[head_steps, cache] = sample(exp, head_steps=head_steps, sampler=sampler_for(cache))
    exp.model.head.compile_sampling()
    for (head_steps, cache), ref in eager.items():
        out = sample(exp, head_steps=head_steps, sampler=sampler_for(cache))
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-4, (head_steps, cache)
