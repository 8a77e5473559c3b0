"""Each likelihood estimator against the analytic NLL of a Gaussian target; the plan's teacher-forced NLL.

Target: x ~ N(MU, diag SIGMA^2) in C = 4 dims, stds from 0.05 to 1, whose NLL is known row by row.
(a) With the head's network replaced by the exact predictor for that Gaussian (the oracles below), the
diffusion bound and the flow ODE likelihood reproduce the analytic NLL up to their own Monte-Carlo or
discretisation error: for a Gaussian every reverse conditional q(x_{t-1} | x_t) is Gaussian with a mean linear
in x_t, so the exact eps and variance make p = q and the bound tight (its only gap is the prior term, ~1e-9
nats with the cosine schedule's alpha_bar_T = 2.4e-9); the flow's exact velocity carries N(0, I) onto the target.
(b) Each head trained briefly gets near the analytic bits/dim. Then: Hutchinson's divergence against the exact
one, the k-timestep estimate's unbiasedness, the contract of every head with ``has_nll``, and ``plan_nll`` on
the tiny recipe. Tolerances are measured values with a margin; each comment says what was measured.
"""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import REPO
from torch import nn

from sandbox.config import registry
from sandbox.core.contracts import Head
from sandbox.plugins.heads.diffusion import DiffusionHead, stratum_edges
from sandbox.plugins.heads.flow import TIME_SCALE, FlowHead

GMMHead = registry.load_file(REPO / "docs" / "examples" / "gmm_head.py").GMMHead

