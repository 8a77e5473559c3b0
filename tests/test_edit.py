"""Editing with a trained model (sandbox edit, sandbox/tasks/editing.py): known tokens are kept, the rest predicted
once each; an empty mask returns the input, a full one is `sandbox sample`; super-resolution keeps the coarse
scales it is given; a causal backbone takes a known prefix only; the command's outputs and errors."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_RECIPE
from PIL import Image

import sandbox
from sandbox.core.sampling import sample_tokens
from sandbox.errors import UserError
from sandbox.images.io import from_uint8, save_npz
from sandbox.plugins.orderings.multiscale import MultiscaleOrdering
from sandbox.plugins.orderings.random import random_orders
from sandbox.tasks.editing import edit_images, edit_tokens, encode, low_res_start, mask_start
from sandbox.tasks.masks import parse_mask, token_known, token_pixels
from sandbox.testing import ContractError, check_ordering

# the tiny recipe with a coarse-to-fine ordering on pixel tokens of one pixel: 8 px -> scales 1, 2, 4, 8 (85
# positions); patch 1 makes a coarse scale exactly the image's block means (what a low-resolution image is)
MULTISCALE = {**copy.deepcopy(TINY_RECIPE), "ordering": {"class_path": "MultiscaleOrdering"},
              "tokenizer": {"class_path": "PixelTokenizer", "init_args": {"patch_size": 1}}}
OPTS = {"num_iter": 3, "cfg": 2.0, "cfg_schedule": "linear", "temperature": 1.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def multiscale_run(tmp_path_factory):
    """A run of the tiny multiscale recipe, trained in-process for 2 steps (treat as read-only)."""
    from sandbox.config.recipe import recipe_parser
    from sandbox.run.trainer import train

    root = tmp_path_factory.mktemp("ms_run")
    (root / "ms.yaml").write_text(yaml.safe_dump(MULTISCALE))
    train(recipe_parser().parse_args(["--config", str(root / "ms.yaml"), "--train.steps", "2"]), root / "run",
          progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Six real 8 px digits with their labels, as an .npz (uint8 images)."""
    from sandbox.plugins.datasets.digits import load_digits_tensor

    x, y = load_digits_tensor(8)
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    save_npz(x[:6], y[:6], path)
    return path


def loaded(run):
    return sandbox.load_run(run, device="cpu")


def inputs(path) -> tuple[torch.Tensor, np.ndarray]:
    data = np.load(path)
    return from_uint8(data["images"]), data["images"]


# --------------------------------------------------------------------------------------
# Known tokens are kept, unknown ones predicted once
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["random", "multiscale"])
def test_known_tokens_never_change_and_each_unknown_one_is_predicted_once(which, tiny_run, multiscale_run, digits):
    run = loaded(tiny_run if which == "random" else multiscale_run)
    exp, (images, _) = run.exp, inputs(digits)
    start = mask_start(exp, images, parse_mask("box:1,2,7,6", 8).generate)
    times = torch.zeros(start.known.shape, dtype=torch.long)

    def count(state):  # batch_size 6: one chunk, so the step's rows are the images
        times.add_(state.step.predict.long().cpu())

    tokens = edit_tokens(exp, run.model, start, torch.arange(6) % 10, batch_size=6, seed=0, on_step=count, **OPTS)
    assert torch.equal(times, (~start.known).long())  # unknown: exactly once; known: never
    assert torch.equal(tokens[start.known], start.tokens[start.known])  # bit for bit
    assert not torch.equal(tokens, start.tokens)


@pytest.mark.parametrize("which", ["random", "multiscale"])
def test_pixel_tokens_keep_every_pixel_outside_the_mask_bit_identical(which, tiny_run, multiscale_run, digits,
                                                                      sandbox_cli, tmp_path):
    run = tiny_run if which == "random" else multiscale_run
    _, original = inputs(digits)  # (6, 8, 8, 3) uint8
    # a mask on token borders (2 px tokens): every pixel outside it belongs to a known token
    res = sandbox_cli("edit", "--run_dir", run, "--images", digits, "--mask", "box:2,2,6,6", "--out",
                      tmp_path / "a.npz", "--num_iter", 2, "--progress", "false")
    assert res.returncode == 0, res.stderr
    out = np.load(tmp_path / "a.npz")["images"]
    outside = ~parse_mask("box:2,2,6,6", 8).generate.numpy()
    assert np.array_equal(out[:, outside], original[:, outside]) and not np.array_equal(out, original)
    # a mask across tokens: the straddled tokens are regenerated whole; --paste puts the pixels back
    for paste in ("false", "true"):
        sandbox_cli("edit", "--run_dir", run, "--images", digits, "--mask", "box:1,1,6,5", "--paste", paste,
                    "--out", tmp_path / f"p{paste}.npz", "--num_iter", 2, "--progress", "false")
    m, stride = parse_mask("box:1,1,6,5", 8).generate, 2 if which == "random" else 1  # 2x2 or 1x1 px tokens
    kept = token_pixels(token_known(m, stride), stride).numpy()  # pixels of known tokens
    plain, pasted = np.load(tmp_path / "pfalse.npz")["images"], np.load(tmp_path / "ptrue.npz")["images"]
    assert np.array_equal(plain[:, kept], original[:, kept])
    assert np.array_equal(plain[:, ~m], original[:, ~m]) == (stride == 1)  # 2 px tokens straddle the mask
    assert np.array_equal(pasted[:, ~m.numpy()], original[:, ~m.numpy()])
    assert np.array_equal(pasted[:, m.numpy()], plain[:, m.numpy()])  # inside the mask: the same generation


