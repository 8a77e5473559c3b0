"""The command line end to end, through subprocesses, as a user runs it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, TINY_RECIPE
from PIL import Image


def sandbox(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "sandbox", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"sandbox {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    run = root / "run"
    sandbox("train", "--config", recipe, "--run_dir", run, "--train.steps", 4)
    return recipe, run


def test_train_writes_a_run_directory(trained):
    recipe, run = trained
    assert (run / "recipe.yaml").is_file()
    assert (run / "checkpoints" / "checkpoint-last.pt").is_file()
    assert (run / "metrics.jsonl").read_text().strip()
    grid = Image.open(run / "samples" / "final.png")
    assert grid.size[0] > 0 and grid.mode == "RGB"
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["train"]["steps"] == 4 and stored["head"]["class_path"].endswith("DiffusionHead")


def test_sample_png_and_npz(trained, tmp_path):
    _, run = trained
    sandbox("sample", "--run_dir", run, "--num_images", 10, "--out", tmp_path / "g.png", "--num_iter", 2)
    img = Image.open(tmp_path / "g.png")
    assert img.mode == "RGB"
    sandbox("sample", "--run_dir", run, "--num_images", 12, "--out", tmp_path / "s.npz", "--cfg", 2.0,
            "--num_iter", 2)
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (12, 8, 8, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [i % 10 for i in range(12)]  # class-balanced
    sandbox("sample", "--run_dir", run, "--num_images", 3, "--out", tmp_path / "l.npz", "--labels", "[7]",
            "--num_iter", 2)
    assert np.load(tmp_path / "l.npz")["labels"].tolist() == [7, 7, 7]


def test_print_config_is_a_rerunnable_recipe(trained, tmp_path):
    recipe, _ = trained
    out = sandbox("train", "--config", recipe, "--train.steps", 9, "--print_config").stdout
    dumped = yaml.safe_load(out)
    assert dumped["train"]["steps"] == 9
    assert dumped["head"]["init_args"]["width"] == 32
    (tmp_path / "again.yaml").write_text(out)
    again = sandbox("train", "--config", tmp_path / "again.yaml", "--print_config").stdout
    assert yaml.safe_load(again) == dumped
    assert "run_dir" in yaml.safe_load(sandbox("sample", "--run_dir", "x", "--print_config").stdout)


def test_plugins_lists_every_kind_with_arguments():
    out = sandbox("plugins").stdout
    for name in ("PixelTokenizer", "RandomOrdering", "DiffusionHead", "DigitsDataset"):
        assert name in out
    assert "--head.width" in out and "--ordering.mask_ratio_min" in out


def test_eval_scores_samples(trained, tmp_path):
    _, run = trained
    out = sandbox("eval", "--run_dir", run, "--num_images", 20, "--num_iter", 2, "--json", tmp_path / "e.json").stdout
    import json

    result = json.loads(out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_images"] == 20
    assert json.loads((tmp_path / "e.json").read_text()) == result


# ----------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing overwritten. In-process through the same
# entry point as the console script (`sandbox.cli.main`), which is what returns the exit code.
# ----------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys):
    from sandbox.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def expect_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_user_error_through_the_console_script_exits_2(tmp_path):
    expect_user_error(sandbox("sample", "--run_dir", tmp_path / "nope", check=False), "run directory not found")


def test_unknown_plugin(cli, tiny_recipe, tmp_path):
    proc = cli("train", "--config", tiny_recipe, "--head", "NoSuchHead", "--run_dir", tmp_path / "r")
    expect_user_error(proc, "unknown head 'NoSuchHead'", "DiffusionHead, FlowHead", "sandbox plugins")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("slot, name, expected", [
    ("--head", "FlowHed", "unknown head 'FlowHed' (did you mean FlowHead?)"),  # a typo
    ("--ordering", "raster", "unknown ordering 'raster' (did you mean RasterOrdering?)"),  # the start of a name
    ("--head", "RandomOrdering", "RandomOrdering is an ordering, not a head"),  # a plugin of another kind
    ("--data", "NoData", "unknown dataset 'NoData'; the datasets are"),
])
def test_unknown_plugin_names_the_registered_ones(cli, tiny_recipe, tmp_path, slot, name, expected):
    expect_user_error(cli("train", "--config", tiny_recipe, slot, name, "--run_dir", tmp_path / "r"), expected)


def test_unknown_plugin_argument(cli, tiny_recipe, tmp_path):
    proc = cli("train", "--config", tiny_recipe, "--head.widht", "3", "--run_dir", tmp_path / "r")
    expect_user_error(proc, "widht")


def test_head_dimension_cannot_be_set_against_the_tokenizer(cli, tiny_recipe, tmp_path):
    proc = cli("train", "--config", tiny_recipe, "--head.token_dim", "7", "--run_dir", tmp_path / "r")
    expect_user_error(proc, "token_dim")


def test_image_size_not_divisible_by_patch(cli, tiny_recipe, tmp_path):
    proc = cli("train", "--config", tiny_recipe, "--tokenizer.patch_size", "3", "--run_dir", tmp_path / "r")
    expect_user_error(proc, "not divisible")
    assert not (tmp_path / "r").exists()


def test_unreadable_recipe(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    expect_user_error(cli("train", "--config", bad))
    expect_user_error(cli("train", "--config", tmp_path / "missing.yaml"), "missing.yaml")


def test_missing_run_directory(cli, tmp_path):
    proc = cli("sample", "--run_dir", tmp_path / "nope", "--out", tmp_path / "x.png")
    expect_user_error(proc, "run directory not found")
    assert not (tmp_path / "x.png").exists()


def test_checkpoint_from_a_different_model(cli, trained, tmp_path):
    recipe, run = trained
    other = tmp_path / "other"
    other.mkdir()
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    stored["model"]["encoder_dim"] = 64
    (other / "recipe.yaml").write_text(yaml.safe_dump(stored))
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "checkpoint-last.pt").write_bytes((run / "checkpoints" / "checkpoint-last.pt").read_bytes())
    before = (other / "checkpoints" / "checkpoint-last.pt").read_bytes()
    proc = cli("train", "--config", other / "recipe.yaml", "--run_dir", other, "--train.steps", 6)
    # the keys of other shapes, the first three of them, not PyTorch's many lines
    expect_user_error(proc, "does not fit this model: other shapes: condition.fake_latent (checkpoint [1, 32], model [1, 64])", "(checkpoint [", " more")
    assert (other / "checkpoints" / "checkpoint-last.pt").read_bytes() == before


def test_different_recipe_in_run_dir(cli, trained):
    recipe, run = trained
    before = (run / "checkpoints" / "checkpoint-last.pt").read_bytes()
    proc = cli("train", "--config", recipe, "--run_dir", run, "--model.encoder_dim", "64")
    expect_user_error(proc, "different recipe", "encoder_dim")
    assert (run / "checkpoints" / "checkpoint-last.pt").read_bytes() == before


# every recipe field is checked before anything is written: wrong types, unknown keys (on the command line or
# in a YAML file layered on the recipe), values out of range, settings that cannot work together
BAD_SETTINGS = {
    "wrong type": (["--train.steps", "abc"], "train.steps"),
    "wrong type in a plugin": (["--data.image_size", "big"], "image_size"),
    "not one of the choices": (["--train.precision", "fp8"], "train.precision"),
    "unknown best metric": (["--train.best_metric", "fid"], "train.best_metric"),
    "zero interval": (["--train.ckpt_every", "0"], "ckpt_every must be >= 1"),
    "heads do not divide the width": (["--model.encoder_heads", "3"], "multiple of model.encoder_heads"),
    "batch larger than the data": (["--train.batch_size", "5000"], "fewer than one global batch"),
    "unknown top-level key in a file": ({"trian": {"steps": 3}}, "trian"),
    "unknown nested key in a file": ({"train": {"stpes": 3}}, "stpes"),
    "wrong type in a file": ({"train": {"lr": "fast"}}, "train.lr"),
}


@pytest.mark.parametrize("bad", list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS))
def test_bad_settings_are_one_line_and_write_nothing(cli, tiny_recipe, tmp_path, bad):
    args, fragment = bad
    if isinstance(args, dict):
        (tmp_path / "override.yaml").write_text(yaml.safe_dump(args))
        args = ["--config", tmp_path / "override.yaml"]
    expect_user_error(cli("train", "--config", tiny_recipe, *args, "--run_dir", tmp_path / "r"), fragment)
    assert not (tmp_path / "r").exists()


def test_missing_plugin_file(cli, tiny_recipe, tmp_path):
    proc = cli("--plugin", tmp_path / "my_head.py", "train", "--config", tiny_recipe, "--run_dir", tmp_path / "r")
    expect_user_error(proc, "plugin file not found", "my_head.py")
    assert not (tmp_path / "r").exists()
