"""MAR sandbox: masked autoregressive image generation with continuous tokens (MAR + Diffusion Loss).

The Python API (docs/python-api.md)::

    import sandbox
    run = sandbox.load_run("runs/quickstart")               # a trained run: recipe + newest checkpoint
    images = sandbox.generate(run, labels=[3] * 8)          # (8, 3, H, W) in [-1, 1]
    sandbox.save_grid(images, "threes.png")
    exp = sandbox.build("recipes/quickstart.yaml")          # a recipe's parts, untrained

    sandbox.Head, sandbox.Ordering, sandbox.Tokenizer, sandbox.Dataset   # the plugin kinds to subclass
    sandbox.Condition, sandbox.Backbone                                # (and the two the core defaults)
    sandbox.testing.check_plugin(MyHead)                               # the contract kit

The layout: ``core`` (the method), ``fast`` (speed paths applied from outside), ``run`` (training loop and
run directories), ``eval`` (sample sets and metrics), ``lab`` (tokenizers, latent caches, official
checkpoints), ``config`` (recipes and plugin discovery), ``images``, ``cli``; the built-in plugins install as
``sandbox.plugins``.
"""
from __future__ import annotations

import importlib

__version__ = "0.3.0"

# name -> the module that defines it; imported on first use, so `import sandbox` (and the CLI) stays light
_API = {
    "load_run": "sandbox.run.loading", "LoadedRun": "sandbox.run.loading",
    "generate": "sandbox.api", "build": "sandbox.api", "save_grid": "sandbox.api",
    "Tokenizer": "sandbox.core.contracts", "Ordering": "sandbox.core.contracts", "Head": "sandbox.core.contracts",
    "Dataset": "sandbox.core.contracts", "Condition": "sandbox.core.contracts", "Backbone": "sandbox.core.contracts",
    "TrainingSplit": "sandbox.core.contracts",
    "SampleStep": "sandbox.core.contracts", "UserError": "sandbox.errors",
}
_MODULES = {"testing", "fast", "core", "run", "eval", "lab", "config", "images", "cli", "plugins"}

__all__ = ["__version__", *_API, *sorted(_MODULES)]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"sandbox.{name}")
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
