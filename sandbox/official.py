"""Interoperability with the official implementation (github.com/LTH14/mar): configs and state dicts.

The sandbox keeps the official parameter names inside ``transformer`` and
``head`` (``diffloss`` in the official code), so conversion is a prefix rename.

References:
    MAR official models/mar.py (MAR constructor arguments, mar_base/large/huge), models/diffloss.py.
"""
from __future__ import annotations

from torch import Tensor

from sandbox.mar import MARConfig, MARTransformer
from sandbox.model import MAR

# official MAR(...) keyword -> MARConfig field
_CONFIG_MAP = {
    "encoder_embed_dim": "encoder_dim", "encoder_depth": "encoder_depth", "encoder_num_heads": "encoder_heads",
    "decoder_embed_dim": "decoder_dim", "decoder_depth": "decoder_depth", "decoder_num_heads": "decoder_heads",
    "buffer_size": "buffer_size", "label_drop_prob": "label_drop_prob", "attn_dropout": "attn_dropout",
    "proj_dropout": "proj_dropout", "diffusion_batch_mul": "head_batch_mul", "mlp_ratio": "mlp_ratio",
}


def mar_config(official: dict, norm_eps: float = 1e-6) -> MARConfig:
    """MARConfig from official constructor arguments. ``norm_eps``: 1e-6 for the released
    mar_base/large/huge factories; the bare ``MAR(...)`` constructor's default LayerNorm uses 1e-5."""
    kwargs = {ours: official[theirs] for theirs, ours in _CONFIG_MAP.items() if theirs in official}
    return MARConfig(norm_eps=norm_eps, **kwargs)


def geometry(official: dict) -> dict:
    """Sequence length, token dim, patch and grid of an official config."""
    side = official["img_size"] // official["vae_stride"] // official["patch_size"]
    return {
        "grid": (side, side),
        "seq_len": side * side,
        "token_dim": official["vae_embed_dim"] * official["patch_size"] ** 2,
        "patch_size": official["patch_size"],
        "num_classes": official.get("class_num", 1000),
    }


def build_model(official: dict, norm_eps: float = 1e-6, **head_overrides) -> MAR:
    """A sandbox MAR with the official config's architecture (random weights) and its DiffusionHead."""
    from plugins.heads.diffusion import DiffusionHead

    geo = geometry(official)
    cfg = mar_config(official, norm_eps)
    transformer = MARTransformer(cfg, geo["seq_len"], geo["token_dim"], geo["num_classes"])
    head_args = dict(width=official.get("diffloss_w", 1024), depth=official.get("diffloss_d", 3),
                     num_sampling_steps=int(official.get("num_sampling_steps", 100)))
    head_args.update(head_overrides)
    head = DiffusionHead(geo["token_dim"], cfg.decoder_dim, **head_args)
    return MAR(transformer, head)


def convert_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official MAR state_dict -> sandbox ``MAR`` state_dict (``diffloss.*`` -> ``head.*``, rest -> ``transformer.*``)."""
    out = {}
    for name, value in official.items():
        if name.startswith("diffloss."):
            out["head." + name[len("diffloss."):]] = value
        else:
            out["transformer." + name] = value
    return out


def to_official_state_dict(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``convert_state_dict``."""
    out = {}
    for name, value in ours.items():
        if name.startswith("head."):
            out["diffloss." + name[len("head."):]] = value
        elif name.startswith("transformer."):
            out[name[len("transformer."):]] = value
    return out
