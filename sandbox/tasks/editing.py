"""Editing with a trained model, no retraining: known tokens come from an image, the sampling loop generates the rest.

A masked generative model conditions each step on whatever is known, so it can start from an image's tokens
instead of from nothing (MaskGIT sec. 4.3; VAR's zero-shot in-/out-painting and class-conditional
editing). The images are encoded with the run's tokenizer (the posterior mean: the tokens an image has, not a
draw), a pixel mask becomes the known sequence positions (``masks.known_positions``: a token is known only
when every pixel it covers is), and ``sample_tokens(start=(tokens, known))`` predicts the others, each once,
in the ordering's plan over them. The tasks differ only in what is known and under which label:

    inpainting                 a region to regenerate given the rest (``--mask bottom``, ``box:...``, a mask image)
    outpainting                a region to keep, generated around (``--mask invert:center:0.25``)
    class-guided editing       a region regenerated under another class (``--labels``)
    variations                 a random fraction of the tokens regenerated (``--mask random:0.5``)
    super-resolution           a low-resolution image fixes the coarse positions of a coarse-to-fine ordering
                               (``Ordering.coarse_known``), the finer ones are generated (``--low_res``)

Batches are seeded as ``sandbox sample``'s (chunk k of ``batch_size`` rows draws from generator (seed, k)), so an
edit with nothing known is exactly ``sandbox sample`` with the same seed, labels and batch size.

References:
    MaskGIT: Chang et al., CVPR 2022, sec. 4.3 (inpainting, outpainting, class-conditional editing).
    VAR: Tian et al., NeurIPS 2024 (zero-shot task generalisation: in-/out-painting, class-conditional editing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.errors import UserError
from sandbox.tasks.masks import composite, known_positions, token_known, token_pixels

GREY = 0.0  # the middle of [-1, 1]: what pictures paint where a token is to be generated (as animations do)
NO_LABEL = -1  # the label an .npz output stores for an image generated without a class (the null condition)


@dataclass
class EditStart:
    """What a generation starts from: the tokens and which of them are known, and pictures of it."""

    tokens: Tensor  # (N, L, C) the encoded images (values at unknown positions are never read)
    known: Tensor  # (N, L) bool
    inputs: Tensor  # (N, 3, H, W) in [-1, 1]: the images as given (a low-resolution one upsampled by repetition)
    given: Tensor  # (N, 3, H, W): what the model is given, the region to generate grey
    generate: Tensor | None = None  # (H, W) bool: the pixel mask (None for super-resolution)
    notes: list[str] = field(default_factory=list)  # what was done to fit the run (resizes), printed as notes

    @property
    def nothing_to_generate(self) -> bool:
        return bool(self.known.all())


# --------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------
def read_images(path: str | Path, what: str = "--images") -> tuple[list[np.ndarray], np.ndarray | None]:
    """An image file, a folder of images or an .npz -> (uint8 (n, H, W, 3) batches, one size each; the .npz's
    labels (N,) or None)."""
    from PIL import Image, UnidentifiedImageError

    from sandbox.images.io import IMAGE_EXTENSIONS, read_image_set

    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            with Image.open(p) as img:
                return [np.array(img.convert("RGB"))[None]], None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{what} {p}: cannot read it as an image ({e})") from None
    if p.is_file() and p.suffix != ".npz":
        raise UserError(f"{what} {p}: give an image ({', '.join(IMAGE_EXTENSIONS)}), a folder of images or an .npz")
    try:
        found = read_image_set(p)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    if found.count == 0:
        raise UserError(f"{what} {p} holds no images")
    return [np.array(b) for b in found.batches(256)], found.labels  # writable copies of the read-only buffers


def fit_images(batches: list[np.ndarray], size: int, what: str = "--images") -> tuple[Tensor, str]:
    """uint8 batches -> (N, 3, size, size) in [-1, 1], and a note when some had another size: those are resized
    with bicubic interpolation (antialiased when shrinking; another aspect ratio is stretched, never cropped, so
    a mask drawn on the original still covers the same content)."""
    from sandbox.images.io import from_uint8

    out, other = [], {}
    for b in batches:
        x = from_uint8(b)  # (n, 3, h, w)
        if tuple(x.shape[-2:]) != (size, size):
            other[f"{x.shape[-1]}x{x.shape[-2]}"] = other.get(f"{x.shape[-1]}x{x.shape[-2]}", 0) + len(x)
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        out.append(x)
    note = ""
    if other:
        sizes = ", ".join(f"{n} of {k} px" for k, n in other.items())
        note = (f"{what}: {sizes} resized to the run's {size}x{size} with bicubic interpolation (antialiased when "
                "shrinking; another aspect ratio is stretched)")
    return torch.cat(out), note


def _device(module) -> torch.device:
    """Where a module's weights are (the CPU for one without any, e.g. pixel tokens)."""
    return next(module.parameters(), torch.empty(0)).device


def encode(exp, images: Tensor) -> Tensor:
    """Images (N, 3, H, W) -> token sequences (N, L, C): the tokenizer's posterior mean (the image's own tokens)."""
    with torch.no_grad():
        latent = exp.tokenizer.encode(images.to(_device(exp.tokenizer)), sample=False)  # (N, c, h', w')
        return exp.ordering.to_sequence(exp.tokenizer.to_tokens(latent)).float()  # (N, L, C)


def decode(exp, tokens: Tensor) -> Tensor:
    """Token sequences (N, L, C) -> images (N, 3, H, W) on the CPU, as the sampling core decodes them."""
    with torch.no_grad():
        grid = exp.ordering.to_grid(tokens.to(_device(exp.tokenizer)))  # (N, C, h, w)
        return exp.tokenizer.decode(exp.tokenizer.from_tokens(grid)).float().cpu()


