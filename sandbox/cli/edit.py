"""``sandbox edit --run_dir DIR --images FILE|DIR|NPZ --mask SPEC|IMAGE --out FILE.png|FILE.npz``: inpainting,
outpainting, class-guided editing, variations; ``--low_res FILE|DIR|NPZ``: super-resolution (sandbox/tasks/)."""
from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from sandbox.cli.sample import add_sampling_arguments, check_sampling_arguments, load, sampling_options
from sandbox.errors import UserError
from sandbox.fast.sampling import speed_kwargs

NAME = "edit"
HELP = "Edit images with a trained run: inpaint, outpaint, class-guided edits, variations, super-resolution."
ORDER = 21

LABELS_HELP = ("Class to generate under, per image, cycled: --labels '[3, 7]' (class-guided editing); default: the "
               ".npz's labels, else none (the null condition, as classifier-free guidance trains it).")


def parser() -> ArgumentParser:
    from sandbox.tasks.masks import FORMS

    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p, num_images=False, labels_help=LABELS_HELP)
    p.add_argument("--images", type=str | None, default=None,
                   help="The images to edit: an image file, a folder of images or an .npz (images + labels); "
                        "another size than the run's is resized (bicubic, antialiased).")
    p.add_argument("--mask", type=str | None, default=None,
                   help=f"What to generate (the rest is kept): {FORMS}. One mask for every image.")
    p.add_argument("--low_res", type=str | None, default=None,
                   help="Super-resolution instead of --images/--mask: low-resolution images (file, folder or "
                        ".npz) that fix the coarse scales of a coarse-to-fine ordering; the finer ones are generated.")
    p.add_argument("--paste", type=bool, default=False,
                   help="Put the input's pixels back outside the mask (a latent tokenizer changes them a little: "
                        "its border is soft).")
    p.add_argument("--out", type=str, default="edit.png",
                   help=".png writes a grid, one row per image: input | what the model is given | result; .npz "
                        "writes the results + the labels generated under (-1: none).")
    p.add_argument("--animate", type=str | None, default=None,
                   help="Also write FILE.gif: the first batch being generated, from the known tokens on.")
    return p


def check_arguments(cfg: Namespace) -> None:
    """Everything decidable before the run is loaded: one error line, nothing written."""
    if Path(cfg.out).suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (grid) or .npz (images + labels), got {cfg.out}")
    if cfg.animate is not None and Path(cfg.animate).suffix.lower() != ".gif":
        raise UserError(f"--animate must name a .gif file, got {cfg.animate}")
    if cfg.low_res is not None:
        if cfg.images is not None or cfg.mask is not None:
            raise UserError("--low_res is the input of super-resolution (the ordering's coarse scales say what it "
                            "fixes); give it without --images and --mask")
        if cfg.paste:
            raise UserError("--paste puts the input's pixels back outside a --mask; super-resolution (--low_res) "
                            "has no full-size pixels to put back")
    elif cfg.images is None or cfg.mask is None:
        raise UserError("sandbox edit needs --images and --mask (what to generate), or --low_res "
                        "(super-resolution)")
    check_sampling_arguments(cfg)


def prepare(cfg: Namespace, exp):
    """The start of the edit (``EditStart``) and the labels to generate under (None: the null condition)."""
    import torch

    from sandbox.tasks.editing import check_labels, fit_images, low_res_start, mask_start, read_images
    from sandbox.tasks.masks import parse_mask

    source = cfg.low_res if cfg.low_res is not None else cfg.images
    batches, set_labels = read_images(source, "--low_res" if cfg.low_res is not None else "--images")
    if cfg.low_res is not None:
        sizes = {b.shape[1:3] for b in batches}
        if len(sizes) > 1:
            raise UserError(f"--low_res {source}: the images differ in size ({sorted(sizes)}); give one size")
        from sandbox.images.io import from_uint8

        start = low_res_start(exp, torch.cat([from_uint8(b) for b in batches]))
    else:
        images, note = fit_images(batches, exp.image_size)
        mask = parse_mask(cfg.mask, exp.image_size, exp.tokenizer.token_stride, torch.Generator().manual_seed(cfg.seed))
        start = mask_start(exp, images, mask.generate)
        start.notes += [n for n in (note, mask.note) if n]
    N = start.tokens.shape[0]
    if cfg.labels:
        labels = check_labels(torch.tensor(cfg.labels), exp.num_classes, "--labels")
        labels = labels[torch.arange(N) % len(labels)]
    elif set_labels is not None:
        labels = check_labels(torch.as_tensor(set_labels), exp.num_classes, f"the labels of {source}")
    else:
        labels = None
        start.notes.append(f"{source} has no labels and --labels is not given: generating without a class (the null "
                           "condition; classifier-free guidance does not apply)")
    return start, labels


