"""A plugin that breaks its kind's contract stops `sandbox train` with one error line naming it (exit code 2):
when its class registers, when the recipe builds it, or at the first call that shows the break -- never a
traceback from inside the core, never silently wrong images (sandbox/guards.py)."""
from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
from conftest import TINY_RECIPE

from sandbox.config import registry


@pytest.fixture(autouse=True)
def isolated():
    with registry.isolated():
        yield


@pytest.fixture
def train(capsys, tmp_path):
    """Train the tiny recipe for one step (its sample grid at the end) with one plugin file and recipe changes."""
    import yaml

    from sandbox.cli import main

    def call(source: str, **slots):
        plugin = tmp_path / "broken.py"
        plugin.write_text("import torch\nfrom sandbox.core.contracts import *\n" + textwrap.dedent(source))
        recipe = tmp_path / "tiny.yaml"
        recipe.write_text(yaml.safe_dump({**TINY_RECIPE, **slots}))
        code = main(["train", "--config", str(recipe), "--plugin", str(plugin), "--train.steps", "1",
                     "--run_dir", str(tmp_path / "run")])
        return subprocess.CompletedProcess([], code, *capsys.readouterr())

    return call


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


HEAD = {"class_path": "Broken", "init_args": {"width": 16, "depth": 1}}
BUILT = {"class_path": "Broken"}  # a head whose own __init__ takes no width
ORDERING = {"class_path": "Broken"}

