"""``sandbox import-official CKPT --run_dir DIR [--vae PATH]``: a released MAR checkpoint as a sandbox run."""
from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

NAME = "import-official"
HELP = "Turn an official MAR-B/L/H checkpoint-last.pth into a run directory (then `sandbox sample` it)."
ORDER = 40


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("checkpoint", type=str, help="The official checkpoint-last.pth (model, model_ema, args).")
    p.add_argument("--run_dir", type=str, required=True, help="The run directory to create.")
    p.add_argument("--vae", type=str | None, default=None,
                   help="The official kl16.ckpt (default: pretrained_models/vae/kl16.ckpt, as the official scripts).")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.lab.official import import_official

    out = import_official(cfg.checkpoint, cfg.run_dir, cfg.vae)
    print(f"imported {out['model']} ({out['params'] / 1e6:.1f}M parameters, epoch {out['epoch']}) into "
          f"{out['run_dir']}; sample it with `sandbox sample --run_dir {out['run_dir']}`")