C = 4
MU = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 0.2, 1.0, 0.05], dtype=torch.float64)
LN2 = math.log(2.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def draw(n: int, seed: int, sigma: torch.Tensor = SIGMA) -> torch.Tensor:
    return (MU + sigma * torch.randn(n, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).float()


def analytic_nll(x: torch.Tensor, mu: torch.Tensor = MU, cov: torch.Tensor | None = None) -> torch.Tensor:
    """-log N(x; mu, cov) per row (N,), cov = diag(SIGMA^2) unless given."""
    cov = torch.diag(SIGMA**2) if cov is None else cov
    return -torch.distributions.MultivariateNormal(mu, cov).log_prob(x.double())


# --------------------------------------------------------------------------------------
# Oracles: the exact predictors for a Gaussian, in place of a head's AdaLN MLP
# --------------------------------------------------------------------------------------
class DiffusionOracle(nn.Module):
    """eps and variance output of the ideal diffusion head for x_0 ~ N(mu, diag s^2), each row's (mu, log s)
    given as its condition (N, 2C). With x_t = a x_0 + b e: E[e | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2) and
    Var(x_0 | x_t) = s^2 b^2 / (a^2 s^2 + b^2); the true reverse variance posterior_var + coef1^2 Var(x_0 | x_t)
    is written as the learned-range output v (log-linear between the clipped posterior variance and beta_t)."""

    def __init__(self, diffusion):
        super().__init__()
        self.d = diffusion

    def embed_cond(self, cond):
        return cond.double()

    def forward_embedded(self, xt, t, c):
        d = self.d
        mu, var0 = c[:, :C], torch.exp(2 * c[:, C:])  # (N, C) each
        a2 = d.alphas_cumprod[t][:, None]
        b2 = 1 - a2
        eps = b2.sqrt() / (a2 * var0 + b2) * (xt.double() - a2.sqrt() * mu)
        true_var = d.posterior_variance[t][:, None] + d.posterior_mean_coef1[t][:, None] ** 2 * var0 * b2 / (a2 * var0 + b2)
        lo, hi = d.posterior_log_variance_clipped[t][:, None], d.log_betas[t][:, None]
        v = 2 * (true_var.log() - lo) / (hi - lo) - 1
        return torch.cat([eps, v], dim=1).float()  # the float32 a network gives


class FlowOracle(nn.Module):
    """The exact velocity (v) or E[x | x_t] (x) of the linear path x_t = (1-t) x + t e for x ~ N(mu, cov):
    x_t ~ N((1-t) mu, S_t), S_t = (1-t)^2 cov + t^2 I, E[x | x_t] = mu + (1-t) cov S_t^-1 (x_t - (1-t) mu),
    v = E[e - x | x_t] = (t I - (1-t) cov) S_t^-1 (x_t - (1-t) mu) - mu."""

    def __init__(self, mu, cov, prediction):
        super().__init__()
        self.mu, self.cov, self.prediction = mu, cov, prediction

    def embed_cond(self, cond):
        return cond

    def forward_embedded(self, x, tt, c):
        t = float(tt.reshape(-1)[0]) / TIME_SCALE
        eye = torch.eye(C, dtype=torch.float64)
        r = (x.double() - (1 - t) * self.mu) @ torch.linalg.inv((1 - t) ** 2 * self.cov + t**2 * eye)  # (N, C)
        if self.prediction == "v":
            return (r @ (t * eye - (1 - t) * self.cov) - self.mu).float()
        return (self.mu + (1 - t) * r @ self.cov).float()


def diffusion_oracle_head(**kw) -> tuple[DiffusionHead, torch.Tensor]:
    head = DiffusionHead(C, 2 * C, width=8, depth=1, **kw)
    head.net = DiffusionOracle(head.train_diffusion)
    return head, torch.cat([MU, SIGMA.log()]).float()  # the condition of every row


def flow_oracle_head(prediction: str, cov: torch.Tensor | None = None, **kw) -> FlowHead:
    head = FlowHead(C, 8, width=8, depth=1, prediction=prediction, **kw)
    head.net = FlowOracle(MU, torch.diag(SIGMA**2) if cov is None else cov, prediction)
    return head


# --------------------------------------------------------------------------------------
# (a) exact predictors: the estimators reproduce the analytic NLL
# --------------------------------------------------------------------------------------
def test_diffusion_bound_of_the_exact_predictor_is_the_nll():
    head, c = diffusion_oracle_head()
    N, R = 128, 16  # R independent estimates per row (each full sum draws x_t anew at every timestep)
    x = draw(N, 0)
    g = torch.Generator().manual_seed(1)
    est = torch.stack([head.nll(x, c.expand(N, -1), g) for _ in range(R)])  # (R, N)
    err = est - analytic_nll(x)  # (R, N)
    # The full sum is a one-sample estimate: per row and draw its std is 1.90 nats here (measured), most of it the
    # decoder term's chi-square (~0.7 nats per dim), so the bound's expectation is checked on the mean over
    # rows and draws (measured bias -0.045, standard error 1.90 / sqrt(2048) = 0.042) ...
    assert abs(err.mean().item()) < 0.15, f"bias {err.mean().item():.3f} nats per row"
    # ... and row by row on the mean of R draws, as t-scores with R - 1 = 15 degrees of freedom (measured max |z|
    # 3.28 over the 128 rows; P(|t_15| > 5.5) = 6e-5 per row)
    z = err.mean(0) / (err.std(0) / math.sqrt(R))
    assert z.abs().max().item() < 5.5, f"max |z| {z.abs().max().item():.2f}"
    assert 1.0 < err.std().item() < 3.0  # the estimator's own spread, as measured (1.90)


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_flow_likelihood_of_the_exact_velocity_is_the_nll(prediction):
    # x-prediction's field is clamped below t_eps ((t / t_eps) times the true velocity there), a different flow:
    # at the default t_eps 0.05 it moves these rows' NLL by +0.046 nats on average (max 1.62, measured);
    # t_eps 1e-4 leaves that below the solver's error
    head = flow_oracle_head(prediction, t_eps=1e-4)
    x = draw(256, 2)
    err = head.nll(x, torch.zeros(256, 8)) - analytic_nll(x)
    # measured max |error| per row at 32 cubic RK4 steps: v 1e-4, x 1.4e-3 nats (16 steps: 2.0e-3, 3.3e-3)
    assert err.abs().max().item() < 0.02, f"max |error| {err.abs().max().item():.4f} nats"


def test_flow_grid_resolves_a_narrow_target():
    # the field changes on the data's own scale near t = 0 (a Gaussian of std s: where t ~ s), which the cubic grid
    # resolves: std 0.01, 32 steps, measured max |error| per row 1.7e-3 nats (an even grid: 2.0 nats)
    sigma = torch.full((C,), 0.01, dtype=torch.float64)
    head = flow_oracle_head("v", torch.diag(sigma**2))
    x = draw(256, 14, sigma)
    err = head.nll(x, torch.zeros(256, 8)) - analytic_nll(x, cov=torch.diag(sigma**2))
    assert err.abs().max().item() < 0.02, f"max |error| {err.abs().max().item():.4f} nats"


# --------------------------------------------------------------------------------------
# (b) heads trained briefly on the Gaussian: near the analytic bits/dim
# --------------------------------------------------------------------------------------
SIGMA_B = torch.tensor([0.5, 0.3, 1.0, 0.2], dtype=torch.float64)  # (b)'s target: a brief training resolves 0.2
COND_B = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
TRAINED = {  # name -> (head factory, measured estimate - analytic in bits/dim on four row sets, tolerance)
    # x0_clip 4 (the target lies within +-4): unclipped, the eps error at t = 999 is multiplied by 1/sqrt(alpha_bar)
    # = 2e4 in x_0, and that one term adds 4.0 nats to this head's bound (measured: +2.0 bits/dim in all)
    "diffusion": (lambda: DiffusionHead(C, 8, width=64, depth=2, x0_clip=4.0), "0.086-0.112", 0.25),
    "flow_v": (lambda: FlowHead(C, 8, width=64, depth=2, prediction="v"), "0.004-0.025", 0.08),
    # x-prediction divides the x error by t near the data, where logit-normal training seldom looks
    "flow_x": (lambda: FlowHead(C, 8, width=64, depth=2, prediction="x"), "0.056-0.124", 0.25),
    "gmm": (lambda: GMMHead(C, 8, num_components=2, width=32), "0.0001-0.0015", 0.02),
}


def train_briefly(make) -> Head:
    """400 Adam steps of 256 rows, lr 3e-3 decayed linearly (tests/test_heads.py's recipe), one condition."""
    torch.manual_seed(0)
    head, g, steps = make(), torch.Generator().manual_seed(1), 400
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for i in range(steps):
        x = draw(256, 100 + i, SIGMA_B)
        loss = head.loss(x, COND_B.expand(256, -1), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@pytest.mark.parametrize("name", list(TRAINED))
def test_briefly_trained_head_is_near_the_analytic_bits_per_dim(name):
    make, measured, tol = TRAINED[name]
    head = train_briefly(make)
    # the bulk of the target, |x - mu| <= 3 std in every dim (99% of draws): 400 steps see few rows beyond, and
    # there the x-prediction head's density is still off by up to 70 bits/dim on single rows (measured)
    x = draw(512, 7, SIGMA_B)
    x = x[((x.double() - MU) / SIGMA_B).abs().amax(1) <= 3][:256]
    est = head.nll(x, COND_B.expand(len(x), -1), torch.Generator().manual_seed(3))
    gap = (est.mean() - analytic_nll(x, cov=torch.diag(SIGMA_B**2)).mean()).item() / (C * LN2)  # bits/dim
    assert torch.isfinite(est).all()
    # the same rows on both sides: what is left is the model's error and the estimator's noise (diffusion:
    # standard error 0.045 bits/dim); -0.15 allows that noise and a model lighter than the target in the tails
    assert -0.15 < gap < tol, f"{name}: {gap:+.4f} bits/dim from the analytic value (measured {measured})"


# --------------------------------------------------------------------------------------
# The estimators' randomness
# --------------------------------------------------------------------------------------
def test_hutchinson_agrees_with_the_exact_divergence():
    # a rotated covariance: an oracle with a diagonal Jacobian would make Rademacher probes exact
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    cov = q @ torch.diag(SIGMA**2) @ q.T
    x = (MU + torch.randn(512, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         @ (q @ torch.diag(SIGMA)).T).float()
    cond = torch.zeros(512, 8)
    exact = flow_oracle_head("v", cov).nll(x, cond)
    hutch_head = flow_oracle_head("v", cov, nll_exact_dims=0)  # C > 0: Hutchinson
    hutch = hutch_head.nll(x, cond, torch.Generator().manual_seed(6))
    assert torch.equal(hutch, hutch_head.nll(x, cond, torch.Generator().manual_seed(6)))  # the seed fixes it
    d = hutch - exact  # the same path: only the probes differ
    se = d.std().item() / math.sqrt(len(d))
    assert d.std().item() > 0.1  # it does estimate (measured spread 2.6 nats per row; mean -0.008, se 0.114)
    assert abs(d.mean().item()) < 4 * se, f"mean {d.mean().item():.3f}, standard error {se:.3f}"
    assert (exact - analytic_nll(x, cov=cov)).abs().max().item() < 0.02  # and the exact one is right here too


def test_k_timestep_estimate_is_unbiased():
    head, c = diffusion_oracle_head(nll_timesteps=10)
    N, R = 128, 100
    x = draw(N, 8)
    g = torch.Generator().manual_seed(9)
    est = torch.stack([head.nll(x, c.expand(N, -1), g) for _ in range(R)])  # (R, N)
    # the exact predictor's bound equals the analytic NLL in expectation (test above), so the k-timestep mean
    # must too; measured bias 0.044, per-estimate std 4.76 nats (full sum: 1.90), standard error 0.042
    err = est - analytic_nll(x)
    se = err.std().item() / math.sqrt(err.numel())
    assert abs(err.mean().item()) < 4 * se + 0.02, f"bias {err.mean().item():.3f}, standard error {se:.3f}"
    # k strata cover 1..T-1 once: with k = T - 1 the plan is the full sum's timesteps
    t, w = DiffusionHead(C, 8, width=8, depth=1, nll_timesteps=999).nll_plan(2, torch.device("cpu"))
    assert torch.equal(t[0], torch.arange(1000)) and bool((w == 1).all())
    for k in (1, 10, 50, 998):
        e = stratum_edges(1000, k)
        assert e[0] == 1 and e[-1] == 1000 and all(b > a for a, b in pairwise(e))


def test_stratified_strata_follow_the_terms(monkeypatch):
    # the cubic strata are the point of the option: even strata spread the same 11 calls far wider (measured
    # per-estimate std 5.1 nats cubic vs 22.6 even, with k = 10)
    head, c = diffusion_oracle_head(nll_timesteps=10)
    x = draw(64, 10)
    g = torch.Generator().manual_seed(11)
    cubic = torch.stack([head.nll(x, c.expand(64, -1), g) for _ in range(20)]).std().item()
    even = [round(1 + 999 * j / 10) for j in range(11)]
    monkeypatch.setattr("sandbox.plugins.heads.diffusion.stratum_edges", lambda T, k: even)
    spread = torch.stack([head.nll(x, c.expand(64, -1), g) for _ in range(20)]).std().item()
    assert cubic < 0.5 * spread, f"cubic strata {cubic:.2f} vs even {spread:.2f} nats"


# --------------------------------------------------------------------------------------
# The contract of nll, for every head that declares it
# --------------------------------------------------------------------------------------
def nll_heads() -> list[type]:
    heads = {cls.__name__: cls for cls in [*registry.plugins("head").values(), GMMHead]}  # GMMHead: once loaded
    return [cls for cls in heads.values() if cls.has_nll]


def test_built_in_heads_declare_a_likelihood():
    names = {cls.__name__ for cls in nll_heads()}
    assert {"DiffusionHead", "FlowHead", "GMMHead", "CategoricalHead"} <= names
    assert Head.has_nll is False
    with pytest.raises(NotImplementedError, match="no likelihood"):
        Head(2, 3).nll(torch.zeros(1, 2), torch.zeros(1, 3))


@pytest.mark.parametrize("cls", nll_heads(), ids=lambda c: c.__name__)
def test_nll_contract(cls):
    injected = {"codebook": torch.randn(4, 3, generator=torch.Generator().manual_seed(3))} \
        if "codebook" in cls.requires else {}  # what the core passes a head that requires it
    head = cls(6, 16, **cls.contract_args, **injected).eval()
    target = torch.rand(10, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    out = head.nll(target, cond, torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())  # randomness only through the generator
    assert out.shape == (10,) and out.is_floating_point() and torch.isfinite(out).all()
    assert torch.equal(out, head.nll(target, cond, torch.Generator().manual_seed(2)))
    # row by row: a row's value does not depend on the others (with the same draws: deterministic heads only)
    if cls is GMMHead:
        assert torch.allclose(head.nll(target[:3], cond[:3]), out[:3])


def test_gmm_nll_is_the_mixture_density():
    head = GMMHead(C, 8, num_components=3, width=16)
    x, cond = draw(20, 12), torch.randn(20, 8, generator=torch.Generator().manual_seed(13))
    logits, mean, std = head.mixture(cond)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(mean, std), 1))
    assert torch.allclose(head.nll(x, cond), -mixture.log_prob(x), atol=1e-5)
    assert torch.allclose(head.loss(x, cond), head.nll(x, cond) / C)  # the training loss, per dimension


def test_categorical_nll_is_the_exact_mass_of_the_codes():
    from sandbox.plugins.heads.categorical import CategoricalHead

    codebook = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))  # K = 5 codes of dim 3
    head = CategoricalHead(6, 8, width=16, depth=1, codebook=codebook)  # m = 2 codes per token
    torch.nn.init.normal_(head.net.linear.weight, generator=torch.Generator().manual_seed(5))  # not uniform
    index = torch.randint(5, (7, 2), generator=torch.Generator().manual_seed(6))
    cond = torch.randn(7, 8, generator=torch.Generator().manual_seed(7))
    logp = head.logits(cond).log_softmax(-1).gather(-1, index[..., None])[..., 0]  # (7, 2)
    assert torch.allclose(head.nll(head.tokens(index), cond), -logp.sum(1), atol=1e-6)


# --------------------------------------------------------------------------------------
# plan_nll on the tiny recipe
# --------------------------------------------------------------------------------------
def tiny_sequences(exp, n: int = 4):
    from sandbox.eval.likelihood import image_sequences
    from sandbox.plugins.datasets.digits import DigitsDataset

    data = DigitsDataset(image_size=exp.image_size)
    images, labels = zip(*(data[i] for i in range(n)))
    return image_sequences(exp, torch.stack(images)), torch.tensor(labels)


def test_plan_nll_on_the_tiny_recipe(tiny_run):
    from sandbox.eval.likelihood import plan_nll, step_token_counts, summarize_nll
    from sandbox.run.loading import load_run

    loaded = load_run(tiny_run, device="cpu")

    exp, model = loaded.exp, loaded.model
    seq, labels = tiny_sequences(exp)
    B, L, C_tok = seq.shape
    nll = plan_nll(model, exp.ordering, seq, labels, 3, torch.Generator().manual_seed(0))  # (S, B)
    assert nll.shape == (3, B) and torch.isfinite(nll).all()
    assert torch.equal(nll, plan_nll(model, exp.ordering, seq, labels, 3, torch.Generator().manual_seed(0)))
    assert not torch.equal(nll, plan_nll(model, exp.ordering, seq, labels, 3, torch.Generator().manual_seed(1)))
    counts = step_token_counts(exp.ordering, 3)
    assert sum(counts) == L
    s = summarize_nll(nll, L, C_tok, counts)
    assert math.isclose(sum(s.step_share), s.bits_per_dim, rel_tol=1e-9, abs_tol=1e-12)  # the steps add up
    assert math.isclose(s.bits_per_dim, nll.sum(0).mean().item() / (L * C_tok * LN2), rel_tol=1e-9)
    assert all(math.isclose(share * L, bpd * n) for share, bpd, n in zip(s.step_share, s.step_bits_per_dim, counts))
    assert s.num_images == B and s.stderr > 0
    table = s.table().splitlines()
    assert len(table) == 3 + 2 and table[-1].startswith(f"total: {s.bits_per_dim:.4f}")


def test_plan_nll_is_teacher_forced(tiny_run):
    # a step scores the true tokens given the true known ones: changing the tokens of the last step changes
    # only the last step; changing the first step's tokens changes it and (as context) the later steps
    from sandbox.eval.likelihood import plan_nll
    from sandbox.run.loading import load_run

    loaded = load_run(tiny_run, device="cpu", head_args={"nll_timesteps": 20})

    exp, model = loaded.exp, loaded.model
    seq, labels = tiny_sequences(exp)
    plan = exp.ordering.sampling_plan(len(seq), 3, torch.Generator().manual_seed(0))

    def run(s):
        return plan_nll(model, exp.ordering, s, labels, 3, torch.Generator().manual_seed(0))

    base = run(seq)
    last, first = seq.clone(), seq.clone()
    last[plan[-1].predict] = -last[plan[-1].predict]
    first[plan[0].predict] = -first[plan[0].predict]
    changed_last, changed_first = run(last), run(first)
    assert torch.equal(changed_last[:-1], base[:-1]) and not torch.equal(changed_last[-1], base[-1])
    assert not torch.equal(changed_first[0], base[0]) and not torch.equal(changed_first[1:], base[1:])


def test_plan_nll_needs_a_head_with_a_likelihood(tiny_run):
    from sandbox.errors import UserError
    from sandbox.eval.likelihood import plan_nll
    from sandbox.run.loading import load_run

    loaded = load_run(tiny_run, device="cpu")

    exp, model = loaded.exp, loaded.model
    seq, labels = tiny_sequences(exp, 2)
    model.head.has_nll = False  # an instance attribute: this loaded model only
    with pytest.raises(UserError, match="no likelihood"):
        plan_nll(model, exp.ordering, seq, labels, 3)
