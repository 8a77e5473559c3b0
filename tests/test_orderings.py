"""Orderings: the contract on several settings of each, raster and multi-scale specifics, and a tiny
train-and-sample run per ordering through the shared cores (in-process)."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

from sandbox.config.build import build
from sandbox.config.recipe import recipe_parser
from sandbox.core.contracts import SampleStep, TrainingSplit
from sandbox.core.sampling import generate
from sandbox.core.schedules import cosine_schedule
from sandbox.errors import UserError
from sandbox.plugins.orderings.multiscale import MultiscaleOrdering, default_scales, downsample, upsample
from sandbox.plugins.orderings.random import RandomOrdering
from sandbox.plugins.orderings.raster import RasterOrdering
from sandbox.run.loading import load_run
from sandbox.run.trainer import train
from sandbox.testing import ContractError, check_ordering

VAR_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]  # VAR's ImageNet-256 list (VAR sec. 4)


# --------------------------------------------------------------------------------------
# The contract on settings beyond each plugin's contract_args
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, grid, init_args", [
    (RandomOrdering, (4, 4), {}),
    (RasterOrdering, (4, 4), {"mask_ratio": "uniform"}),  # the defaults (empty init_args mean contract_args)
    (RasterOrdering, (3, 5), {"mask_ratio": "uniform", "mask_ratio_min": 0.5}),
    (MultiscaleOrdering, (4, 4), {"residual": False}),
    (MultiscaleOrdering, (4, 6), {"scales": [[1, 1], [2, 3], [4, 6]], "upsample": "bilinear"}),
    (MultiscaleOrdering, (8, 8), {"scale_steps": [1, 2, 3, 5], "scale_weighting": "uniform"}),
    (MultiscaleOrdering, (8, 8), {"scales": [2, 4, 8], "scale_steps": [3, 1, 4], "residual": True}),
    (MultiscaleOrdering, (16, 16), {"scales": VAR_SCALES, "residual": True, "scale_weighting": "sqrt_area"}),
])
def test_contract_on_more_settings(factory, grid, init_args):
    check_ordering(factory, grid=grid, num_iters=(1, 4, 300), **init_args)


class _PeekingOrdering(RasterOrdering):
    """(Leading underscore: a broken test double, never a registered plugin.) Shows the encoder the true values of the suffix it takes the loss on: the kit must refuse it."""

    def training_split(self, seq, generator=None):
        split = super().training_split(seq, generator)
        return TrainingSplit(inputs=split.inputs, visible=torch.ones_like(split.visible), weight=split.weight)


def test_the_kit_refuses_a_split_that_shows_the_loss_targets():
    with pytest.raises(ContractError, match="true value of .* position.*carry loss"):
        check_ordering(_PeekingOrdering, mask_ratio="uniform")


def test_every_position_is_predicted_once_with_one_token_per_step_at_num_iter_L():
    for ordering in (RasterOrdering((4, 4)), MultiscaleOrdering((4, 4), scale_steps=[1, 4, 16])):
        plan = ordering.sampling_plan(2, 16, torch.Generator().manual_seed(0))
        counts = torch.stack([s.predict for s in plan]).sum(0)  # (B, L)
        assert (counts == 1).all()
    raster = RasterOrdering((4, 4)).sampling_plan(2, 16)
    assert [int(s.predict[0].nonzero()) for s in raster] == list(range(16))  # classic next-token order
    assert [s.progress for s in raster][-1] > [s.progress for s in raster][0]


# --------------------------------------------------------------------------------------
# Raster
# --------------------------------------------------------------------------------------
def test_raster_trains_on_a_suffix_and_samples_in_order():
    ordering = RasterOrdering((4, 4))
    seq = torch.randn(3, 16, 5)
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(50):
        split = ordering.training_split(seq, g)
        hidden = ~split.visible[0]
        n = int(hidden.sum())
        assert hidden[16 - n :].all() and not hidden[: 16 - n].any()  # a suffix, the same in every row
        assert torch.equal(split.weight, (~split.visible).float())  # the loss is exactly on the hidden suffix
        lengths.add(n)
    assert min(lengths) <= 4 and max(lengths) == 16  # uniform: short and full suffixes both occur
    truncnorm = RasterOrdering((4, 4), mask_ratio="truncnorm")
    assert all(int((~truncnorm.training_split(seq, g).visible[0]).sum()) >= 12 for _ in range(20))  # >= 70%
    starts = [int(s.predict[0].nonzero()[0]) for s in ordering.sampling_plan(1, 5)]
    assert starts == sorted(starts) and starts[0] == 0


# --------------------------------------------------------------------------------------
# Multi-scale pyramid
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid, scales", [
    ((16, 16), None), ((16, 16), VAR_SCALES), ((8, 8), [1, 2, 4, 8]), ((13, 13), None),
    ((4, 6), [[1, 2], [2, 3], [4, 6]]),
])
@pytest.mark.parametrize("residual", [False, True])
def test_pyramid_shapes_and_round_trip(grid, scales, residual):
    ordering = MultiscaleOrdering(grid, scales=scales, residual=residual)
    expect = [(s, s) if isinstance(s, int) else tuple(s) for s in scales] if scales else default_scales(grid)
    assert ordering.scales == expect and ordering.num_groups == len(expect)
    x = torch.randn(2, 3, *grid, generator=torch.Generator().manual_seed(0))
    parts = ordering.pyramid(x)
    assert [tuple(p.shape) for p in parts] == [(2, 3, h, w) for h, w in expect]
    seq = ordering.to_sequence(x)
    assert seq.shape == (2, sum(h * w for h, w in expect), 3) == (2, ordering.seq_len, 3)
    assert torch.equal(ordering.groups(), torch.repeat_interleave(torch.arange(len(expect)),
                                                                  torch.tensor([h * w for h, w in expect])))
    back = ordering.to_grid(seq)
    if residual:  # the sum of the upsampled residuals is the grid, up to float rounding
        torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    else:  # the finest scale is the grid itself
        assert torch.equal(back, x)
        for p, (h, w) in zip(parts, expect):
            if grid[0] % h == 0 and grid[1] % w == 0:  # area downsampling by whole blocks keeps the mean
                torch.testing.assert_close(p.mean((2, 3)), x.mean((2, 3)), rtol=0, atol=1e-5)


def test_default_scales_and_the_residual_of_a_smooth_grid():
    assert [s for s, _ in default_scales((16, 16))] == [1, 2, 4, 8, 16]
    assert [s for s, _ in default_scales((13, 13))] == [1, 2, 4, 8, 13]
    flat = torch.full((1, 2, 8, 8), 0.7)
    parts = MultiscaleOrdering((8, 8), residual=True).pyramid(flat)
    torch.testing.assert_close(parts[0], torch.full((1, 2, 1, 1), 0.7))  # the coarsest scale holds it all
    assert all(p.abs().max() < 1e-6 for p in parts[1:])  # nothing left for the finer ones
    x = torch.randn(1, 2, 2, 2)
    torch.testing.assert_close(downsample(upsample(x, (8, 8), "nearest"), (2, 2)), x)  # area inverts nearest


def test_multiscale_training_split_shows_coarser_scales_and_a_guess():
    ordering = MultiscaleOrdering((8, 8), scale_weighting="uniform")
    seq = ordering.to_sequence(torch.randn(2, 3, 8, 8))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        split = ordering.training_split(seq, g)
        scale = ordering.groups()[split.weight[0] > 0].unique()
        assert len(scale) == 1  # one scale carries the loss
        k = int(scale)
        seen.add(k)
        groups = ordering.groups()
        assert split.visible[:, groups < k].all() and not split.visible[:, groups > k].any()
        assert (split.weight[:, groups == k] == 1).all() and (split.weight[:, groups != k] == 0).all()
        assert torch.equal(split.inputs[:, groups < k], seq[:, groups < k])  # coarser scales: the truth
        if k > 0:  # scale k starts from the upsampled previous scale (FlowAR: area(bicubic(x_{k-1})))
            assert split.visible[:, groups == k].all()
            prev = ordering.split_scales(seq)[k - 1]
            guess = downsample(upsample(prev, (8, 8), "bicubic"), ordering.scales[k]).flatten(2).transpose(1, 2)
            torch.testing.assert_close(split.inputs[:, groups == k], guess)
        else:
            assert not split.visible[:, groups == 0].any()
    assert seen == {0, 1, 2, 3}
    area = MultiscaleOrdering((8, 8), scale_weighting="area")  # scales drawn in proportion to their token counts
    torch.testing.assert_close(area.scale_probs, torch.tensor([1, 4, 16, 64], dtype=torch.float64) / 85)
    sqrt = MultiscaleOrdering((8, 8))  # the default: in proportion to the side (square scales)
    torch.testing.assert_close(sqrt.scale_probs, torch.tensor([1, 2, 4, 8], dtype=torch.float64) / 15)


def test_multiscale_sampling_steps_match_training_states():
    ordering = MultiscaleOrdering((4, 4), scale_steps=[1, 1, 3])
    plan = ordering.sampling_plan(2, 64, torch.Generator().manual_seed(0))
    groups = ordering.groups()
    assert [int(groups[s.predict[0]].unique()) for s in plan] == [0, 1, 2, 2, 2]  # coarse to fine
    assert [round(s.progress, 2) for s in plan] == [0.2, 0.4, 0.6, 0.8, 1.0]  # CFG ramps over the steps
    tokens = ordering.to_sequence(torch.randn(2, 3, 4, 4))
    known = groups.expand(2, -1) < 2
    inputs, visible = ordering.step_inputs(tokens * known[..., None], known, plan[2])
    assert visible[:, groups <= 2].all()  # the scale being sampled shows the guess
    torch.testing.assert_close(inputs[:, groups == 2], ordering.guess(ordering.split_scales(tokens), 2))
    # training visits the same states: a split scale shows some of its positions with their true values
    states = {int(ordering.training_split(tokens, torch.Generator().manual_seed(i)).weight[0].sum())
              for i in range(60)}
    assert states == {1, 4, 16 - sum(ordering.chunks[2][:1]), 16 - sum(ordering.chunks[2][:2]), 16}


def test_scales_are_checked_against_the_token_grid():
    with pytest.raises(UserError, match="do not end at the token grid 16x16"):
        MultiscaleOrdering((16, 16), scales=[1, 2, 4, 8])
    with pytest.raises(UserError, match="grow from coarse to fine"):
        MultiscaleOrdering((16, 16), scales=[1, 4, 2, 16])
    with pytest.raises(UserError, match="scale_steps"):
        MultiscaleOrdering((4, 4), scale_steps=[1, 5, 1])


# --------------------------------------------------------------------------------------
# Known positions (editing: inpainting, outpainting, variations, super-resolution)
# --------------------------------------------------------------------------------------
class _IgnoresKnown(RandomOrdering):
    """(Leading underscore: a broken test double.) Plans every position whatever is known."""

    def sampling_plan(self, batch, num_iter, generator=None, device="cpu", known=None):
        return super().sampling_plan(batch, num_iter, generator, device)


class _AcceptsUnevenRows(RasterOrdering):
    """(Leading underscore: a broken test double.) Plans rows with different unknown counts instead of refusing."""

    def sampling_plan(self, batch, num_iter, generator=None, device="cpu", known=None):
        if known is not None and len(set((~known).sum(1).tolist())) > 1:
            return [SampleStep(predict=~known, progress=1.0)]
        return super().sampling_plan(batch, num_iter, generator, device, known=known)


def test_the_kit_refuses_plans_that_ignore_known_or_accept_uneven_rows():
    with pytest.raises(ContractError, match="predicts .* known .* exactly the unknown positions"):
        check_ordering(_IgnoresKnown)
    with pytest.raises(ContractError, match="raise ValueError naming the counts"):
        check_ordering(_AcceptsUnevenRows, mask_ratio="uniform")


@pytest.mark.parametrize("ordering", [RandomOrdering((4, 4)), RasterOrdering((4, 4))], ids=["random", "raster"])
def test_rows_with_different_unknown_counts_are_a_value_error_naming_them(ordering):
    known = torch.zeros(3, 16, dtype=torch.bool)
    known[1, :2] = True
    with pytest.raises(ValueError, match=r"\[16, 14, 16\] unknown positions"):
        ordering.sampling_plan(3, 4, known=known)


def test_random_progress_is_the_fraction_of_the_sequence_fixed_known_included():
    o, L = RandomOrdering((4, 4)), 16
    known = torch.zeros(2, L, dtype=torch.bool)
    known[0, :6], known[1, 10:] = True, True  # 6 known, 10 to predict in each row
    plan = o.sampling_plan(2, 4, torch.Generator().manual_seed(0), known=known)
    fixed = 6
    for step in plan[:-1]:
        fixed += int(step.predict[0].sum())
        assert step.progress == fixed / L  # the state a plain plan's step with as many tokens fixed is in
    assert plan[-1].progress == (L - 1) / L  # MAR's clamp of the masked count (schedules.py), as without known
    assert [int(s.predict[0].sum()) for s in plan] == [r for r, _ in cosine_schedule(10, 4)]  # cosine over 10


def test_raster_predicts_unknown_positions_in_raster_order_for_any_known_set():
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[0, [0, 5, 6, 15]] = True  # not a prefix
    known[1, [1, 2, 3, 4]] = True
    plan = RasterOrdering((4, 4)).sampling_plan(2, 12, known=known)  # one token per step
    for row in range(2):
        order = [int(s.predict[row].nonzero()) for s in plan]
        assert order == sorted(order) == (~known[row]).nonzero().flatten().tolist()


def test_multiscale_super_resolution_skips_known_coarse_scales():
    o = MultiscaleOrdering((8, 8), scale_steps=[1, 1, 2, 3])  # scales 1, 2, 4, 8
    groups = o.groups()
    known = (groups < 2).expand(2, -1).clone()  # a 2x2 low-resolution image fixes scales 1 and 2
    plain = o.sampling_plan(2, 1, torch.Generator().manual_seed(0))
    plan = o.sampling_plan(2, 1, torch.Generator().manual_seed(0), known=known)
    assert [int(groups[s.predict[0]].unique()) for s in plan] == [2, 2, 3, 3, 3]
    assert [s.progress for s in plan] == [s.progress for s in plain[2:]]  # guided as the plain plan's steps
    assert all(torch.equal(a.predict, b.predict) for a, b in zip(plan, plain[2:]))  # the same random orders
    partial = known.clone()
    partial[:, o.offsets[3] : o.offsets[3] + 40] = True  # the finest scale: 24 of its 64 positions unknown
    steps = o.sampling_plan(2, 1, torch.Generator().manual_seed(0), known=partial)
    fine = [int(s.predict[0].sum()) for s in steps if int(groups[s.predict[0]].max()) == 3]
    assert fine == [r for r, _ in cosine_schedule(24, 3)] and steps[-1].progress == 1.0


def test_multiscale_rows_need_equal_unknown_counts_within_each_scale():
    o = MultiscaleOrdering((4, 4))  # scales 1, 2, 4
    known = torch.zeros(2, o.seq_len, dtype=torch.bool)
    known[0, 1], known[1, 5] = True, True  # one known position per row, but in different scales
    with pytest.raises(ValueError, match=r"scale 2x2: \[3, 4\]; scale 4x4: \[16, 15\]"):
        o.sampling_plan(2, 1, known=known)


def _covered_cells(size: int, out: int, i: int) -> range:
    """Cells of a length-``size`` axis that area downsampling to ``out`` averages into cell i (adaptive pooling)."""
    return range(i * size // out, -(-(i + 1) * size // out))


@pytest.mark.parametrize("grid, scales", [((4, 4), [1, 2, 4]), ((13, 13), None), ((4, 6), [[1, 2], [3, 4], [4, 6]])])
@pytest.mark.parametrize("residual", [False, True])
def test_multiscale_known_from_grid_needs_every_covered_cell(grid, scales, residual):
    o = MultiscaleOrdering(grid, scales=scales, residual=residual)
    grid_known = torch.rand(2, *grid, generator=torch.Generator().manual_seed(0)) < 0.8  # (B, h, w)
    known = o.known_from_grid(grid_known)
    expect = torch.tensor([[bool(grid_known[b][_covered_cells(grid[0], h, i)][:, _covered_cells(grid[1], w, j)].all())
                            for h, w in o.scales for i in range(h) for j in range(w)] for b in range(2)])  # (B, L)
    assert torch.equal(known, expect)
    assert torch.equal(known[:, o.offsets[-1] :], grid_known.flatten(1))  # the finest scale is the mask itself


@pytest.mark.parametrize("ordering", [RandomOrdering((4, 4)), MultiscaleOrdering((4, 4)),
                                      MultiscaleOrdering((6, 6), scales=[1, 4, 6])], ids=["flat", "plain", "overlap"])
def test_known_positions_do_not_depend_on_unknown_cells(ordering):
    """Flat orderings and plain scales: changing the grid at unknown cells leaves every known position as it was."""
    h, w = ordering.grid
    g = torch.Generator().manual_seed(0)
    grid_known = torch.ones(2, h, w, dtype=torch.bool)
    grid_known[:, h // 2 :, : w // 2] = False
    x = torch.randn(2, 3, h, w, generator=g)
    y = torch.where(grid_known[:, None], x, torch.randn(2, 3, h, w, generator=g))
    known = ordering.known_from_grid(grid_known)
    assert known.any() and not known.all()
    assert torch.equal(ordering.to_sequence(x)[known], ordering.to_sequence(y)[known])


# --------------------------------------------------------------------------------------
# End to end: tiny train -> sample per ordering, through the shared cores
# --------------------------------------------------------------------------------------
def tiny_recipe(tmp_path, ordering: dict):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["ordering"] = ordering
    recipe["train"].update(steps=4, ckpt_every=4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return recipe_parser().parse_args(["--config", str(path)])


ORDERINGS = [
    {"class_path": "RandomOrdering"},
    {"class_path": "RasterOrdering"},
    {"class_path": "MultiscaleOrdering", "init_args": {"scale_steps": [1, 2, 2]}},
    {"class_path": "MultiscaleOrdering", "init_args": {"scales": [1, 2, 4], "residual": True}},
]
ORDERING_IDS = ["random", "raster", "multiscale", "multiscale-residual"]


@pytest.mark.parametrize("ordering", ORDERINGS, ids=ORDERING_IDS)
def test_training_masks_agree_with_the_split(tmp_path, ordering):
    """Through the training core: the encoder gets exactly the split's visible positions and inputs, the head
    exactly the targets of the positions with loss weight, and no loss position shows its own target."""
    from sandbox.core.training import training_loss

    exp = build(tiny_recipe(tmp_path, ordering))
    seen = {}
    split_of, forward_encoder, head_loss = exp.ordering.training_split, exp.model.backbone.forward_encoder, \
        exp.model.head.loss

    def spy_split(seq, generator=None):
        seen["seq"], seen["split"] = seq, split_of(seq, generator)
        return seen["split"]

    def spy_encoder(tokens, visible, cond):
        seen["tokens"], seen["visible"] = tokens, visible
        return forward_encoder(tokens, visible, cond)

    def spy_head(target, cond, generator=None):
        seen["target"] = target
        return head_loss(target, cond, generator)

    exp.ordering.training_split, exp.model.backbone.forward_encoder, exp.model.head.loss = \
        spy_split, spy_encoder, spy_head
    g = torch.Generator().manual_seed(0)
    groups = exp.ordering.groups()
    images, labels = next(iter(torch.utils.data.DataLoader(exp.dataset, batch_size=4)))
    for _ in range(12):  # several draws: different mask ratios, suffixes, scales
        loss = training_loss(exp, exp.model, images, labels, g)
        seq, split = seen["seq"], seen["split"]
        assert torch.isfinite(loss)
        assert torch.equal(seen["visible"], split.visible) and torch.equal(seen["tokens"], split.inputs)
        rows = split.weight > 0  # (B, L)
        mul = exp.model.config.head_batch_mul
        assert torch.equal(seen["target"], seq[rows].repeat(mul, 1))
        shown = split.visible & (split.inputs == seq).all(-1)  # (B, L) positions whose true value is shown
        assert not (rows & shown).any()
        if exp.ordering.num_groups == 1:  # flat orderings: the loss is exactly on the hidden positions
            assert torch.equal(rows, ~split.visible)
        else:  # multiscale: one scale carries the loss, every coarser scale is shown as it is
            k = int(groups[rows.any(0)].max())
            assert (groups[rows.any(0)] == k).all() and shown[:, groups < k].all()
            assert not split.visible[:, groups > k].any()


@pytest.mark.parametrize("ordering", ORDERINGS, ids=ORDERING_IDS)
def test_train_and_sample_each_ordering(tmp_path, ordering):
    summary = train(tiny_recipe(tmp_path, ordering), tmp_path / "run", progress=False)
    assert summary["step"] == 4
    loaded = load_run(tmp_path / "run")
    exp, model = loaded.exp, loaded.model
    assert type(exp.ordering).__name__ == ordering["class_path"]
    states = []
    images = generate(exp, torch.arange(3), num_iter=3, cfg=2.0, model=model,
                      generator=torch.Generator().manual_seed(0),
                      on_step=lambda s: states.append((s.step.predict.clone(), s.known.clone())))
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    known = torch.zeros(3, exp.ordering.seq_len, dtype=torch.bool)
    for predict, after in states:  # each step samples positions not known yet, and only those become known
        assert predict.any(1).all() and not (predict & known).any()
        known = known | predict
        assert torch.equal(after, known)
    assert known.all()  # every position was predicted exactly once


def test_quickstart_recipes_are_the_quickstart_with_another_ordering(tmp_path):
    from sandbox.config.files import expand_bases

    def parse(name):
        return recipe_parser().parse_args(expand_bases(["--config", str(REPO / "recipes" / f"{name}.yaml")]))

    quickstart = parse("quickstart_v1").as_dict()
    for name, L in (("quickstart_raster", 64), ("quickstart_multiscale", 85)):
        cfg = parse(name)
        composed = cfg.as_dict()
        for key in ("data", "tokenizer", "head", "model", "train", "seed"):  # the same budget
            assert composed[key] == quickstart[key], key
        # sampling: each recipe's own best point (docs/tuning.md); only the sweep's options may differ
        sweep = ("num_iter", "cfg", "temperature")
        assert {k: v for k, v in composed["sample"].items() if k not in sweep} == \
            {k: v for k, v in quickstart["sample"].items() if k not in sweep}
        exp = build(cfg)
        assert exp.ordering.seq_len == L and exp.model.backbone.num_groups == exp.ordering.num_groups


def test_multiscale_paper_recipe_is_mar_base_with_another_ordering():
    """Parsed, not built (that needs ImageNet and kl16.ckpt): MAR-B's recipe but for the ordering and sampling."""
    parsed = {}
    for name in ("mar_base_in256", "mar_base_multiscale_in256"):
        parsed[name] = recipe_parser().parse_args(["--config", str(REPO / "recipes" / f"{name}.yaml")]).as_dict()
    base, multi = parsed["mar_base_in256"], parsed["mar_base_multiscale_in256"]
    for key in ("data", "tokenizer", "head", "model", "train"):
        assert multi[key] == base[key], key
    init = multi["ordering"]["init_args"]
    ordering = MultiscaleOrdering((16, 16), **init)  # KL-16 at 256 px: a 16x16 token grid
    assert ordering.scales[-1] == (16, 16) and ordering.seq_len == 341


