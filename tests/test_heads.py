"""Each head alone on a class-conditional 2-D mixture of Gaussians: it learns the mixture, and every sampler
keeps the head contract's promises (temperature, guidance, any step count).

The target has three classes, each given to the head as a fixed random 8-dim class vector (the role of the
transformer's z): class 0 has two round modes with weights 0.3 / 0.7, class 1 two elongated modes with equal
weights, class 2 a single elongated Gaussian. Everything lies inside [-1, 1] (like pixel tokens), so the
diffusion head runs with x0_clip 1.0. A 2 x 64 head trains for 400 Adam steps (~3 s per head on one core).
"""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

from sandbox.plugins.heads.diffusion import DiffusionHead
from sandbox.plugins.heads.flow import FlowHead, shift_time
from sandbox.testing import check_head

# diffusers 0.42 builds a numpy array from a tensor in DPMSolverMultistepScheduler.set_timesteps (harmless)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

MEANS = torch.tensor([[[-0.5, -0.3], [0.4, 0.5]], [[-0.45, 0.5], [0.5, -0.45]], [[0.1, -0.1], [0.1, -0.1]]])  # (K,M,2)
STDS = torch.tensor([[[0.1, 0.1], [0.1, 0.1]], [[0.12, 0.05], [0.05, 0.12]], [[0.25, 0.08], [0.25, 0.08]]])  # (K,M,2)
WEIGHTS = torch.tensor([[0.3, 0.7], [0.5, 0.5], [1.0, 0.0]])  # (K, M)
CLASS_VEC = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))  # (K, D)

# Tolerances, against the exact mixture statistics (modes are ~1.0 apart; covariance entries reach 0.23):
MEAN_TOL = 0.1  # per-class mean, max abs error per coordinate (measured worst: 0.055)
COV_TOL = 0.05  # per-class covariance, max abs error per entry (measured worst: 0.021)
WEIGHT_TOL = 0.1  # mode weights of the two-mode classes, samples assigned to the nearest mode (worst: 0.062)
N_SAMPLES = 2000  # per class: the sampling error of the mean is ~0.01

HEADS = {  # name -> (class, init_args); the sampler is switched on the trained weights
    "diffusion": (DiffusionHead, {"x0_clip": 1.0}),
    "flow_v": (FlowHead, {"prediction": "v"}),
    "flow_x": (FlowHead, {"prediction": "x"}),
}
SAMPLERS = [  # (head, sampler, steps): the comparison settings
    ("diffusion", "ddpm", 50), ("diffusion", "ddim", 20), ("diffusion", "dpm++", 20),
    ("flow_v", "euler", 20), ("flow_v", "heun", 10), ("flow_x", "euler", 20), ("flow_x", "heun", 10),
]
SAMPLER_IDS = [f"{h}-{s}{n}" for h, s, n in SAMPLERS]