def describe(cfg: Namespace, start) -> None:
    """Notes on stderr: resizes, no labels, nothing or everything to generate."""
    if start.nothing_to_generate:
        start.notes.append(f"--mask {cfg.mask!r} covers no pixel: nothing to generate; writing the input")
    elif not bool(start.known.any()):
        what = "every pixel" if start.generate is not None and bool(start.generate.all()) else "every token"
        start.notes.append(f"--mask {cfg.mask!r} covers {what}: nothing is kept, this is plain sampling")
    for note in start.notes:
        print(f"note: {note}", file=sys.stderr)


def run(cfg: Namespace) -> None:
    from sandbox.run.device import autocast_dtype
    from sandbox.tasks.editing import edit_images

    check_arguments(cfg)
    loaded = load(cfg)
    exp, model = loaded.exp, loaded.model
    opts = sampling_options(cfg, loaded)
    opts.update(speed_kwargs(opts.pop("head_steps"), opts.pop("cache")))  # the sampling core's form
    start, labels = prepare(cfg, exp)
    describe(cfg, start)
    recorder = None
    if cfg.animate is not None and not start.nothing_to_generate:
        recorder = _recorder(exp, labels, start)
    device = next(model.parameters()).device
    images = edit_images(exp, model, start, labels, paste=cfg.paste, batch_size=opts.pop("batch_size"), seed=cfg.seed,
                         progress=cfg.progress, on_step=recorder, on_start=recorder.start if recorder else None,
                         autocast_dtype=autocast_dtype(loaded.train_config.precision, device), **opts)
    write(cfg, start, images, labels)
    if cfg.animate is not None:
        _write_animation(cfg, recorder)


def _recorder(exp, labels, start):
    import torch

    from sandbox.images.animation import FrameRecorder

    return FrameRecorder(exp, labels if labels is not None else torch.zeros(len(start.tokens), dtype=torch.long))


def write(cfg: Namespace, start, images, labels) -> None:
    """The .png grid (input | given | result per row) or the .npz (results + labels, -1 for none)."""
    import torch

    from sandbox.images.grids import default_upscale, make_grid, save_png
    from sandbox.images.io import save_npz
    from sandbox.tasks.editing import NO_LABEL

    out, N = Path(cfg.out), len(images)
    if out.suffix == ".png":
        rows = torch.stack([start.inputs.cpu(), start.given.cpu(), images], dim=1).flatten(0, 1)  # (3N, 3, H, W)
        save_png(make_grid(rows, ncol=3, upscale=default_upscale(images.shape[-1])), out)
    else:
        save_npz(images, labels if labels is not None else torch.full((N,), NO_LABEL), out)
    what = "the input (nothing to generate)" if start.nothing_to_generate else "edited images"
    print(f"wrote {N} {what} to {out}")


def _write_animation(cfg: Namespace, recorder) -> None:
    from sandbox.images.grids import save_gif

    if recorder is None:
        print(f"note: nothing was generated, so no animation: {cfg.animate} not written", file=sys.stderr)
        return
    save_gif(recorder.captioned(), cfg.animate)
    print(f"wrote {cfg.animate}: {len(recorder.frames)} frames (the known tokens, then one per sampling step) of "
          f"the first batch, {recorder.count} images")
