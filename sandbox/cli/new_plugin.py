"""``sandbox new-plugin KIND NAME [--dir DIR]``: a working plugin skeleton, its contract test and a recipe stub.

Writes ``NAME.py`` (a minimal plugin of the kind that already passes its
contract: a diagonal Gaussian head, a random ordering with equal chunks,
scaled pixels, synthetic bars), ``test_NAME.py`` (the contract kit on it) and
``NAME.yaml`` (a recipe that puts it into the quickstart). Nothing is
overwritten. See docs/writing-plugins.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.errors import UserError

NAME = "new-plugin"
HELP = "Write a plugin skeleton (KIND: tokenizer, ordering, head, dataset), its contract test and a recipe stub."
ORDER = 95

SUFFIX = {"tokenizer": "Tokenizer", "ordering": "Ordering", "head": "Head", "dataset": "Dataset"}
SLOT = {"tokenizer": "tokenizer", "ordering": "ordering", "head": "head", "dataset": "data"}


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("kind", type=Literal["tokenizer", "ordering", "head", "dataset"], help="The plugin kind.")
    p.add_argument("name", type=str, help="snake_case concept name: the file is NAME.py (e.g. gmm, zigzag).")
    p.add_argument("--dir", type=str, default=".", help="Where the three files go.")
    p.add_argument("--class_name", type=str | None, default=None,
                   help="The class (default: NAME in CamelCase plus the kind, e.g. gmm -> GmmHead).")
    return p


def class_name_for(kind: str, name: str) -> str:
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    return camel if camel.endswith(SUFFIX[kind]) else camel + SUFFIX[kind]


# --------------------------------------------------------------------------------------
# Templates ($Cls, $name, $kind, $slot). Each skeleton is the simplest plugin that keeps the contract.
# --------------------------------------------------------------------------------------
HEADER = '''"""$Cls: TODO one line on the idea.

TODO: what it does and why, with the shapes it works on (see docs/writing-plugins.md).

References:
    TODO: the paper or code this follows (facts carry over, code is written here).