def draw(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mode = torch.multinomial(WEIGHTS[labels], 1, generator=g)[:, 0]
    return MEANS[labels, mode] + STDS[labels, mode] * torch.randn(len(labels), 2, generator=g)  # (N, 2)


def mixture_stats(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, mu, sd = WEIGHTS[k], MEANS[k], STDS[k]
    mean = (w[:, None] * mu).sum(0)
    cov = sum(w[i] * (torch.diag(sd[i] ** 2) + torch.outer(mu[i] - mean, mu[i] - mean)) for i in range(2))
    return mean, cov


def make(name: str, **sampling):
    cls, args = HEADS[name]
    return cls(2, 8, width=64, depth=2, **args, **sampling)


_trained: dict[str, dict] = {}


def trained_state(name: str) -> dict:
    """Train a head on the mixture once per session: 400 Adam steps of 256 rows, lr 3e-3 decayed linearly."""
    if name not in _trained:
        torch.manual_seed(0)
        head = make(name)
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
        _trained[name] = head.state_dict()
    return _trained[name]


def trained_head(name: str, sampler: str, steps: int, **kw):
    head = make(name, sampler=sampler, num_sampling_steps=steps, **kw)
    head.load_state_dict(trained_state(name))  # a sampler is a sampling-time choice: the weights are the same
    return head.eval()


def draw_samples(head, k: int, n: int = N_SAMPLES, seed: int = 2, **kw) -> torch.Tensor:
    return head.sample(CLASS_VEC[k].expand(n, -1), generator=torch.Generator().manual_seed(seed + k), **kw)


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sampler,steps", SAMPLERS, ids=SAMPLER_IDS)
def test_head_learns_the_mixture(name, sampler, steps):
    head = trained_head(name, sampler, steps)
    for k in range(3):
        s = draw_samples(head, k)
        mean, cov = mixture_stats(k)
        assert torch.isfinite(s).all()
        err_mean = (s.mean(0) - mean).abs().max().item()
        err_cov = (torch.cov(s.T) - cov).abs().max().item()
        assert err_mean < MEAN_TOL, f"class {k}: mean off by {err_mean:.3f}"
        assert err_cov < COV_TOL, f"class {k}: covariance off by {err_cov:.3f}"
        if k < 2:
            nearest = torch.cdist(s, MEANS[k]).argmin(1)
            weights = torch.bincount(nearest, minlength=2).float() / len(s)
            err_w = (weights - WEIGHTS[k]).abs().max().item()
            assert err_w < WEIGHT_TOL, f"class {k}: mode weights {weights.tolist()} vs {WEIGHTS[k].tolist()}"


@pytest.mark.parametrize("name,sampler,steps", SAMPLERS, ids=SAMPLER_IDS)
def test_temperature_below_one_shrinks_the_spread(name, sampler, steps):
    head = trained_head(name, sampler, steps)
    k = 2  # the single Gaussian: an ODE sampler's map is affine in the initial noise, so std scales by T
    spread = {T: torch.cov(draw_samples(head, k, temperature=T).T).trace().sqrt().item() for T in (1.0, 0.5)}
    ratio = spread[0.5] / spread[1.0]
    assert ratio < 0.75, f"temperature 0.5 kept {ratio:.2f} of the spread"
    if sampler != "ddpm":  # DDPM scales the noise of every step instead: smaller, not proportional
        assert abs(ratio - 0.5) < 0.12, f"temperature 0.5 scaled the std by {ratio:.2f}"


@pytest.mark.parametrize("name,sampler,steps", SAMPLERS, ids=SAMPLER_IDS)
def test_cfg_scale_one_equals_the_conditional_sample(name, sampler, steps):
    head = trained_head(name, sampler, steps)
    cond = CLASS_VEC[torch.arange(64) % 3]
    uncond = CLASS_VEC[(torch.arange(64) + 1) % 3]  # a different condition, so guidance would show
    plain = head.sample(cond, generator=torch.Generator().manual_seed(5))
    same = head.sample(cond, cfg=1.0, uncond=uncond, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, same)
    # the guided path (both branches evaluated) agrees at a scale just above 1
    near = head.sample(cond, cfg=1.0 + 1e-6, uncond=uncond, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(near, plain, atol=1e-3)
    far = head.sample(cond, cfg=3.0, uncond=uncond, generator=torch.Generator().manual_seed(5))
    assert (far - plain).abs().max() > 1e-2


@pytest.mark.parametrize("name,sampler", sorted({(h, s) for h, s, _ in SAMPLERS}))
def test_every_step_count_gives_finite_samples(name, sampler):
    cond, uncond = CLASS_VEC[torch.arange(12) % 3], torch.zeros(12, 8)
    for steps in (1, 2, 3, 4, 7, 16, 50, 99):
        if sampler == "ddpm" and steps == 1:
            with pytest.raises(ValueError, match="num_sampling_steps"):
                make(name, sampler=sampler, num_sampling_steps=1)
            continue
        head = trained_head(name, sampler, steps)
        for kw in ({}, {"cfg": 3.0, "uncond": uncond, "temperature": 0.7}):
            out = head.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
            assert out.shape == (12, 2) and out.dtype == torch.float32, (steps, kw)
            assert torch.isfinite(out).all(), (steps, kw)


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_diffusion_sampler_variants_keep_the_contract(sampler):
    check_head(DiffusionHead, width=32, depth=1, num_sampling_steps=3, sampler=sampler)
    check_head(DiffusionHead, width=32, depth=1, num_sampling_steps=3, sampler=sampler, x0_clip=1.0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("prediction", ["v", "x"])
def test_flow_variants_keep_the_contract(sampler, prediction):
    check_head(FlowHead, width=32, depth=1, num_sampling_steps=3, sampler=sampler, prediction=prediction,
               time_sampling="uniform", shift=2.0, guidance_interval=(0.1, 0.8))


def test_training_schedule_is_diffusers_squaredcos_cap_v2():
    # the ODE samplers get our betas; they are diffusers' improved-DDPM cosine, to float32
    from diffusers import DDIMScheduler

    ours = DiffusionHead(2, 8, width=8, depth=1, sampler="ddim").scheduler
    reference = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(ours.betas, reference.betas)
    assert torch.equal(ours.alphas_cumprod, reference.alphas_cumprod)


def test_flow_time_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()  # toward noise, ends fixed
    assert abs(shift_time(torch.tensor(0.5), 3.0).item() - 0.75) < 1e-6  # SD3 eq. 23: 3 * 0.5 / (1 + 2 * 0.5)
    head = FlowHead(2, 8, width=8, depth=1, num_sampling_steps=4, shift=3.0)
    grid = head.time_grid()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))


def test_x_prediction_velocity_is_exact_for_the_true_token():
    # x_hat = x gives v_hat = e - x, the true velocity, wherever t >= t_eps (JiT's clamp is only below it)
    head = FlowHead(3, 4, width=8, depth=1, prediction="x")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([[0.05], [0.2], [0.5], [0.9], [1.0]])
    xt = (1 - t) * x + t * e
    assert torch.allclose(head.to_velocity(x, xt, t), e - x, atol=1e-5)


# --------------------------------------------------------------------------------------
# The sampler is a sampling-time choice: `sandbox sample/eval --head_args` switches it on a trained run.
# --------------------------------------------------------------------------------------
def tiny_run(tmp_path, head: dict):
    from sandbox.config.recipe import recipe_parser
    from sandbox.run.trainer import train

    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["head"] = head
    recipe["train"]["steps"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    train(recipe_parser().parse_args(["--config", str(path)]), run, progress=False)
    return run


@pytest.mark.parametrize("head,switch", [
    ({"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 4}},
     "{sampler: dpm++, num_sampling_steps: 3}"),
    ({"class_path": "FlowHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 2, "sampler": "euler"}},
     "{sampler: heun, num_sampling_steps: 3}"),
])
def test_head_args_switch_the_sampler_of_a_trained_run(tmp_path, capsys, head, switch):
    import numpy as np

    from sandbox.cli import main
    from sandbox.run.loading import load_run

    run = tiny_run(tmp_path, head)
    exp = load_run(run, head_args=yaml.safe_load(switch)).exp
    assert exp.model.head.sampler == yaml.safe_load(switch)["sampler"]
    out = tmp_path / "s.npz"
    assert main(["sample", "--run_dir", str(run), "--num_images", "4", "--num_iter", "2", "--progress", "false",
                 "--head_args", switch, "--out", str(out)]) == 0
    assert np.isfinite(np.load(out)["images"]).all()
    capsys.readouterr()
    assert main(["sample", "--run_dir", str(run), "--head_args", "{sampler: nope}", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --head_args") and "sampler" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_eval_with_head_args_scores_its_own_samples(tmp_path, capsys):
    # eval caches its sample set by the sampling settings: another sampler must not reuse the default's samples
    import json

    from sandbox.cli import main

    run = tiny_run(tmp_path, {"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1,
                                                                           "num_sampling_steps": 4}})
    results = []
    for extra in ([], ["--head_args", "{sampler: ddim, num_sampling_steps: 3}"]):
        out = tmp_path / f"e{len(results)}.json"
        assert main(["eval", "--run_dir", str(run), "--num_images", "10", "--num_iter", "2", "--json", str(out),
                     *extra]) == 0
        results.append(json.loads(out.read_text()))
    capsys.readouterr()
    assert "head_args" not in results[0] and results[1]["head_args"] == {"sampler": "ddim", "num_sampling_steps": 3}
    assert results[0]["samples"] != results[1]["samples"]


@pytest.mark.parametrize("recipe", ["quickstart_flow.yaml", "pixels_digits32_xpred.yaml"])
def test_recipes_build(recipe):
    from sandbox.config.build import build
    from sandbox.config.files import expand_bases
    from sandbox.config.recipe import recipe_parser

    def parse(name):
        return recipe_parser().parse_args(expand_bases(["--config", str(REPO / "recipes" / name)]))

    cfg = parse(recipe)
    exp = build(cfg)
    assert type(exp.model.head).__name__ == "FlowHead"
    if recipe == "quickstart_flow.yaml":  # the quickstart but for the head and its own best sampling point
        quickstart = parse("quickstart_v1.yaml").as_dict()
        for key in ("data", "tokenizer", "ordering", "model", "train", "seed"):
            assert cfg.as_dict()[key] == quickstart[key], key
        ours = {k: v for k, v in cfg.as_dict()["sample"].items() if k not in ("num_iter", "cfg")}
        assert ours == {k: v for k, v in quickstart["sample"].items() if k not in ("num_iter", "cfg")}
        assert (cfg.sample.num_iter, cfg.sample.cfg) == (4, 2.0)  # docs/tuning.md: the flow quickstart's sweep
    if recipe.startswith("pixels"):
        assert exp.image_size == 32 and exp.tokenizer.token_dim == 48 and exp.model.head.prediction == "x"
