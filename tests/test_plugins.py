"""Third-party plugins: discovery (--plugin files, recipes, entry points), clashes, recipe composition,
`sandbox new-plugin`, and the contract kit failing on broken plugins of each kind.

Plugins loaded here live in this test process; every test that loads one runs inside
``registry.isolated()`` so one test's plugins cannot clash with another's.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

from sandbox.cli.new_plugin import SLOT
from sandbox.config import registry
from sandbox.core.contracts import Head

HEAD_FILE = '''
import torch
from sandbox.core.contracts import Head


class {name}(Head):
    """A unit-variance Gaussian around a linear map of z (a test plugin)."""

    contract_args = {{}}

    def __init__(self, token_dim: int, cond_dim: int, scale: float = 1.0):
        super().__init__(token_dim, cond_dim)
        self.proj = torch.nn.Linear(cond_dim, token_dim)
        self.scale = scale

    def loss(self, target, cond, generator=None):
        return ((target - self.proj(cond)) ** 2).mean(-1)  # (N,)

    @torch.no_grad()
    def sample(self, cond, temperature=1.0, cfg=1.0, uncond=None, generator=None):
        mean = self.proj(cond)
        return mean + temperature * self.scale * torch.randn(mean.shape, generator=generator)
'''


@pytest.fixture(autouse=True)
def isolated():
    with registry.isolated():
        yield


@pytest.fixture
def cli(capsys):
    from sandbox.cli import main

    def call(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # --print_config prints and exits
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def user_error(proc, *fragments) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def write_head(path, name):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD_FILE.format(name=name))
    return path


def tiny(tmp_path, **changes):
    recipe = {**TINY_RECIPE, **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------
def test_plugin_file_given_with_flag_trains_is_listed_and_reloads(cli, tmp_path):
    plugin = write_head(tmp_path / "code" / "flag_head.py", "FlagHead")
    run = tmp_path / "run"
    with registry.isolated():  # afterwards the file is unloaded, as in a fresh process
        proc = cli("--plugin", plugin, "train", "--config", tiny(tmp_path), "--head", "FlagHead", "--run_dir", run,
                   "--train.steps", 2)
        assert proc.returncode == 0, proc.stderr
        listing = cli("plugins", "--plugin", plugin).stdout  # --plugin works after the subcommand too
        assert "FlagHead" in listing and f"[file {plugin.resolve()}]" in listing and "[built-in]" in listing
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["plugins"] == [str(plugin.resolve())]  # absolute: the run re-loads it from anywhere
    assert stored["head"]["class_path"] == "sandbox_plugin_flag_head.FlagHead"

    moved = tmp_path / "elsewhere" / "flag_head.py"
    moved.parent.mkdir()
    plugin.rename(moved)
    with registry.isolated():
        user_error(cli("sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz"),
                   str(plugin.resolve()), "if the file moved, give its new path with --plugin")
    proc = cli("sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz", "--plugin", moved)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s.npz").is_file()



@pytest.mark.parametrize("where,name", [("with space/é/플러그인/머리.py", "AccentHead"),
                                        ("emoji 😀/🚀/head_😀.py", "EmojiHead")], ids=["accents and Hangul", "emoji"])
def test_plugin_paths_outside_ascii(cli, tmp_path, where, name):
    """Characters outside the BMP (an emoji) reached the parser as JSON surrogate pairs (\\ud83d\\ude00) that
    YAML cannot read back: every command failed with "plugins: Expected a list"."""
    plugin = write_head(tmp_path / where, name)
    run = tmp_path / "run"
    printed = cli("--plugin", plugin, "train", "--config", tiny(tmp_path), "--head", name, "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["plugins"] == [str(plugin.resolve())]
    proc = cli("--plugin", plugin, "train", "--config", tiny(tmp_path), "--head", name, "--run_dir", run,
               "--train.steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((run / "recipe.yaml").read_text())["plugins"] == [str(plugin.resolve())]
    proc = cli("--plugin", plugin, "sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz")
    assert proc.returncode == 0, proc.stderr

def test_recipe_lists_plugins_relative_to_itself(cli, tmp_path, monkeypatch):
    write_head(tmp_path / "recipes" / "heads" / "rel_head.py", "RelHead")
    recipe = tmp_path / "recipes" / "rel.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "plugins": ["heads/rel_head.py"],
                                      "head": {"class_path": "RelHead", "init_args": {"scale": 0.5}}}))
    monkeypatch.chdir(REPO)  # not the recipe's directory
    proc = cli("train", "--config", recipe, "--print_config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["plugins"] == [str((tmp_path / "recipes" / "heads" / "rel_head.py").resolve())]
    assert printed["head"] == {"class_path": "sandbox_plugin_rel_head.RelHead", "init_args": {"scale": 0.5}}


def test_missing_plugin_file_names_where_it_was_listed(cli, tmp_path):
    recipe = tiny(tmp_path, plugins=["nowhere.py"])
    user_error(cli("train", "--config", recipe, "--print_config"), "plugin file not found",
               str(tmp_path / "nowhere.py"), f"listed under plugins: in {recipe}")
    user_error(cli("plugins", "--plugin", tmp_path / "gone.py"), "gone.py", "given with --plugin")


def test_plugin_from_an_entry_point(cli, tmp_path, monkeypatch):
    """A throwaway installed package, faked by a dist-info directory on sys.path."""
    (tmp_path / "fake_sandbox_heads.py").write_text(HEAD_FILE.format(name="EntryPointHead"))
    dist = tmp_path / "fake_sandbox_heads-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-sandbox-heads\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nheads = fake_sandbox_heads\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)  # look again, as a fresh process would
    listing = cli("plugins")
    assert listing.returncode == 0, listing.stderr
    assert "EntryPointHead" in listing.stdout and "[entry point heads (fake-sandbox-heads 0.3)]" in listing.stdout
    proc = cli("train", "--config", tiny(tmp_path), "--head", "EntryPointHead", "--print_config")
    assert yaml.safe_load(proc.stdout)["head"]["class_path"] == "fake_sandbox_heads.EntryPointHead"


def test_broken_entry_point_names_its_package(cli, tmp_path, monkeypatch):
    dist = tmp_path / "broken_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    user_error(cli("plugins"), "broken-pkg 1.0", "no_such_module_here", "fix or uninstall")


def test_name_clash_names_both_sources(cli, tmp_path):
    a = write_head(tmp_path / "a" / "twin_a.py", "TwinHead")
    b = write_head(tmp_path / "b" / "twin_b.py", "TwinHead")
    user_error(cli("--plugin", a, "--plugin", b, "plugins"), "two head plugins are named TwinHead",
               f"(file {a.resolve()})", f"(file {b.resolve()})", "rename one")


def test_name_clash_with_a_builtin(cli, tmp_path):
    shadow = write_head(tmp_path / "shadow.py", "DiffusionHead")
    user_error(cli("plugins", "--plugin", shadow), "sandbox.plugins.heads.diffusion.DiffusionHead (built-in)",
               f"sandbox_plugin_shadow.DiffusionHead (file {shadow.resolve()})")


def test_two_plugin_files_with_one_file_name(cli, tmp_path):
    a = write_head(tmp_path / "a" / "heads.py", "HeadA")
    b = write_head(tmp_path / "b" / "heads.py", "HeadB")
    user_error(cli("plugins", "--plugin", a, "--plugin", b), "same file name", str(a.resolve()), str(b.resolve()))


# ----------------------------------------------------------------------------------------
# Trust: a run directory is data, never code
# ----------------------------------------------------------------------------------------
PAYLOAD = HEAD_FILE + """
import pathlib
pathlib.Path({marker!r}).write_text("imported")  # a payload's side effect: proof the file was run
"""


def shared_run(cli, tmp_path):
    """A run directory as someone might share it: it bundles payload.py (a head plugin that also writes MARKER
    when imported) and its recipe lists that file."""
    run, marker = tmp_path / "shared", tmp_path / "MARKER"
    run.mkdir()
    payload = run / "payload.py"
    payload.write_text(PAYLOAD.format(name="PayloadHead", marker=str(marker)))
    with registry.isolated():
        proc = cli("--plugin", payload, "train", "--config", tiny(tmp_path), "--head", "PayloadHead", "--run_dir", run,
                   "--train.steps", 2)
    assert proc.returncode == 0, proc.stderr
    marker.unlink()
    return run, payload, marker


def restore_recipe(run, change):
    """Rewrite the recipe stored in a run's checkpoint and recipe.yaml (as whoever shares a run directory can)."""
    from sandbox.run.rundir import RunDir

    rd = RunDir(run)
    ckpt = rd.load_latest()
    change(ckpt["recipe"])
    for old in rd.ckpt_dir.glob("checkpoint-*.pt"):
        old.unlink()
    rd.save(ckpt, int(ckpt["step"]), keep=1)
    rd.write_recipe(ckpt["recipe"])


