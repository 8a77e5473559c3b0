"""``sandbox sample --run_dir DIR --num_images N --out FILE.png|FILE.npz [sampling options]``."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.errors import UserError

NAME = "sample"
HELP = "Generate images from a trained run (.png grid or .npz images + labels)."
ORDER = 20


LABELS_HELP = ("Class of each image, cycled, as a list: --labels '[3, 7]'; default: class-balanced 0,1,...,K-1,0,...")


def add_sampling_arguments(p: ArgumentParser, run_dir_required: bool = True, num_images: bool = True,
                           labels_help: str = LABELS_HELP) -> None:
    """Options shared by every command that samples from a run (sample, eval, edit, ...); ``num_images``: offer
    --num_images (edit takes the count from its input images)."""
    p.add_argument("--config", action=ActionConfigFile)
    if run_dir_required:
        p.add_argument("--run_dir", type=str, required=True, help="A run directory written by `sandbox train`.")
    else:
        p.add_argument("--run_dir", type=str | None, default=None, help="A run directory written by `sandbox train`.")
    if num_images:
        p.add_argument("--num_images", type=int, default=64, help="How many images.")
    p.add_argument("--labels", type=list[int] | None, default=None, help=labels_help)
    p.add_argument("--num_iter", type=int | None, default=None, help="Sampling steps (default: the recipe's).")
    p.add_argument("--cfg", type=float | None, default=None, help="Guidance scale (default: the recipe's).")
    p.add_argument("--cfg_schedule", type=Optional[Literal["linear", "constant"]], default=None,
                   help="linear or constant (default: the recipe's).")
    p.add_argument("--temperature", type=float | None, default=None, help="Head temperature (default: the recipe's).")
    p.add_argument("--head_args", type=dict | None, default=None,
                   help="Override the head's init_args for sampling, e.g. '{sampler: dpm++, num_sampling_steps: 20}' "
                        "(see `sandbox plugins`); arguments that change the head's weights do not fit the checkpoint.")
    p.add_argument("--head_steps", type=Optional[Union[int, str, list[int]]], default=None,
                   help="The head's own steps at each plan step (DiSA's annealing): a count, a share of the head's "
                        "own count (50%), linear:START:END or cosine:START:END (linear:50:5, cosine:100%:10%), "
                        "or a list of counts (default: the recipe's; 100% is the head's own count everywhere).")
    p.add_argument("--cache", type=str | None, default=None,
                   help="Reuse across plan steps: off, exact (the same samples within float rounding) or "
                        "approx:N[:W] (LazyMAR's caches, a full step every N) (default: the recipe's, else off).")
    p.add_argument("--fast", type=bool, default=False,
                   help="Apply the quality-keeping frontier point of the quality-speed map (it prints the options "
                        "it sets); options given on the command line win (docs/performance.md#fast-sampling).")
    p.add_argument("--seed", type=int, default=0, help="Fixes the samples.")
    p.add_argument("--batch_size", type=int | None, default=None, help="Images per batch (default: the recipe's).")
    p.add_argument("--ema", type=bool, default=True, help="Use the EMA weights.")
    p.add_argument("--compile", type=bool, default=False,
                   help="torch.compile the head's sampling step (compiles once, then faster; samples equal the "
                        "eager ones within float rounding).")
    p.add_argument("--fast_paths", type=bool, default=True,
                   help="The speed paths of sandbox.fast (false: the plain PyTorch model; the same samples within "
                        "float rounding).")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
    p.add_argument("--progress", type=bool, default=True, help="Show a progress bar.")


SAMPLING = ("num_iter", "cfg", "cfg_schedule", "temperature", "batch_size",  # options over the recipe's sample:
            "head_steps", "cache")


def check_sampling_arguments(cfg: Namespace) -> None:
    """The options of a sampling command checked before the run is loaded, so a bad one costs nothing and
    writes nothing (a value of 0 is an error, never "the recipe's")."""
    from sandbox.config.schema import check_sampling
    from sandbox.run.device import resolve_device

    try:
        check_sampling({name: cfg.get(name) for name in SAMPLING if cfg.get(name) is not None}, "--")
    except ValueError as e:
        raise UserError(str(e)) from None
    resolve_device(cfg.device)


def sampling_options(cfg: Namespace, loaded) -> dict:
    """The sampling settings of a command (``add_sampling_arguments``) over the recipe's defaults of the
    loaded run: num_iter, cfg, cfg_schedule, temperature, batch_size, head_steps and cache, each checked;
    with ``--fast true``, the frontier point where the command line gave nothing (``fast_options``)."""
    from sandbox.core.sampling import check_head_steps
    from sandbox.fast.sampling import fast_options
    from sandbox.fast.step_cache import check_cache

    given = {name: cfg.get(name) for name in SAMPLING}
    if cfg.get("fast"):
        given.update(fast_options(given, loaded.model))
    sc = loaded.sampling(given, prefix="--")
    check_head_steps(loaded.model.head, sc.head_steps)  # before any sampling: one line, nothing written
    check_cache(sc.cache, loaded.model.backbone)
    return {name: getattr(sc, name) for name in SAMPLING}


def load(cfg: Namespace):
    """The run a sampling command names, loaded with its options (``sandbox.run.loading.load_run``)."""
    import sys

    from sandbox.run.loading import load_run

    loaded = load_run(cfg.run_dir, use_ema=cfg.ema, device=cfg.device, head_args=cfg.head_args, compile=cfg.compile,
                      fast_paths=cfg.fast_paths)
    if cfg.ema and not loaded.ema:  # e.g. an imported checkpoint: say so, the output then reads "raw weights"
        print(f"note: the checkpoint of {loaded.root} holds no EMA weights; sampling its raw weights",
              file=sys.stderr)
    return loaded


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p)
    p.add_argument("--out", type=str, default="samples.png",
                   help=".png writes a grid (one row per class, or one captioned row per prompt); .npz writes "
                        "images + labels (-1: asked by a prompt; the prompts are in its meta).")
    p.add_argument("--prompt", type=str | None, default=None,
                   help="A text-conditioned run: generate every image from this prompt.")
    p.add_argument("--prompts", type=str | None, default=None,
                   help="A text-conditioned run: a file of prompts, one a line; image i gets prompt i % P "
                        "(default for a text run: the dataset's prompts for balanced classes).")
    p.add_argument("--animate", type=str | None, default=None,
                   help="Also write FILE.gif: the first batch being generated, one frame per sampling step.")
    return p


def sample_from_run(cfg: Namespace, on_step=None):
    """Load a run and generate ``cfg.num_images`` images -> (the loaded run, images, the conditioning data: class
    labels (N,), or a dict of fields such as {"text": prompts}).

    ``on_step(exp, labels)`` may return a per-step callback for the sampling core (e.g. an animation recorder);
    ``labels`` are the grid's rows: the classes, or each image's prompt index.
    Under ``torchrun --nproc_per_node N -m sandbox sample|eval ...`` the ranks split the images
    (each batch seeded by its index: the same images for any N); rank 0 receives them all and
    the other ranks get ``images=None``.
    """
    from sandbox.run import distributed

    with distributed.session(cfg.device):
        return _sample_from_run(cfg, on_step)


def read_prompts(cfg: Namespace) -> list[str] | None:
    """The prompts of --prompt / --prompts FILE (one a line, blank lines skipped), or None; checked before the run
    is loaded."""
    given = [name for name in ("prompt", "prompts", "labels") if cfg.get(name)]
    if len(given) > 1:
        raise UserError(f"give one of --{given[0]} and --{given[1]}")
    if cfg.get("prompt") is not None:
        return [cfg.prompt]
    if cfg.get("prompts") is None:
        return None
    path = Path(cfg.prompts).expanduser()
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path}: {e}") from None
    if not prompts:
        raise UserError(f"the prompts file {path} holds no prompt (one a line)")
    return prompts


def conditioning_data(cfg: Namespace, loaded, prompts: list[str] | None):
    """What asks for ``cfg.num_images`` images: the prompts (cycled), the --labels (cycled), or balanced classes
    (asked the way the run's condition reads them: ``conditioning_for``); one error line for a prompt to a run
    that does not read text, or labels to one that does not read labels."""
    import torch

    from sandbox.eval.samples import balanced_labels, conditioning_for

    exp, condition, n = loaded.exp, loaded.model.condition, cfg.num_images
    what = f"run {loaded.root} is conditioned on {condition.field!r} ({type(condition).__name__})"
    if prompts is not None:
        if condition.field != "text":
            raise UserError(f"{what}, not on text: --prompt / --prompts do not apply"
                            + ("; use --labels" if condition.field == "label" else ""))
        return {"text": [prompts[i % len(prompts)] for i in range(n)]}
    if cfg.labels:
        if condition.field != "label":
            raise UserError(f"{what}, not on class labels: --labels does not apply"
                            + ("; use --prompt TEXT or --prompts FILE" if condition.field == "text" else ""))
        bad = [c for c in cfg.labels if not 0 <= c < exp.num_classes]
        if bad:
            raise UserError(f"labels {bad} outside the model's classes 0..{exp.num_classes - 1}")
        return torch.tensor(cfg.labels)[torch.arange(n) % len(cfg.labels)]
    labels = balanced_labels(n, exp.num_classes)
    return labels if condition.field == "label" else conditioning_for(condition, loaded.dataset(), labels)


def _sample_from_run(cfg: Namespace, on_step=None):
    from sandbox.eval.samples import generate_distributed
    from sandbox.fast.sampling import speed_kwargs
    from sandbox.images.grids import layout_labels
    from sandbox.run.device import autocast_dtype

    if cfg.num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {cfg.num_images}")
    check_sampling_arguments(cfg)
    prompts = read_prompts(cfg)
    loaded = load(cfg)
    exp, model = loaded.exp, loaded.model
    opts = sampling_options(cfg, loaded)
    data = conditioning_data(cfg, loaded, prompts)
    labels = layout_labels(data)  # the grid's rows (and the animation's)
    device = next(model.parameters()).device
    callback = on_step(exp, labels) if on_step is not None else None  # rank 0 samples batch 0 first: it animates
    speed = speed_kwargs(opts.pop("head_steps"), opts.pop("cache"))
    images = generate_distributed(
        exp, data, batch_size=opts.pop("batch_size"), seed=cfg.seed, model=model, **opts, **speed,
        progress=cfg.progress, autocast_dtype=autocast_dtype(loaded.train_config.precision, device), on_step=callback)
    return loaded, images, data


def _write_samples(images, data, out: Path) -> None:
    """A .png grid (one row per class; one captioned row per prompt) or an .npz of images, labels (-1 where a
    prompt alone asked) and, with prompts, the prompts in its meta."""
    import torch

    from sandbox.images.grids import save_class_grid, save_prompt_grid
    from sandbox.images.io import save_npz

    texts = data.get("text") if isinstance(data, dict) else None
    if out.suffix == ".png":
        if texts is not None:
            save_prompt_grid(images, list(texts), out)
        else:
            save_class_grid(images, data if not isinstance(data, dict) else data["label"], out)  # one row per class
        return
    labels = data if not isinstance(data, dict) else data.get("label", torch.full((len(images),), -1))
    save_npz(images, labels, out, meta={"prompts": list(texts)} if texts is not None else None)


def run(cfg: Namespace) -> None:
    from sandbox.images.grids import save_gif

    out = Path(cfg.out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (grid) or .npz (images + labels), got {out}")
    if cfg.animate is not None and Path(cfg.animate).suffix.lower() != ".gif":
        raise UserError(f"--animate must name a .gif file, got {cfg.animate}")
    recorder = None

    def record(exp, labels):
        nonlocal recorder
        from sandbox.images.animation import FrameRecorder

        recorder = FrameRecorder(exp, labels)
        return recorder

    loaded, images, data = sample_from_run(cfg, on_step=record if cfg.animate else None)
    if images is None:  # a rank other than 0 of a multi-process run: rank 0 writes
        return
    _write_samples(images, data, out)
    print(f"wrote {cfg.num_images} images to {out} (step {loaded.step}, {'EMA' if loaded.ema else 'raw'} weights)")
    if recorder is not None:
        save_gif(recorder.captioned(), cfg.animate)
        print(f"wrote {cfg.animate}: {len(recorder.frames)} frames (one per sampling step) "
              f"of the first batch, {recorder.count} images")
