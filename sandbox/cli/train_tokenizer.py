"""``sandbox train-tokenizer --config RECIPE [--run_dir DIR] [overrides]``: train a small KL or VQ autoencoder."""
from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from sandbox.cli.train import default_run_dir

NAME = "train-tokenizer"
HELP = ("Train a KL or VQ autoencoder (diffusers AutoencoderKL / VQModel) on a dataset; use RUN as --tokenizer.path "
        "in a MAR recipe.")
ORDER = 12


def parser() -> ArgumentParser:
    from sandbox.lab.tokenizer_training import add_tokenizer_recipe_arguments

    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_tokenizer_recipe_arguments(p)
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="Where checkpoints, logs and the exported vae/ go (default: runs/<recipe file name>).")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.lab.tokenizer_training import train_tokenizer
    from sandbox.run.lock import run_lock

    run_dir = cfg.run_dir or default_run_dir(cfg)
    with run_lock(run_dir):  # one writer per run directory, before its recipe is checked
        summary = train_tokenizer(cfg, run_dir)
    if not summary.get("stopped"):
        vq = "codes_used" in summary
        codes = f"; {summary['codes_used']} of {summary['codebook_size']} codes used" if vq else ""
        print(f"done: {summary['step']} steps; reconstruction PSNR {summary['psnr']:.2f} dB on "
              f"{summary['num_images']} images{codes}; latent scale {summary['scale']}; use it in a MAR recipe with "
              f"`tokenizer: {{class_path: {'VQTokenizer' if vq else 'DiffusersVAETokenizer'}, init_args: "
              f"{{path: {summary['run_dir']}}}}}`")
