"""Interoperability with the official implementation (github.com/LTH14/mar): configs and state dicts.

The sandbox keeps the official parameter names inside ``transformer`` and
``head`` (``diffloss`` in the official code), so conversion is a prefix rename.

Released checkpoints (``checkpoint-last.pth``: model, model_ema, args as an
``argparse.Namespace``) become sandbox run directories with ``import_official``.

References:
    MAR official models/mar.py (MAR constructor arguments, mar_base/large/huge), models/diffloss.py,
    main_mar.py (training arguments, checkpoint contents), README.md (released models, evaluation settings).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from sandbox.core.condition import ClassCondition
from sandbox.core.model import MAR
from sandbox.core.transformer import MARBackbone, MARConfig
from sandbox.errors import UserError
from sandbox.run.checkpoints import load_checkpoint

# official MAR(...) keyword -> MARConfig field
_CONFIG_MAP = {
    "encoder_embed_dim": "encoder_dim", "encoder_depth": "encoder_depth", "encoder_num_heads": "encoder_heads",
    "decoder_embed_dim": "decoder_dim", "decoder_depth": "decoder_depth", "decoder_num_heads": "decoder_heads",
    "buffer_size": "buffer_size", "label_drop_prob": "label_drop_prob", "attn_dropout": "attn_dropout",
    "proj_dropout": "proj_dropout", "diffusion_batch_mul": "head_batch_mul", "mlp_ratio": "mlp_ratio",
}


# The released model sizes: the official factories mar_base / mar_large / mar_huge (models/mar.py) with
# main_mar.py's ImageNet 256 settings (KL-16 latents: 16 x 16 tokens of 16 channels) and the paper's heads
# (MAR sec. 5.1 / Table: DiffLoss MLP 6 x 1024, 8 x 1280, 12 x 1536; 208M, 479M, 943M parameters).
_IMAGENET256 = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=1000, buffer_size=64,
                    mask_ratio_min=0.7, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
                    num_sampling_steps="100", diffusion_batch_mul=4)
PRESETS = {
    "mar_base": dict(_IMAGENET256, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024),
    "mar_large": dict(_IMAGENET256, encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                      decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, diffloss_d=8, diffloss_w=1280),
    "mar_huge": dict(_IMAGENET256, encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                     decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536),
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
    from sandbox.plugins.heads.diffusion import DiffusionHead

    geo = geometry(official)
    cfg = mar_config(official, norm_eps)
    backbone = MARBackbone(cfg, geo["seq_len"], geo["token_dim"])
    condition = ClassCondition(cfg.encoder_dim, geo["num_classes"])
    head_args = dict(width=official.get("diffloss_w", 1024), depth=official.get("diffloss_d", 3),
                     num_sampling_steps=int(official.get("num_sampling_steps", 100)))
    head_args.update(head_overrides)
    head = DiffusionHead(geo["token_dim"], cfg.decoder_dim, **head_args)
    return MAR(condition, backbone, head, cfg)


# official parameter names -> ours: the head is `diffloss`, the class condition's two parameters sit in the
# official MAR itself, the rest is the backbone
def convert_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official MAR state_dict -> sandbox ``MAR`` state_dict (``diffloss.*`` -> ``head.*``, ``class_emb`` and
    ``fake_latent`` -> ``condition.*``, the rest -> ``backbone.*``)."""
    out = {}
    for name, value in official.items():
        if name.startswith("diffloss."):
            out["head." + name[len("diffloss."):]] = value
        elif name.startswith(("class_emb.", "fake_latent")):
            out["condition." + name] = value
        else:
            out["backbone." + name] = value
    return out