def test_a_shared_run_directory_never_imports_its_plugin_files(cli, tmp_path, monkeypatch):
    run, payload, marker = shared_run(cli, tmp_path)
    sample = ["sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz"]
    with registry.isolated():
        user_error(cli(*sample), f"run {run} needs plugin file {payload}", f"pass --plugin {payload} if you trust it")
        user_error(cli("train", "--config", run / "recipe.yaml"), str(payload), "--plugin")  # continuing it
        assert cli("report", run, "--out", tmp_path / "r.html").returncode == 0  # a report reads, never imports
    assert not marker.exists() and not (tmp_path / "s.npz").exists()

    restore_recipe(run, lambda r: r.update(plugins=["payload.py"]))  # a relative path, and the current directory
    monkeypatch.chdir(run)  # holds the file: still never imported
    with registry.isolated():
        user_error(cli(*sample), f"run {run} needs plugin file", "payload.py", "--plugin")
    assert not marker.exists()

    with registry.isolated():  # the user names the file: trusted, and it stands in for the listed one
        proc = cli(*sample, "--plugin", payload)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and (tmp_path / "s.npz").is_file()
    with registry.isolated():
        proc = cli("train", "--config", run / "recipe.yaml", "--train.steps", 3, "--plugin", payload)
    assert proc.returncode == 0 and "resuming" in proc.stdout + proc.stderr, proc.stderr