# --------------------------------------------------------------------------------------
# What is known
# --------------------------------------------------------------------------------------
def mask_start(exp, images: Tensor, generate: Tensor) -> EditStart:
    """Images (N, 3, H, W) at the run's size and a pixel mask (H, W) bool, True = generate -> the start: the
    images' tokens, known where every pixel of a token is outside the mask."""
    N = images.shape[0]
    tokens = encode(exp, images)  # (N, L, C)
    known = known_positions(generate, exp.tokenizer, exp.ordering, N).to(tokens.device)  # (N, L)
    kept = token_pixels(token_known(generate, exp.tokenizer.token_stride), exp.tokenizer.token_stride)  # (H, W)
    given = torch.where(kept.to(images.device), images, torch.full_like(images, GREY))  # the mask grown to tokens
    return EditStart(tokens, known, images, given, generate)


def low_res_start(exp, low: Tensor) -> EditStart:
    """Low-resolution images (N, 3, r, r') -> the start of super-resolution: the coarse positions they fix.

    A coarse scale of h' x w' tokens averages whole blocks of the latent grid, so its tokens hold about one
    latent pixel's worth each: it is the image seen at (h' x s) x (w' x s) px, s = the tokenizer's stride (1 for
    pixel tokens). The low-resolution image is repeated up to the run's size (nearest: each pixel fills its
    block, whose mean it then is) and encoded; the ordering's ``coarse_known`` names the positions it fixes.
    A size that matches no coarse scale is one error line naming the sizes that do.
    """
    from sandbox.images.animation import preview_images

    s, size = exp.tokenizer.stride, exp.image_size
    coarse = exp.ordering.coarse_known()
    px = {(a * s, b * s): fixed for (a, b), fixed in coarse.items()}
    rows, cols = low.shape[-2:]
    name = type(exp.ordering).__name__
    if not coarse:
        raise UserError(f"--low_res needs an ordering with coarse scales (a coarse-to-fine pyramid); this run's "
                        f"{name} has none (its coarse_known() is empty)")
    if (rows, cols) not in px:
        sizes = ", ".join(f"{b}x{a}" for a, b in px)
        raise UserError(f"--low_res images are {cols}x{rows} px, which match no coarse scale of this run's {name}; "
                        f"give {sizes} px (its coarse scales {', '.join(f'{b}x{a}' for a, b in coarse)} tokens x "
                        f"the tokenizer's stride {s}; the run's images are {size}x{size})")
    inputs = low.repeat_interleave(size // rows, dim=-2).repeat_interleave(size // cols, dim=-1)  # (N, 3, H, W)
    tokens = encode(exp, inputs)  # (N, L, C)
    known = px[(rows, cols)].to(tokens.device).expand(low.shape[0], -1).clone()  # (N, L)
    given = preview_images(exp, tokens, known).cpu()  # the fixed scales as the ordering previews them
    return EditStart(tokens, known, inputs, given)


def check_labels(labels: Tensor, num_classes: int, source: str) -> Tensor:
    """Class labels (N,) inside the model's classes, else one error line naming where they came from."""
    bad = sorted({int(c) for c in labels.tolist() if not 0 <= int(c) < num_classes})
    if bad:
        raise UserError(f"{source}: labels {bad} outside the model's classes 0..{num_classes - 1}")
    return labels.long()


# --------------------------------------------------------------------------------------
# Generating the rest
# --------------------------------------------------------------------------------------
def edit_tokens(exp, model, start: EditStart, labels: Tensor | None, *, batch_size: int, seed: int,
                progress: bool = False, on_step=None, on_start=None, **sampling) -> Tensor:
    """The start's unknown positions sampled, its known ones kept -> token sequences (N, L, C).

    Chunk k of ``batch_size`` rows draws from generator (seed, k), as ``sandbox sample`` does; nothing known is
    plain sampling (the same images as ``sandbox sample``). ``on_start(tokens, known)`` sees the first chunk
    before its first step (an animation's first frame); ``sampling``: num_iter, cfg, cfg_schedule, temperature,
    autocast_dtype.
    """
    from sandbox.core.sampling import sample_tokens
    from sandbox.eval.samples import chunk_generator

    device = _device(model)
    N, C = start.tokens.shape[0], start.tokens.shape[-1]
    out = []
    for k, rows in enumerate(torch.arange(N).split(batch_size)):
        known = start.known[rows]
        begin = (start.tokens[rows], known) if bool(known.any()) else None  # nothing known: the plain plan
        if k == 0 and on_start is not None and begin is not None:
            on_start(start.tokens[rows].to(device), known.to(device))
        lab = None if labels is None else labels[rows]
        out.append(sample_tokens(model, exp.ordering, C, lab, num_images=len(rows), generator=chunk_generator(
            seed, k, device), progress=progress, on_step=on_step, start=begin, **sampling).cpu())
    return torch.cat(out)  # (N, L, C)


def edit_images(exp, model, start: EditStart, labels: Tensor | None, paste: bool = False, **kwargs) -> Tensor:
    """The edited images (N, 3, H, W) in [-1, 1]: nothing to generate returns the inputs as given; ``paste`` puts
    the input's pixels back outside the pixel mask (``masks.composite``). ``kwargs``: those of ``edit_tokens``."""
    if start.nothing_to_generate:
        return start.inputs.clone()
    images = decode(exp, edit_tokens(exp, model, start, labels, **kwargs))  # (N, 3, H, W)
    if paste and start.generate is not None:
        images = composite(start.inputs.cpu(), images, start.generate)
    return images