def to_official_state_dict(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``convert_state_dict``."""
    out = {}
    for name, value in ours.items():
        for prefix, official in (("head.", "diffloss."), ("condition.", ""), ("backbone.", "")):
            if name.startswith(prefix):
                out[official + name[len(prefix):]] = value
    return out


# --------------------------------------------------------------------------------------
# Released checkpoints (checkpoint-last.pth) -> a sandbox run directory
# --------------------------------------------------------------------------------------
# official models/mar.py factories: (width, blocks per encoder/decoder, heads); all build LayerNorm(eps=1e-6)
FACTORIES = {"mar_base": (768, 12, 12), "mar_large": (1024, 16, 16), "mar_huge": (1280, 20, 16)}
# the paper's table (official README evaluation commands): cfg with the linear schedule, 256 iterations,
# 100 diffusion steps, temperature 1.0 -> FID 2.31 / 1.78 / 1.55
PAPER_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
IMAGENET_TRAIN_IMAGES = 1_281_167  # epochs -> steps for the recipe's schedule (the official counts epochs)
# official main_mar.py argparse defaults, for checkpoints whose args lack a field
_ARG_DEFAULTS = {
    "img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16, "class_num": 1000,
    "label_drop_prob": 0.1, "attn_dropout": 0.1, "proj_dropout": 0.1, "mask_ratio_min": 0.7,
    "num_sampling_steps": "100", "diffusion_batch_mul": 1, "num_iter": 64, "cfg": 1.0, "cfg_schedule": "linear",
    "temperature": 1.0, "batch_size": 16, "world_size": 1, "epochs": 400, "warmup_epochs": 100, "blr": 1e-4,
    "min_lr": 0.0, "lr_schedule": "constant", "weight_decay": 0.02, "grad_clip": 3.0, "ema_rate": 0.9999,
    "data_path": "./data/imagenet", "seed": 1,
}


def load_official_checkpoint(path: str | Path) -> dict:
    """Read a released ``checkpoint-last.pth`` safely: tensors, containers and ``argparse.Namespace`` only.

    The official checkpoints pickle their training arguments as an ``argparse.Namespace``; that one class is
    allowlisted for ``weights_only=True`` loading, so nothing else in the file can run code. Memory-mapped, so
    a multi-GB file (optimizer state included) is not read into RAM just to take its weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"official checkpoint not found: {path}; download checkpoint-last.pth of MAR-B/L/H "
                        "(links in the official README, github.com/LTH14/mar) and give its path")
    ckpt = load_checkpoint(path, safe_globals=[argparse.Namespace], mmap=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("args"), argparse.Namespace):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not an official MAR checkpoint (expected model, model_ema and args; found {keys})")
    return ckpt


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def official_architecture(state: dict[str, Tensor], args: dict) -> dict:
    """Official constructor arguments of a checkpoint: sizes from its tensor shapes, heads from ``args.model``.

    Head counts are not in any shape: they come from the factory named by ``args.model`` (mar_base/large/huge),
    or from ``encoder_num_heads`` / ``decoder_num_heads`` in ``args`` (a custom ``MAR(...)``).
    """
    try:
        arch = {
            "encoder_embed_dim": state["z_proj.weight"].shape[0], "vae_token_dim": state["z_proj.weight"].shape[1],
            "decoder_embed_dim": state["decoder_embed.weight"].shape[0],
            "encoder_depth": _count_blocks(state, "encoder_blocks."),
            "decoder_depth": _count_blocks(state, "decoder_blocks."),
            "mlp_ratio": state["encoder_blocks.0.mlp.fc1.weight"].shape[0] / state["z_proj.weight"].shape[0],
            "seq_len": state["diffusion_pos_embed_learned"].shape[1],
            "buffer_size": state["encoder_pos_embed_learned"].shape[1] - state["diffusion_pos_embed_learned"].shape[1],
            "class_num": state["class_emb.weight"].shape[0],
            "diffloss_w": state["diffloss.net.input_proj.weight"].shape[0],
            "diffloss_d": _count_blocks(state, "diffloss.net.res_blocks."),
        }
    except KeyError as e:
        raise UserError(f"the checkpoint's model has no {e.args[0]}: not an official MAR state_dict") from e
    name = args.get("model")
    if name in FACTORIES:
        width, depth, heads = FACTORIES[name]
        if (arch["encoder_embed_dim"], arch["encoder_depth"]) != (width, depth):
            raise UserError(f"args.model is {name} (width {width}, depth {depth}) but the weights have width "
                            f"{arch['encoder_embed_dim']} and depth {arch['encoder_depth']}")
        arch.update(encoder_num_heads=heads, decoder_num_heads=heads)
    for key in ("encoder_num_heads", "decoder_num_heads"):
        if key in args:
            arch[key] = args[key]
        if key not in arch:
            raise UserError(f"args.model {name!r} is not one of {', '.join(FACTORIES)} and args has no {key}: "
                            "cannot tell the number of attention heads")
    arch["norm_eps"] = args.get("norm_eps", 1e-6)  # the released factories' LayerNorm eps
    return arch


