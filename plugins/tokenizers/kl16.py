"""KL-16: the LDM KL autoencoder MAR uses (256 px -> 16 x 16 x 16), as a diffusers AutoencoderKL.

Architecture (LDM ``AutoencoderKL`` with ch 128, ch_mult 1,1,2,2,4, two res-blocks
per level, attention at the lowest encoder resolution, z 16, double_z) in
diffusers terms: down blocks 4 x ``DownEncoderBlock2D`` + ``AttnDownEncoderBlock2D``,
up blocks 5 x ``UpDecoderBlock2D``, block_out_channels 128,128,256,256,512,
layers_per_block 2, latent_channels 16: exactly the official 66,456,019 parameters.
Latents are scaled by 0.2325 (MAR's constant). ``ldm_to_diffusers`` converts the
official ``kl16.ckpt`` (``{"model": LDM state_dict}``).

References:
    MAR official models/vae.py (the KL-16 module layout), engine_mar.py (posterior.sample() * 0.2325);
    Rombach et al., CVPR 2022 (LDM autoencoders); diffusers AutoencoderKL.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sandbox.errors import UserError
from sandbox.plugins.tokenizers.autoencoder_kl import AutoencoderKLTokenizer
from sandbox.run.checkpoints import load_checkpoint

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

SCALE = 0.2325  # MAR: latents * 0.2325 have roughly unit variance on ImageNet (official engine_mar.py, mar.py)
CH_MULT = (1, 1, 2, 2, 4)  # LDM KL-16: five levels, four 2x downsamplings -> stride 16
DEFAULT_CHECKPOINT = "pretrained_models/vae/kl16.ckpt"  # where the official scripts put it (util/download.py)


def kl16_vae(base_channels: int = 128) -> AutoencoderKL:
    """The KL-16 architecture as a diffusers AutoencoderKL (random weights); 128 base channels is the real one."""
    from diffusers import AutoencoderKL  # imported on first use (seconds of imports every CLI start otherwise)

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (len(CH_MULT) - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * len(CH_MULT),
        block_out_channels=tuple(base_channels * m for m in CH_MULT),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,  # LDM Normalize: GroupNorm(32, eps=1e-6), as diffusers' default
        sample_size=256,
        scaling_factor=SCALE,
    )


# --------------------------------------------------------------------------------------
# LDM (official kl16.ckpt) -> diffusers names
# --------------------------------------------------------------------------------------
# Hand-written: diffusers' own converter (loaders.single_file_utils.convert_ldm_vae_checkpoint) targets the
# Stable Diffusion VAE and has no rule for attention inside an encoder down block (KL-16's encoder.down.4.attn),
# which it would silently mangle. The rules below are the whole LDM -> diffusers mapping for this family.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TRAINING_ONLY = ("loss.",)  # LDM training checkpoints also hold the LPIPS/discriminator loss; not the model


def _rename(name: str, num_levels: int) -> str | None:
    """One LDM parameter name -> its diffusers name (None: not a model parameter we know)."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        part, updown, level, kind, j, layer, wb = m.groups()
        # LDM indexes decoder levels by resolution (up.0 is the finest, run last); diffusers by execution order
        block = f"{updown}_blocks.{level if updown == 'down' else num_levels - 1 - int(level)}"
        table = _RESNET if kind == "block" else _ATTN
        if layer not in table:
            return None
        return f"{part}.{block}.{'resnets' if kind == 'block' else 'attentions'}.{j}.{table[layer]}.{wb}"
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", name)
    if m:
        path, level, kind, wb = m.groups()
        level = int(level) if kind == "downsample" else num_levels - 1 - int(level)
        return f"{path.replace('.down', '.down_blocks').replace('.up', '.up_blocks')}.{level}.{kind}rs.0.conv.{wb}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", name)
    if m:
        part, sub, layer, wb = m.groups()
        if sub == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTN[layer]}.{wb}" if layer in _ATTN else None
        return f"{part}.mid_block.resnets.{int(sub[-1]) - 1}.{_RESNET[layer]}.{wb}" if layer in _RESNET else None
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", name)
    if m:
        part, layer, wb = m.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{wb}"
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", name):
        return name
    return None


def ldm_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An LDM-layout KL autoencoder state_dict (official kl16.ckpt's ``model``) -> diffusers AutoencoderKL names.

    Attention q/k/v/proj_out are 1x1 convolutions in LDM and linear layers in diffusers: (C,C,1,1) -> (C,C).
    Unknown names are an error (training-only ``loss.*`` entries are dropped), so nothing is silently ignored.
    """
    levels = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_levels = max(levels) + 1 if levels else len(CH_MULT)
    out, unknown = {}, []
    for name, value in state_dict.items():
        if name.startswith(_TRAINING_ONLY):
            continue
        new = _rename(name, num_levels)
        if new is None:
            unknown.append(name)
            continue
        if ".attentions." in new and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    if unknown:
        raise UserError(f"not an LDM KL autoencoder state_dict: {len(unknown)} unknown entries, e.g. {unknown[:3]}")
    return out


def load_kl16_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the official ``kl16.ckpt`` (a dict with ``model``: the LDM state_dict) safely (tensors only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"KL-16 weights not found: {path}. Download kl16.ckpt from the official MAR release "
            f"(github.com/LTH14/mar, util/download.py) and put it at {path}, or set --tokenizer.checkpoint PATH"
        )
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} is not a KL-16 checkpoint (expected a dict with key 'model' holding tensors)")
    return state


class KL16Tokenizer(AutoencoderKLTokenizer):
    """MAR's pretrained KL-16 VAE (LDM layout, diffusers AutoencoderKL): 16 channels, stride 16, scale 0.2325."""

    # random weights and reduced width: enough to check shapes and the contract in well under a second
    contract_args = {"checkpoint": None, "base_channels": 32}

    def __init__(
        self,
        checkpoint: str | None = DEFAULT_CHECKPOINT,  # the official kl16.ckpt; None = random weights (tests only)
        patch_size: int = 1,  # MAR: one latent pixel per token (256 px -> 16 x 16 tokens of 16 dims)
        base_channels: int = 128,  # the real KL-16; smaller (a multiple of 32) for tests and the parity fixture
        scale: float = SCALE,  # 0.2325: unit variance on ImageNet; `sandbox calibrate-scale` measures another dataset's
    ):
        if base_channels < 32 or base_channels % 32:
            raise ValueError(f"base_channels must be a positive multiple of 32 (GroupNorm(32)), got {base_channels}")
        if checkpoint is None:
            vae = kl16_vae(base_channels)
        else:
            state = ldm_to_diffusers(load_kl16_state_dict(checkpoint))
            with torch.device("meta"):  # no random init of 66M parameters that are overwritten right away
                vae = kl16_vae(base_channels)
            try:
                vae.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                found = state.get("encoder.conv_in.weight")
                hint = f" (the file has base_channels {found.shape[0]})" if found is not None else ""
                raise UserError(f"{checkpoint} does not fit a KL-16 with base_channels {base_channels}{hint}: "
                                f"{str(e).splitlines()[0]}") from e
        super().__init__(vae, scale=scale, patch_size=patch_size)