# --------------------------------------------------------------------------------------
# Nothing and everything to generate
# --------------------------------------------------------------------------------------
def test_an_empty_mask_writes_the_input(tiny_run, digits, sandbox_cli, tmp_path):
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", digits, "--mask", "center:0", "--out",
                      tmp_path / "e.npz", "--animate", tmp_path / "e.gif")
    assert res.returncode == 0, res.stderr
    assert "nothing to generate" in res.stderr and "writing the input" in res.stderr
    assert np.array_equal(np.load(tmp_path / "e.npz")["images"], inputs(digits)[1])
    assert not (tmp_path / "e.gif").exists() and "no animation" in res.stderr


def test_a_full_mask_is_sandbox_sample_with_the_same_seed(tiny_run, digits, sandbox_cli, tmp_path):
    common = ["--labels", "[1, 3]", "--seed", 5, "--batch_size", 4, "--num_iter", 3, "--progress", "false"]
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", digits, "--mask", "top:1", "--out",
                      tmp_path / "e.npz", *common)
    assert res.returncode == 0, res.stderr
    assert "covers every pixel: nothing is kept, this is plain sampling" in res.stderr
    assert sandbox_cli("sample", "--run_dir", tiny_run, "--num_images", 6, "--out", tmp_path / "s.npz",
                       *common).returncode == 0
    edited, sampled = np.load(tmp_path / "e.npz"), np.load(tmp_path / "s.npz")
    assert np.array_equal(edited["images"], sampled["images"])
    assert edited["labels"].tolist() == sampled["labels"].tolist() == [1, 3, 1, 3, 1, 3]


# --------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True])
def test_super_resolution_keeps_the_given_coarse_scales(residual):
    recipe = copy.deepcopy(MULTISCALE)
    recipe["ordering"]["init_args"] = {"residual": residual}
    exp = sandbox.build(recipe)  # untrained: what is kept does not depend on the weights
    exp.model.eval()
    ordering, (x, _) = exp.ordering, next(iter(torch.utils.data.DataLoader(exp.dataset, batch_size=4)))
    low = F.interpolate(x, size=(4, 4), mode="area")  # (4, 3, 4, 4): the 4x4 view of 8 px digits
    start = low_res_start(exp, low)
    fixed = ordering.coarse_known()[(4, 4)]  # scales 1, 2, 4
    assert torch.equal(start.known, fixed.expand(4, -1))
    truth = encode(exp, x)  # (4, L, C): the real digits' pyramid
    assert torch.allclose(start.tokens[:, fixed], truth[:, fixed], atol=1e-5)  # the low-res image IS those scales
    tokens = edit_tokens(exp, exp.model, start, torch.arange(4), batch_size=4, seed=0, **OPTS)
    assert torch.equal(tokens[:, fixed], start.tokens[:, fixed]) and not torch.equal(tokens, start.tokens)