def import_official(checkpoint: str | Path, run_dir: str | Path, vae: str | None = None) -> dict:
    """Write a sandbox run directory (recipe.yaml + checkpoints/checkpoint-last.pt) from a released checkpoint."""
    from sandbox import __version__
    from sandbox.config.build import build
    from sandbox.config.recipe import parse_recipe, recipe_dict
    from sandbox.run.optim import param_groups
    from sandbox.run.resume import rng_state
    from sandbox.run.rundir import RunDir

    run = RunDir(run_dir)
    if run.exists() or run.last.exists():
        raise UserError(f"{run.root} already holds a run; choose a new --run_dir")
    ckpt = load_official_checkpoint(checkpoint)
    args = {**_ARG_DEFAULTS, **vars(ckpt["args"])}
    arch = official_architecture(ckpt["model"], args)
    vae, base_channels = _kl16_for(args, arch, vae)
    recipe, steps, steps_per_epoch = _recipe_of(args, arch, vae, base_channels)
    cfg = parse_recipe(recipe)
    meta = {"image_size": int(args["img_size"]), "num_classes": int(arch["class_num"])}
    exp = build(cfg, meta=meta)
    model_state = convert_state_dict(ckpt["model"])
    ema_state = convert_state_dict(ckpt.get("model_ema", ckpt["model"]))
    for label, state in (("model", model_state), ("model_ema", ema_state)):
        try:
            exp.model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"the checkpoint's {label} does not fit the architecture read from it: "
                            f"{str(e).splitlines()[0]}") from e
    epoch = int(ckpt["epoch"]) if "epoch" in ckpt else int(args["epochs"]) - 1
    step = min(steps, (epoch + 1) * steps_per_epoch)
    # a fresh optimizer and RNG state, as at step 0 of a run: `sandbox train` on this directory fine-tunes it
    optimizer = torch.optim.AdamW(param_groups(exp.model, float(args["weight_decay"])), lr=0.0, betas=(0.9, 0.95))
    run.create()
    stored = recipe_dict(cfg)
    run.write_recipe(stored)
    run.save({
        "model": {k: v.contiguous() for k, v in model_state.items()},
        "ema": {k: v.contiguous() for k, v in ema_state.items()},
        "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(torch.Generator().manual_seed(cfg.seed)),
        "recipe": stored, "meta": meta, "version": __version__,
        "source": {"file": str(Path(checkpoint).resolve()), "epoch": epoch, "model": str(args.get("model"))},
    }, step, keep=0)
    return {"run_dir": str(run.root), "model": args.get("model"), "step": step, "epoch": epoch,
            "params": sum(p.numel() for p in exp.model.parameters())}