# (plugin source, recipe slots, fragments of the one error line, whether the run directory is never made)
CASES = {
    "head without sample": ("""
        class Broken(Head):
            def loss(self, target, cond, generator=None):
                return target.sum(1)
        """, {"head": BUILT}, ["head Broken (file ", "does not implement sample(); a head implements loss and sample"],
        True),
    "head loss without the generator argument": ("""
        from sandbox.plugins.heads.flow import FlowHead
        class Broken(FlowHead):
            def loss(self, target, cond):
                return super().loss(target, cond)
        """, {"head": HEAD}, ["defines loss(self, target, cond), which cannot take the core's call; keep the "
                              "arguments of Head.loss(self, target"], True),
    "ordering whose __init__ forgets the grid": ("""
        from sandbox.plugins.orderings.random import RandomOrdering
        class Broken(RandomOrdering):
            def __init__(self, ratio: float = 0.5):
                super().__init__((4, 4))  # the grid of 8 px images in 2 x 2 patches
        """, {"ordering": ORDERING}, ["ordering Broken", "so __init__ must take grid first"], True),
    "head constructor refusing a setting": ("""
        from sandbox.plugins.heads.flow import FlowHead
        class Broken(FlowHead):
            def __init__(self, token_dim, cond_dim, width: int = 0):
                if width < 1:
                    raise ValueError(f"width must be >= 1, got {width}")
                super().__init__(token_dim, cond_dim, width=width, depth=1)
        """, {"head": BUILT}, ["cannot build head Broken: width must be >= 1, got 0"], True),
    "head constructor failing (no super().__init__)": ("""
        from sandbox.plugins.heads.flow import FlowHead
        class Broken(FlowHead):
            def __init__(self, token_dim, cond_dim):
                self.net = torch.nn.Linear(cond_dim, token_dim)
        """, {"head": BUILT}, ["cannot build head Broken: AttributeError: cannot assign module before "
                               "Module.__init__()", "(broken.py:7)"], True),
    "sampling plan that never predicts half the positions": ("""
        from sandbox.plugins.orderings.random import RandomOrdering
        class Broken(RandomOrdering):
            def sampling_plan(self, batch, num_iter, generator=None, device="cpu"):
                return super().sampling_plan(batch, num_iter, generator, device)[:1]
        """, {"ordering": ORDERING}, ["ordering Broken", "sampling_plan left", "pairs never predicted"], False),
    "head sample with one value too many per row": ("""
        from sandbox.plugins.heads.flow import FlowHead
        class Broken(FlowHead):
            def sample(self, cond, temperature=1.0, cfg=1.0, uncond=None, generator=None):
                x = super().sample(cond, temperature, cfg, uncond, generator)
                return torch.cat([x, x[:, :1]], 1)
        """, {"head": HEAD}, ["head Broken", "sample returned (", ", 13); expected (N, C): one token per row"], False),
    "head loss per value instead of per row": ("""
        from sandbox.plugins.heads.flow import FlowHead
        class Broken(FlowHead):
            def loss(self, target, cond, generator=None):
                return super().loss(target, cond, generator)[:, None].expand(-1, 2)
        """, {"head": HEAD}, ["head Broken", "loss returned (", ", 2); expected (N,): the per-row loss"], False),
    "training split with a visible mask of one row": ("""
        from sandbox.plugins.orderings.random import RandomOrdering
        class Broken(RandomOrdering):
            def training_split(self, seq, generator=None):
                split = super().training_split(seq, generator)
                split.visible = split.visible[0]
                return split
        """, {"ordering": ORDERING}, ["ordering Broken", "training_split gave visible (16,)", "expected (8, 16) bool"],
        False),
    "training split showing rows different numbers of positions": ("""
        from sandbox.plugins.orderings.random import RandomOrdering
        class Broken(RandomOrdering):
            def training_split(self, seq, generator=None):
                split = super().training_split(seq, generator)
                split.visible[0] = True
                return split
        """, {"ordering": ORDERING}, ["visible mask shows different numbers of positions in different rows"], False),
    "dataset with a label outside its classes": ("""
        from sandbox.plugins.datasets.digits import DigitsDataset
        class Broken(DigitsDataset):
            def __getitem__(self, index):
                image, label = super().__getitem__(index)
                return image, 10
        """, {"data": {"class_path": "Broken", "init_args": {"image_size": 8}}},
        ["dataset Broken", "gave labels [10, 10, 10, 10, 10, 10, 10, 10]", "in [0, num_classes=10)"], False),
    "dataset of one-channel images": ("""
        from sandbox.plugins.datasets.digits import DigitsDataset
        class Broken(DigitsDataset):
            def __getitem__(self, index):
                image, label = super().__getitem__(index)
                return image[:1], label
        """, {"data": {"class_path": "Broken", "init_args": {"image_size": 8}}},
        ["dataset Broken", "gave a batch of images (", ", 1, 8, 8); expected (B, 3, 8, 8)"], False),  # the latent check at start sees it
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_plugin_is_one_error_line(train, tmp_path, case):
    source, slots, fragments, before_the_run = CASES[case]
    line = one_error_line(train(source, **slots))
    for fragment in fragments:
        assert fragment in line, line
    if before_the_run:  # found before anything is written
        assert not (tmp_path / "run").exists()
    for ckpt in tmp_path.glob("run/checkpoints/*.pt"):  # a sampling break shows after the last checkpoint: whole
        assert "model" in torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not list(tmp_path.glob("run/checkpoints/.*.tmp*"))  # never a half-written one


def test_valid_signatures_pass_the_class_check():
    """Keyword-only or **kwargs arguments, defaults on the injected arguments (named as the core names them),
    *args: all callable the way the core calls them."""
    from sandbox.core.checks import check_class
    from sandbox.core.contracts import Head, Ordering, Tokenizer
    from sandbox.plugins.heads.flow import FlowHead
    from sandbox.plugins.orderings.random import RandomOrdering
    from sandbox.plugins.tokenizers.pixels import PixelTokenizer

    class KeywordOnly(PixelTokenizer):
        def encode(self, images, generator=None, *, sample=True):
            return super().encode(images, generator, sample=sample)

    class Kwargs(PixelTokenizer):
        def encode(self, images, generator=None, **kwargs):
            return super().encode(images, generator, **kwargs)

    class Defaults(FlowHead):
        def __init__(self, token_dim=12, cond_dim=32, width=16):
            super().__init__(token_dim, cond_dim, width=width)

    class Star(RandomOrdering):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    for kind, cls, base in (("tokenizer", KeywordOnly, Tokenizer), ("tokenizer", Kwargs, Tokenizer),
                            ("head", Defaults, Head), ("ordering", Star, Ordering)):
        check_class(kind, cls, base)