"""
from __future__ import annotations

'''

PLUGINS = {
    "head": HEADER + '''import math

import torch
from torch import Tensor, nn

from sandbox import Head


class $Cls(Head):
    """TODO one line (shown by `sandbox plugins`). Skeleton: a diagonal Gaussian per token."""

    contract_args = {"width": 16}  # small init_args for the contract test (sandbox.testing.check_head)

    def __init__(
        self,
        token_dim: int,  # C, passed by the core (the tokenizer's token width)
        cond_dim: int,  # D, passed by the core (the decoder width)
        width: int = 256,  # TODO: why this default
    ):
        super().__init__(token_dim, cond_dim)
        self.net = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, 2 * token_dim))

    def gaussian(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """cond (N,D) -> mean (N,C), std (N,C)."""
        mean, raw = self.net(cond).float().chunk(2, dim=-1)  # (N, C) each; float32 under autocast too
        return mean, nn.functional.softplus(raw) + 1e-3  # a floor keeps the likelihood finite

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.gaussian(cond)  # (N, C) each
        nll = 0.5 * ((target.float() - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)  # (N, C)
        return nll.mean(-1)  # (N,): one loss per row

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0, uncond: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.gaussian(cond)  # (N, C) each
        if uncond is not None and cfg != 1.0:
            mean_u, _ = self.gaussian(uncond)
            mean = mean_u + cfg * (mean - mean_u)  # classifier-free guidance on the mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)  # (N, C), only from `generator`
        return mean + temperature * std * noise  # (N, C)
''',
    "ordering": HEADER + '''import math

import torch
from torch import Tensor

from sandbox import Ordering, SampleStep, TrainingSplit


class $Cls(Ordering):
    """TODO one line (shown by `sandbox plugins`). Skeleton: random order, uniform mask ratio, equal chunks."""

    contract_args = {}  # small init_args for the contract test (sandbox.testing.check_ordering)

    def __init__(
        self,
        grid: tuple[int, int],  # (h, w) token grid, passed by the core
        min_mask_ratio: float = 0.5,  # TODO: why this default
    ):
        super().__init__(grid)
        self.min_mask_ratio = min_mask_ratio

    def training_split(self, seq: Tensor, generator: torch.Generator | None = None) -> TrainingSplit:
        B, L, _ = seq.shape
        u = float(torch.rand((), generator=generator, device=seq.device))
        num_hidden = max(1, math.ceil(L * (self.min_mask_ratio + (1 - self.min_mask_ratio) * u)))  # one per batch
        order = torch.rand(B, L, generator=generator, device=seq.device).argsort(dim=1)  # (B, L)
        hidden = torch.zeros(B, L, dtype=torch.bool, device=seq.device)
        hidden.scatter_(1, order[:, :num_hidden], True)  # (B, L): every row hides the same number
        return TrainingSplit(inputs=seq, visible=~hidden, weight=hidden.to(seq.dtype))

    def sampling_plan(self, batch: int, num_iter: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", known: Tensor | None = None) -> list[SampleStep]:
        L = self.seq_len
        n = L if known is None else self.count_unknown(known, batch, L)  # positions to predict per row
        scores = torch.rand(batch, L, generator=generator, device=device)  # (B, L)
        if known is not None:
            scores = scores.masked_fill(known.to(device), 2.0)  # known positions sort after the unknown ones
        order = scores.argsort(dim=1)[:, :n]  # (B, n) the unknown positions, in a random order
        steps, done = [], L - n  # progress: the fraction of the sequence fixed, known positions included
        for chunk in order.tensor_split(max(1, min(num_iter, n)), dim=1) if n else []:  # (B, k) nearly equal
            predict = torch.zeros(batch, L, dtype=torch.bool, device=device)
            predict.scatter_(1, chunk, True)  # (B, L)
            done += chunk.shape[1]
            steps.append(SampleStep(predict=predict, progress=done / L))
        return steps
''',
    "tokenizer": HEADER + '''import torch
from torch import Tensor

from sandbox import Tokenizer


class $Cls(Tokenizer):
    """TODO one line (shown by `sandbox plugins`). Skeleton: scaled pixels (stride 1, 3 channels)."""

    contract_args = {"patch_size": 2}  # small init_args for the contract test (sandbox.testing.check_tokenizer)

    latent_channels = 3  # c: channels of the latent grid
    stride = 1  # s: image pixels per latent cell along one side

    def __init__(
        self,
        patch_size: int = 2,  # p: a token is a p x p patch of the latent
        scale: float = 1.0,  # TODO: why this default (a latent scale makes latents about unit variance)
    ):
        super().__init__(patch_size)
        self.scale = scale

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return images * self.scale  # (B, 3, H, W) -> (B, c, H/s, W/s)

    def decode(self, latent: Tensor) -> Tensor:
        return latent / self.scale  # (B, c, h', w') -> (B, 3, H, W)
''',
    "dataset": HEADER + '''import torch
from torch import Tensor

from sandbox import Dataset


class $Cls(Dataset):
    """TODO one line (shown by `sandbox plugins`). Skeleton: synthetic bars, one bar height per class."""

    contract_args = {"image_size": 8, "num_images": 16}  # small, for the contract test (check_dataset)

    def __init__(
        self,
        image_size: int = 16,  # TODO: why this default
        num_images: int = 1000,
        num_classes: int = 4,
    ):
        self.image_size, self.num_classes = image_size, num_classes
        labels = torch.arange(num_images) % num_classes  # (N,)
        images = torch.full((num_images, 3, image_size, image_size), -1.0)  # (N, 3, S, S) background -1
        rows = labels * image_size // num_classes  # (N,) the bar's row encodes the class
        images[torch.arange(num_images), :, rows, :] = 1.0
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])  # (3, S, S) in [-1, 1], label
''',
}

TEST = '''"""The contract test of $Cls: `pytest $test_file` (sandbox.testing, see docs/writing-plugins.md)."""
from pathlib import Path

from sandbox.config.registry import load_file
from sandbox.testing import check_$kind

# load the file the way `--plugin` does: imported under a second name too, its class would exist twice
plugin = load_file(Path(__file__).with_name("$name.py"))


def test_${name}_contract():
    check_$kind(plugin.$Cls)  # built from $Cls.contract_args; pass init_args to check other settings
'''

RECIPE = '''# $Cls on top of the quickstart recipe (a later --config overrides an earlier one):
#   sandbox train --config recipes/quickstart.yaml --config $recipe_path --train.steps 50
# or name the recipe this one builds on, relative to this file, and give this one alone:
# base: path/to/recipes/quickstart.yaml
# Plugin files are relative to this recipe; a run directory stores their absolute paths.
plugins:
  - $name.py
$slot:
  class_path: $Cls
  init_args:                     # TODO: the settings to try (arguments the quickstart's $slot also has carry over)
$init_args'''

# the skeletons' own defaults, written out in the recipe stub
STUB_ARGS = {"head": {"width": 256}, "ordering": {"min_mask_ratio": 0.5},
             "tokenizer": {"patch_size": 2, "scale": 1.0},
             "dataset": {"image_size": 16, "num_images": 1000, "num_classes": 4}}


def run(cfg: Namespace) -> None:
    from sandbox.config import registry
    from sandbox.run.files import atomic_write_bytes

    kind, name = cfg.kind, cfg.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(f"plugin name {name!r} must be snake_case (lowercase letters, digits, _), e.g. gmm or "
                        "zigzag_order: it names the file, and the class in CamelCase")
    cls = cfg.class_name or class_name_for(kind, name)
    if not cls.isidentifier() or cls in SUFFIX.values():
        raise UserError(f"class name {cls!r} is not a Python identifier other than a kind's name")
    out = Path(cfg.dir)
    files = {out / f"{name}.py": PLUGINS[kind], out / f"test_{name}.py": TEST, out / f"{name}.yaml": RECIPE}
    taken = [str(f) for f in files if f.exists()]
    if taken:
        raise UserError(f"{', '.join(taken)} exist(s) already; pick another NAME or --dir (nothing was written)")
    existing = registry.plugins(kind).get(cls)
    if existing is not None:
        raise UserError(f"a {kind} plugin named {cls} exists already ({registry.source_of(existing)}); "
                        "pick another NAME or --class_name (nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from e
    values = {"Cls": cls, "name": name, "kind": kind, "slot": SLOT[kind], "test_file": out / f"test_{name}.py",
              "recipe_path": out / f"{name}.yaml",
              "init_args": "".join(f"    {k}: {v}\n" for k, v in STUB_ARGS[kind].items())}
    for path, template in files.items():
        atomic_write_bytes(path, Template(template).substitute(values).encode())
    print(f"wrote {out / (name + '.py')} ({cls}), its contract test {out / ('test_' + name + '.py')} and a recipe "
          f"stub {out / (name + '.yaml')}\n"
          f"next: pytest {out / ('test_' + name + '.py')}\n"
          f"      sandbox train --config {quickstart_recipe()} --config {out / (name + '.yaml')} --train.steps 50")


def quickstart_recipe() -> str:
    """The quickstart recipe of the checkout this package runs from, as a path from here (a clone's
    recipes/quickstart.yaml otherwise: recipes are not part of an installed wheel)."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    if not path.is_file():
        return "recipes/quickstart.yaml"
    return min(str(path), os.path.relpath(path), key=len)