def test_super_resolution_through_the_command(multiscale_run, digits, sandbox_cli, tmp_path):
    x, _ = inputs(digits)
    low = ((F.interpolate(x, size=(2, 2), mode="area") + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "low.npz", images=low, labels=np.arange(6) % 10)
    res = sandbox_cli("edit", "--run_dir", multiscale_run, "--low_res", tmp_path / "low.npz", "--out",
                      tmp_path / "sr.npz", "--animate", tmp_path / "sr.gif", "--progress", "false")
    assert res.returncode == 0, res.stderr
    out = np.load(tmp_path / "sr.npz")
    assert out["images"].shape == (6, 8, 8, 3) and out["labels"].tolist() == list(range(6))
    assert Image.open(tmp_path / "sr.gif").n_frames == 3  # the given scales 1, 2, then scales 4 and 8
    Image.fromarray(low[0]).save(tmp_path / "low3.png")
    res = sandbox_cli("edit", "--run_dir", multiscale_run, "--low_res", tmp_path / "low3.png", "--out",
                      tmp_path / "one.png", "--progress", "false")
    assert res.returncode == 0 and "no labels" in res.stderr  # one image, no label: the null condition
    assert Image.open(tmp_path / "one.png").size == (3 * 64 + 4, 64 + 2)  # input | given | result, 8x upscaled


# --------------------------------------------------------------------------------------
# The command's outputs
# --------------------------------------------------------------------------------------
def test_the_png_grid_the_animation_and_the_npz_labels(tiny_run, digits, sandbox_cli, tmp_path):
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", digits, "--mask", "bottom", "--out",
                      tmp_path / "g.png", "--animate", tmp_path / "g.gif", "--num_iter", 3, "--progress", "false")
    assert res.returncode == 0, res.stderr
    assert "wrote 6 edited images" in res.stdout
    assert Image.open(tmp_path / "g.png").size == (3 * 64 + 4, 6 * 65 + 1)  # rows: input | given | result
    gif = Image.open(tmp_path / "g.gif")
    assert gif.n_frames == 4  # the known half, then 3 steps
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", digits, "--mask", "invert:center:0.25",
                      "--labels", "[7]", "--out", tmp_path / "o.npz", "--num_iter", 2, "--progress", "false")
    assert np.load(tmp_path / "o.npz")["labels"].tolist() == [7] * 6  # class-guided: every image under 7
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", digits, "--mask", "random:0.5", "--seed", 3,
                      "--out", tmp_path / "v.npz", "--num_iter", 2, "--progress", "false")
    assert res.returncode == 0 and np.load(tmp_path / "v.npz")["labels"].tolist() == list(range(6))  # the .npz's


