"""Any diffusers ``AutoencoderKL`` saved in a local folder as a tokenizer (SD's KL-8, a Flux-style 16-channel VAE, ...).

The folder is what ``AutoencoderKL.save_pretrained`` writes (``config.json`` and the weights), or a model
repository laid out with a ``vae/`` subfolder, or a ``sandbox train-tokenizer`` run directory (its ``vae/``
is such a folder). The stride follows the architecture (one 2x downsampling per level but the last); the
patch size is the recipe's, so the token dimension is ``latent_channels * patch_size**2`` (KL-8 with 4
channels and patch 2: 16, as KL-16; a 16-channel Flux VAE with patch 2: 64). The latent scale and shift
default to the folder's ``scaling_factor`` / ``shift_factor``; a recipe sets ``scale`` to override it, and
``sandbox calibrate-scale`` measures it on the recipe's dataset.

References:
    Rombach et al., CVPR 2022 (KL autoencoders; KL-8 is Stable Diffusion's VAE, scaling_factor 0.18215);
    MAR sec. 5.4 / LTH14/mar#102 (KL-8 with patch 2 vs a Flux VAE with patch 2 in MAR); diffusers AutoencoderKL.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sandbox.errors import UserError
from sandbox.plugins.tokenizers.autoencoder_kl import AutoencoderKLTokenizer

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what save_pretrained writes


def find_vae_folder(path: str | Path, subfolder: str | None = None, model: str = "AutoencoderKL") -> Path:
    """The folder with the diffusers ``model``'s config.json: ``path`` itself, ``path/subfolder``, or ``path/vae``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"{model} folder not found: {root}. Give --tokenizer.path a diffusers-format folder (config.json "
            f"and diffusion_pytorch_model.safetensors, as {model}.save_pretrained writes it) or a "
            "`sandbox train-tokenizer` run directory"
        )
    candidates = [root / subfolder] if subfolder else [root, root / "vae"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"{root} holds no {model}: expected config.json in {' or '.join(map(str, candidates))}")


def read_vae_config(folder: Path, model: str = "AutoencoderKL") -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {folder / 'config.json'}: {e}") from e
    if config.get("_class_name", model) != model:
        article = "an" if model[0] in "AEIOU" else "a"
        raise UserError(f"{folder} holds a diffusers {config['_class_name']}, not {article} {model}")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    return config


class DiffusersVAETokenizer(AutoencoderKLTokenizer):
    """A diffusers AutoencoderKL from a local folder (KL-8, Flux-style, your own); patch size and scale from the recipe."""

    @classmethod
    def contract_args(cls) -> dict:  # a tiny random KL-4 (two levels: stride 2) saved in a temporary folder
        from diffusers import AutoencoderKL

        folder = tempfile.mkdtemp(prefix="diffusers-vae-contract-")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                      sample_size=8).save_pretrained(folder)
        return {"path": folder, "patch_size": 2}

    def __init__(
        self,
        path: str,  # diffusers-format folder, a repository with a vae/ subfolder, or a train-tokenizer run directory
        patch_size: int = 1,  # latent pixels per token side: 1 for stride-16 VAEs (MAR's KL-16), 2 for stride 8
        scale: float | None = None,  # latent multiplier; None: the folder's scaling_factor (SD KL-8: 0.18215)
        shift: float | None = None,  # subtracted before scaling; None: the folder's shift_factor (Flux: 0.1159), or 0
        subfolder: str | None = None,  # where config.json is inside ``path`` (default: path itself, else path/vae)
    ):
        from diffusers import AutoencoderKL  # imported on first use: seconds of imports every CLI start otherwise

        folder = find_vae_folder(path, subfolder)
        config = read_vae_config(folder)
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as e:  # a torn or mismatched weight file: one line naming the folder
            raise UserError(f"cannot load the AutoencoderKL in {folder}: {' '.join(str(e).split())[:200]}") from e
        if scale is None:
            scale = config.get("scaling_factor", 1.0)
        if shift is None:
            shift = config.get("shift_factor") or 0.0
        if not scale > 0:
            raise UserError(f"tokenizer scale must be > 0, got {scale}")
        super().__init__(vae, scale=scale, shift=shift, patch_size=patch_size)
        self.folder = folder