def test_a_stored_class_path_names_only_registered_plugins(cli, tmp_path, tiny_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    sample = ["sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz"]
    for stored in ({"class_path": "this.DiffusionHead"}, "this.DiffusionHead", {"class_path": "os.system"}):
        restore_recipe(run, lambda r, stored=stored: r.update(head=stored))
        for line in (sample, ["train", "--config", run / "recipe.yaml"]):
            proc = cli(*line)
            user_error(proc, "not a registered head plugin")
            assert "Beautiful is better than ugly" not in proc.stdout + proc.stderr  # `this` was never imported
            assert "this" not in sys.modules
    nested = {"class_path": "DiffusionHead", "init_args": {"width": {"class_path": "this.Anything"}}}
    restore_recipe(run, lambda r: r.update(head=nested))
    user_error(cli(*sample), "this.Anything", "not a registered")


# ----------------------------------------------------------------------------------------
# Recipe composition
# ----------------------------------------------------------------------------------------
def test_several_configs_compose_later_ones_override(cli, tmp_path):
    base = tiny(tmp_path)
    (tmp_path / "wider.yaml").write_text("model:\n  encoder_dim: 48\nhead:\n  init_args:\n    depth: 2\n")
    proc = cli("train", "--config", base, "--config", tmp_path / "wider.yaml", "--train.steps", 5, "--print_config")
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["encoder_dim"] == 48 and cfg["model"]["decoder_dim"] == 32  # merged field by field
    assert cfg["head"]["init_args"]["depth"] == 2 and cfg["head"]["init_args"]["width"] == 32
    assert cfg["train"]["steps"] == 5  # the command line overrides every file


def test_a_recipe_builds_on_its_base(cli, tmp_path, monkeypatch):
    base = tiny(tmp_path)
    (tmp_path / "exp").mkdir()
    deeper = tmp_path / "exp" / "deeper.yaml"  # base: relative to the recipe that names it, not to the cwd
    deeper.write_text("base: ../tiny.yaml\nhead:\n  init_args:\n    depth: 2\ntrain:\n  steps: 4\n")
    longer = tmp_path / "longer.yaml"  # a base may have a base of its own
    longer.write_text("base: exp/deeper.yaml\ntrain:\n  steps: 5\n")
    monkeypatch.chdir(REPO)
    cfg = yaml.safe_load(cli("train", "--config", longer, "--print_config").stdout)
    assert cfg["head"]["init_args"]["depth"] == 2 and cfg["head"]["init_args"]["width"] == 32  # merged
    assert cfg["train"]["steps"] == 5 and cfg["base"] is None  # printed with its bases applied: stands alone

    # a base given earlier on the line is not applied again: it would undo deeper.yaml's depth
    wider = tmp_path / "wider.yaml"
    wider.write_text("base: tiny.yaml\nmodel:\n  encoder_dim: 48\n")
    cfg = yaml.safe_load(cli("train", "--config", base, "--config", deeper, "--config", wider,
                             "--print_config").stdout)
    assert cfg["head"]["init_args"]["depth"] == 2 and cfg["model"]["encoder_dim"] == 48

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    user_error(cli("train", "--config", tmp_path / "a.yaml"), "in a circle",
               f"{tmp_path.resolve() / 'a.yaml'} -> {tmp_path.resolve() / 'b.yaml'} -> {tmp_path.resolve() / 'a.yaml'}")
    user_error(cli("train", "--base", base, "--config", wider), "give the base first", "--config BASE.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    user_error(cli("train", "--config", tmp_path / "c.yaml"), f"recipe {tmp_path / 'nowhere.yaml'} not found",
               f"base of {tmp_path / 'c.yaml'}")


def test_a_recipe_that_includes_another_is_refused(cli, tmp_path):
    base = tiny(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(f"config: {base}\nhead:\n  init_args:\n    depth: 2\n")
    user_error(cli("train", "--config", child, "--print_config"), "includes another recipe",
               "name it with `base: FILE.yaml`",
               f"--config BASE.yaml --config {child}")


# ----------------------------------------------------------------------------------------
# sandbox new-plugin
# ----------------------------------------------------------------------------------------
def cls_file(cls):
    return Path(importlib.import_module(cls.__module__).__file__).resolve()


def _import(path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["tokenizer", "ordering", "head", "dataset"])
def test_new_plugin_skeleton_passes_its_own_contract_test_and_trains(cli, tmp_path, kind):
    name = f"sketch_{kind}"
    proc = cli("new-plugin", kind, name, "--dir", tmp_path / "mine")
    assert proc.returncode == 0, proc.stderr
    test_module = _import(tmp_path / "mine" / f"test_{name}.py")
    getattr(test_module, f"test_{name}_contract")()  # the generated contract test passes as written
    cls = getattr(test_module.plugin, f"Sketch{kind.capitalize()}")
    assert registry.plugins(kind)[cls.__name__] is cls  # loaded once, under its --plugin module name
    run = tmp_path / "run"
    line = ["train", "--config", tiny(tmp_path), "--config", tmp_path / "mine" / f"{name}.yaml",
            "--run_dir", run, "--train.steps", 2]
    resolved = yaml.safe_load(cli(*line, "--print_config").stdout)
    proc = cli(*line)
    assert proc.returncode == 0, proc.stderr
    assert (run / "samples" / "final.png").is_file()
    stored = yaml.safe_load((run / "recipe.yaml").read_text())  # the run keeps the composed recipe it ran
    assert stored == {k: resolved[k] for k in stored} and stored["plugins"] == [str(cls_file(cls))]
    assert stored[SLOT[kind]]["class_path"] == f"sandbox_plugin_{name}.{cls.__name__}"
    user_error(cli("new-plugin", kind, name, "--dir", tmp_path / "mine"), "exist", "nothing was written")


# ----------------------------------------------------------------------------------------
# The contract kit fails, precisely, on a broken plugin of each kind
# ----------------------------------------------------------------------------------------
def _broken_tokenizers():
    from sandbox.plugins.tokenizers.pixels import PixelTokenizer

    class HalfDecode(PixelTokenizer):
        def decode(self, latent):
            return latent[:, :, ::2]

    class GlobalNoise(PixelTokenizer):
        def encode(self, images, generator=None, sample=True):
            return images + torch.randn_like(images) * 0.1 if sample else images

    class CacheDisagrees(PixelTokenizer):
        def latent_from_moments(self, moments, generator=None, sample=True):
            return moments * 2

    return [(HalfDecode, "decode(latent (2, 3, 8, 8)) has shape (2, 3, 4, 8); expected (B, 3, H, W) = (2, 3, 8, 8)"),
            (GlobalNoise, "encode(images (2, 3, 8, 8), sample=True) drew from torch's global random generator"),
            (CacheDisagrees, "latent_from_moments(moments(x), sample=False) gives (2, 3, 8, 8), not encode(x, "
                             "sample=False) (2, 3, 8, 8) (max |diff|")]


def _broken_orderings():
    from sandbox.plugins.orderings.random import RandomOrdering

    class Twice(RandomOrdering):
        def sampling_plan(self, batch, num_iter, generator=None, device="cpu"):
            plan = super().sampling_plan(batch, num_iter, generator, device)
            return plan + plan[-1:]

    class Ragged(RandomOrdering):
        def training_split(self, seq, generator=None):
            split = super().training_split(seq, generator)
            split.visible[0] = True
            return split

    class Scrambled(RandomOrdering):
        def to_grid(self, seq):
            return super().to_grid(seq.flip(1))

    return [(Twice, "step 1 predicts a position that is already known"),
            (Ragged, "shows rows [16, "), (Scrambled, "to_grid(to_sequence(grid)) is not the grid")]


def _broken_heads():
    from sandbox.plugins.heads.diffusion import DiffusionHead

    class NotPerRow(DiffusionHead):
        def loss(self, target, cond, generator=None):
            return super().loss(target, cond, generator)[:, None].expand(-1, 2)

    class Detached(DiffusionHead):
        def loss(self, target, cond, generator=None):
            return super().loss(target, cond.detach(), generator)

    class BatchCoupled(DiffusionHead):
        def loss(self, target, cond, generator=None):
            per_row = super().loss(target, cond, generator)
            return per_row + target.mean()

    class Unseeded(DiffusionHead):
        def sample(self, cond, temperature=1.0, cfg=1.0, uncond=None, generator=None):
            return super().sample(cond, temperature, cfg, uncond, None)

    return [(NotPerRow, "loss(target (10, 6), cond (10, 16)) has shape (10, 2); expected (N,) = (10,)"),
            (Detached, "not connected to cond"), (BatchCoupled, "changed the loss of rows [1, 2,"),
            (Unseeded, "sample(cond (10, 16)) drew from torch's global random generator")]


def _broken_datasets():
    from sandbox.plugins.datasets.digits import DigitsDataset

    class Bytes(DigitsDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return (image + 1) * 127.5, label

    class BadLabel(DigitsDataset):
        def __getitem__(self, index):
            return self.images[index], 10

    return [(Bytes, "dataset[0] image spans [0, 239]; images must lie in [-1, 1]"),
            (BadLabel, "dataset[0] label 10 is outside [0, num_classes=10)")]


@pytest.mark.parametrize("kind, cases", [("tokenizer", _broken_tokenizers), ("ordering", _broken_orderings),
                                         ("head", _broken_heads), ("dataset", _broken_datasets)])
def test_contract_kit_fails_on_broken_plugins(kind, cases):
    from sandbox.testing import ContractError, check_plugin

    for cls, fragment in cases():
        with pytest.raises(ContractError) as failure:
            check_plugin(cls, **cls.contract_args)
        message = str(failure.value)
        assert message.startswith(f"{cls.__name__} breaks the {kind} contract: "), message
        assert fragment in message, message
        assert isinstance(failure.value, AssertionError)  # pytest reports it as a test failure


def test_contract_kit_names_a_plugin_that_raises():
    from sandbox.testing import ContractError, check_head

    class Crashes(Head):
        def loss(self, target, cond, generator=None):
            raise RuntimeError("boom")

    with pytest.raises(ContractError, match=r"Crashes breaks the head contract: loss\(target \(10, 6\), cond "
                                            r"\(10, 16\)\) raised RuntimeError: boom"):
        check_head(Crashes)