def test_another_size_is_resized_and_said_so(tiny_run, digits, sandbox_cli, tmp_path):
    big = np.repeat(np.repeat(inputs(digits)[1][:2], 2, axis=1), 2, axis=2)  # (2, 16, 16, 3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(big):
        Image.fromarray(im).save(folder / f"{i}.png")
    mask = np.zeros((4, 4), np.uint8)
    mask[2:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = sandbox_cli("edit", "--run_dir", tiny_run, "--images", folder, "--mask", tmp_path / "mask.png", "--out",
                      tmp_path / "r.npz", "--num_iter", 2, "--progress", "false")
    assert res.returncode == 0, res.stderr
    assert "2 of 16x16 px resized to the run's 8x8 with bicubic" in res.stderr
    assert "resized to the run's 8x8 with nearest neighbour" in res.stderr
    assert "no labels" in res.stderr and np.load(tmp_path / "r.npz")["labels"].tolist() == [-1, -1]


@pytest.mark.parametrize("args, words", [
    (["--images", "D", "--mask", "bottom", "--out", "x.jpg"], "--out must end in .png"),
    (["--images", "D", "--mask", "bottom", "--animate", "x.mp4"], "--animate must name a .gif"),
    (["--images", "D"], "needs --images and --mask"),
    (["--low_res", "D", "--mask", "bottom"], "without --images and --mask"),
    (["--low_res", "D", "--paste", "true"], "--paste puts the input"),
    (["--images", "D", "--mask", "bottm"], "neither a mask spec nor an existing file"),
    (["--images", "D", "--mask", "bottom", "--labels", "[3, 12]"], "labels [12] outside the model's classes 0..9"),
    (["--images", "D", "--mask", "bottom", "--num_iter", "0"], "--num_iter"),
    (["--images", "nowhere.npz", "--mask", "bottom"], "--images: image set not found"),
    (["--low_res", "D"], "--low_res needs an ordering with coarse scales"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(args, words, tiny_run, digits, sandbox_cli, tmp_path):
    args = [str(digits) if a == "D" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.npz")]
    res = sandbox_cli("edit", "--run_dir", tiny_run, *args, "--progress", "false")
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_labels_of_the_npz_outside_the_classes_and_a_low_res_size_without_a_scale(multiscale_run, sandbox_cli,
                                                                                  tmp_path):
    save_npz(np.zeros((2, 8, 8, 3), np.uint8), np.array([1, 10]), tmp_path / "bad.npz")
    res = sandbox_cli("edit", "--run_dir", multiscale_run, "--images", tmp_path / "bad.npz", "--mask", "bottom",
                      "--out", tmp_path / "o.npz")
    assert res.returncode == 2 and f"the labels of {tmp_path / 'bad.npz'}: labels [10] outside" in res.stderr
    save_npz(np.zeros((2, 3, 3, 3), np.uint8), np.array([1, 2]), tmp_path / "low.npz")
    res = sandbox_cli("edit", "--run_dir", multiscale_run, "--low_res", tmp_path / "low.npz", "--out",
                      tmp_path / "o.npz")
    assert res.returncode == 2 and "3x3 px, which match no coarse scale" in res.stderr
    assert "give 1x1, 2x2, 4x4 px" in res.stderr and not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------------------
# A backbone that continues only a known prefix (a causal one)
# --------------------------------------------------------------------------------------
def _prefix_only(ordering: str):
    recipe = {**copy.deepcopy(TINY_RECIPE), "ordering": {"class_path": ordering}}
    exp = sandbox.build(recipe)
    exp.model.eval()
    exp.model.backbone.known_prefix_only = True  # what a causal backbone declares
    return exp


def test_a_prefix_only_backbone_continues_a_known_prefix_and_refuses_the_rest():
    exp = _prefix_only("RasterOrdering")
    images = torch.rand(2, 3, 8, 8, generator=gen(0)) * 2 - 1
    top_known = mask_start(exp, images, parse_mask("bottom", 8).generate)  # the first two token rows known
    out = edit_images(exp, exp.model, top_known, torch.tensor([1, 2]), batch_size=2, seed=0, **OPTS)
    assert out.shape == images.shape
    bottom_known = mask_start(exp, images, parse_mask("top", 8).generate)
    with pytest.raises(UserError, match=re.escape("continues a generation only from known tokens that come first")) as e:
        edit_images(exp, exp.model, bottom_known, torch.tensor([1, 2]), batch_size=2, seed=0, **OPTS)
    assert "\n" not in str(e.value) and "RasterOrdering" in str(e.value) and "step 0 of the order" in str(e.value)


def test_a_prefix_only_backbone_takes_any_known_set_when_the_order_is_drawn_per_image():
    exp = _prefix_only("RandomOrdering")

    def drawn(batch, generator=None, device="cpu"):  # what a random-order causal model trains on
        return random_orders(batch, exp.ordering.seq_len, generator, device)

    known = token_known(parse_mask("top", 8).generate, 2).flatten().expand(2, -1)  # not a raster prefix
    start = (torch.zeros(2, 16, 12), known)
    def fixed(batch, generator=None, device="cpu"):  # the contract's default: the sequence order
        return torch.arange(exp.ordering.seq_len, device=device).expand(batch, -1)

    exp.ordering.generation_order = fixed
    with pytest.raises(UserError, match="fixed generation order"):
        sample_tokens(exp.model, exp.ordering, 12, torch.tensor([0, 1]), generator=gen(0), start=start, **OPTS)
    exp.ordering.generation_order = drawn  # RandomOrdering's own (what a random-order causal model trains on)
    tokens = sample_tokens(exp.model, exp.ordering, 12, torch.tensor([0, 1]), generator=gen(0), start=start, **OPTS)
    assert torch.equal(tokens[known], start[0][known])


# --------------------------------------------------------------------------------------
# The contract kit on coarse_known
# --------------------------------------------------------------------------------------
class _ClaimsTooMuch(MultiscaleOrdering):
    """(Leading underscore: a stand-in, never registered.) Says the 2x2 view fixes the 4x4 scale too."""

    def coarse_known(self):
        return {(2, 2): torch.arange(self.seq_len) < self.offsets[2] + self.areas[2]}


def test_the_contract_kit_refuses_positions_a_coarse_view_does_not_determine():
    check_ordering(MultiscaleOrdering, grid=(8, 8))
    with pytest.raises(ContractError, match=re.escape("coarse_known()[(2, 2)]: two grids with the same means")):
        check_ordering(_ClaimsTooMuch, grid=(8, 8))
    assert set(MultiscaleOrdering((16, 16), scales=[1, 2, 3, 4, 8, 16]).coarse_known()) == {(1, 1), (2, 2)}


# --------------------------------------------------------------------------------------
# The measurement script, at a tiny scale
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_measurement_script_runs_at_a_tiny_scale(tmp_path):
    import json
    import os
    import subprocess

    from conftest import REPO

    env = {**os.environ, "SANDBOX_TASKS_TINY": "1", "SEEDS": "0 1", "SANDBOX_THREADS": "1"}
    res = subprocess.run([str(REPO / ".ci" / "measure_tasks.sh"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == [f"{t}/seed{s}" for t in ("classedit", "inpaint", "superres") for s in (0, 1)]
    page = (tmp_path / "tasks.md").read_text()
    for words in ("**Inpainting**", "**Class-guided editing**", "**Super-resolution** 4x4 -> 16x16", " +- ",
                  "bicubic upsampling", "![inpainting (bottom half)](tasks_inpaint.png)", "TINY"):
        assert words in page
    for stem in ("inpaint", "outpaint", "classedit", "variations", "superres"):
        assert Image.open(tmp_path / f"tasks_{stem}.png").size == (3 * 64 + 4, 10 * 65 + 1)  # 10 digits, 3 columns
    assert Image.open(tmp_path / "tasks_inpaint.gif").n_frames == 5  # the known half, then 4 steps