def _kl16_for(args: dict, arch: dict, vae: str | None) -> tuple[str, int]:
    """The KL-16 weights a released checkpoint samples with (absolute path) and their base channels; checks
    that the checkpoint is a KL-16 one whose token geometry agrees with its args."""
    from sandbox.plugins.tokenizers.kl16 import DEFAULT_CHECKPOINT, load_kl16_state_dict

    if (args["vae_stride"], args["vae_embed_dim"]) != (16, 16):
        raise UserError(f"only KL-16 checkpoints are supported (vae_stride 16, vae_embed_dim 16); this one has "
                        f"vae_stride {args['vae_stride']}, vae_embed_dim {args['vae_embed_dim']}")
    geo = geometry(args)
    if (geo["seq_len"], geo["token_dim"]) != (arch["seq_len"], arch["vae_token_dim"]):
        raise UserError(f"args say {geo['seq_len']} tokens of {geo['token_dim']} dims (img_size {args['img_size']}, "
                        f"patch_size {args['patch_size']}) but the weights hold {arch['seq_len']} of "
                        f"{arch['vae_token_dim']}")
    vae = str(Path(vae or DEFAULT_CHECKPOINT).expanduser().resolve())  # absolute: sampling may run elsewhere
    if not Path(vae).is_file():
        raise UserError(f"KL-16 weights not found: {vae}; put the official kl16.ckpt (github.com/LTH14/mar, "
                        "util/download.py) there or give its path with --vae")
    return vae, int(load_kl16_state_dict(vae)["encoder.conv_in.weight"].shape[0])  # 128 for the real KL-16


def _recipe_of(args: dict, arch: dict, vae: str, base_channels: int) -> tuple[dict, int, int]:
    """The sandbox recipe of a released checkpoint's args and architecture -> (recipe, steps, steps per epoch)."""
    name = args.get("model")
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // (int(args["batch_size"]) * int(args["world_size"])))
    steps = int(args["epochs"]) * steps_per_epoch
    paper = name in PAPER_CFG  # the released models: sample with the paper's settings by default
    recipe = {
        "seed": int(args["seed"]),
        "data": {"class_path": "ImageFolderDataset",
                 "init_args": {"root": str(Path(args["data_path"]) / "train"), "image_size": int(args["img_size"])}},
        "tokenizer": {"class_path": "KL16Tokenizer", "init_args": {
            "checkpoint": vae, "patch_size": int(args["patch_size"]), "base_channels": base_channels}},
        "ordering": {"class_path": "RandomOrdering", "init_args": {"mask_ratio_min": float(args["mask_ratio_min"])}},
        "head": {"class_path": "DiffusionHead", "init_args": {
            "width": int(arch["diffloss_w"]), "depth": int(arch["diffloss_d"]),
            "num_sampling_steps": int(args["num_sampling_steps"])}},
        "model": {
            "encoder_dim": int(arch["encoder_embed_dim"]), "encoder_depth": arch["encoder_depth"],
            "encoder_heads": int(arch["encoder_num_heads"]), "decoder_dim": int(arch["decoder_embed_dim"]),
            "decoder_depth": arch["decoder_depth"], "decoder_heads": int(arch["decoder_num_heads"]),
            "mlp_ratio": float(arch["mlp_ratio"]), "buffer_size": int(arch["buffer_size"]),
            "label_drop_prob": float(args["label_drop_prob"]), "attn_dropout": float(args["attn_dropout"]),
            "proj_dropout": float(args["proj_dropout"]), "norm_eps": float(arch["norm_eps"]),
            "head_batch_mul": int(args["diffusion_batch_mul"])},
        "train": {
            "steps": steps, "batch_size": int(args["batch_size"]), "blr": float(args["blr"]),
            "lr_schedule": args["lr_schedule"], "warmup_steps": int(args["warmup_epochs"]) * steps_per_epoch,
            "min_lr": float(args["min_lr"]), "weight_decay": float(args["weight_decay"]),
            "grad_clip": float(args["grad_clip"]), "ema_decay": float(args["ema_rate"]),
            "ema_warmup": False, "ckpt_every": 5 * steps_per_epoch},  # official: no EMA warm-up; save every 5 epochs
        "sample": {
            "num_iter": 256 if paper else int(args["num_iter"]),
            "cfg": PAPER_CFG[name] if paper else float(args["cfg"]),
            "cfg_schedule": "linear" if paper else args["cfg_schedule"],
            "temperature": 1.0 if paper else float(args["temperature"])},
    }
    return recipe, steps, steps_per_epoch