def test_bad_scales_are_one_error_line(tmp_path, capsys):
    from sandbox.cli import main

    path = tmp_path / "r.yaml"
    recipe = copy.deepcopy(TINY_RECIPE)  # 8 px digits, 2x2 patches: a 4x4 token grid
    recipe["ordering"] = {"class_path": "MultiscaleOrdering", "init_args": {"scales": [1, 2, 4, 8]}}
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", "--config", str(path), "--run_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "token grid 4x4" in err[0]
    assert not (tmp_path / "r").exists()


def test_multiscale_preview_goes_scale_by_scale():
    """Animations (sandbox sample --animate) show the finest known scale, upsampled: one picture per scale."""
    from sandbox.plugins.orderings.multiscale import MultiscaleOrdering

    o = MultiscaleOrdering((8, 8))  # scales 1, 2, 4, 8
    seq = o.to_sequence(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    known = torch.zeros(2, o.seq_len, dtype=torch.bool)
    assert not o.preview(seq, known)[1].any()
    grids = []
    for step in o.sampling_plan(2, 1):
        known |= step.predict
        grid, shown = o.preview(seq, known)
        assert shown.all() and grid.shape == (2, 3, 8, 8)
        grids.append(grid)
    assert len(grids) == 4 and all(not torch.allclose(a, b) for a, b in zip(grids, grids[1:]))
    assert torch.allclose(grids[0], grids[0][..., :1, :1].expand_as(grids[0]))  # the 1x1 scale: flat
    assert torch.allclose(grids[-1], o.to_grid(seq))
