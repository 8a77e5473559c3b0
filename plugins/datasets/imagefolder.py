"""Images in the ImageNet layout (``root/<class>/<image>``): ADM center crop, random horizontal flip.

Classes are the sorted sub-folder names and files are listed as torchvision's
``ImageFolder`` lists them (the official MAR loader), so labels and order match
the official code's; symbolic links are followed, each real directory once (a
link back up the tree would repeat a class's images or never end). Each image is resized and center-cropped to
``image_size`` as ADM does (box-halve while the short side is >= 2x the size,
then bicubic, then crop); the flip happens batch-wise in ``augment`` with the
trainer's generator. Every colour mode becomes 8-bit RGB (16-bit greyscale
is rescaled, not clipped). A file that cannot be read (corrupt, truncated, not
an image), or that is too small or an extreme strip, is skipped, counted and
reported once: training takes the next readable image in its place, and
``load`` returns None for it so ``sandbox cache`` leaves it out. A class
folder without images, or a folder without any, is an error at construction,
before a run starts.

With ``captions`` each image also has a caption, read from ``metadata.jsonl`` in the root (the Hugging Face
image-folder convention): one JSON object per line, ``{"file_name": "<path relative to the root>", "text":
"<caption>"}``. Items are then ``(image, {"label": class, "text": caption})``; the images may also lie directly
in the root (no class folders: one class). Every image needs exactly one entry and every entry an image: a
missing or extra entry, a duplicate, a line that is not such an object -- one error line naming it.

References:
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021 (ADM center crop,
    guided_diffusion/image_datasets.py center_crop_arr); MAR official util/crop.py and main_mar.py (same
    crop + RandomHorizontalFlip, images normalised to [-1, 1]); torchvision ImageFolder (layout, file order);
    Hugging Face datasets, "ImageFolder" docs (metadata.jsonl with file_name and further columns such as text).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sandbox.core.contracts import Dataset
from sandbox.errors import UserError
from sandbox.lab.latent_cache import PackedStrings

# torchvision's ImageFolder extensions, so the same files count as images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: PIL RGB image -> (size, size, 3) uint8."""
    while min(image.size) >= 2 * size:  # halve with a box filter first: cheap and alias-free for large images
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)  # a writable copy
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    ``convert("RGB")`` is right for the 8-bit modes (greyscale "L"/"1", palette "P", "CMYK", "RGBA"/"LA":
    alpha is dropped, as torchvision's loader -- and so the official MAR -- does) and 16-bit RGB PNGs open as
    8-bit "RGB" already; but it clips 16/32-bit greyscale ("I;16", "I") to 0..255, which turns a 16-bit scan
    white. Those are rescaled from 0..65535 first. Float images ("F") have no defined range: an error (skipped).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image).astype(np.float32) / 257.0  # (H, W) 0..65535 -> 0..255
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float image: no defined value range")
    return image.convert("RGB")


def list_image_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths, labels) in torchvision ImageFolder order (sorted classes, sorted walk)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, files in sorted(_walk_once(root / name)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return classes, paths, labels


METADATA = "metadata.jsonl"


def read_captions(root: Path, paths: list[str]) -> list[str]:
    """The caption of each image in ``paths`` from ``root/metadata.jsonl``; one error line for a missing file,
    a bad line, a duplicate, and images without an entry or entries without an image (naming a few of each)."""
    meta = root / METADATA
    if not meta.is_file():
        raise UserError(f"no {METADATA} in {root}: captions need one line per image, "
                        '{"file_name": "<path relative to the folder>", "text": "<caption>"}')
    captions: dict[str, str] = {}
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            name, text = _metadata_entry(meta, n, line)
            if name in captions:
                raise UserError(f"{meta}:{n}: a second entry for {name}; give each image one caption")
            captions[name] = text
    relative = [Path(p).relative_to(root).as_posix() for p in paths]
    missing = [r for r in relative if r not in captions]
    extra = sorted(set(captions) - set(relative))
    if missing or extra:
        parts = [f"{len(missing)} image(s) without an entry ({_few(missing)})"] if missing else []
        parts += [f"{len(extra)} entry(ies) naming no image in the folder ({_few(extra)})"] if extra else []
        raise UserError(f"{meta} does not match the images in {root}: {'; '.join(parts)}")
    return [captions[r] for r in relative]


def _metadata_entry(meta: Path, n: int, line: str) -> tuple[str, str]:
    """(file_name, text) of line ``n``: a JSON object with a string file_name and a string text."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{meta}:{n}: not a JSON object ({e.msg})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not isinstance(
            entry.get("text"), str):
        raise UserError(f'{meta}:{n}: expected {{"file_name": "...", "text": "..."}} (strings), got {line.strip()[:80]}')
    return Path(entry["file_name"]).as_posix().removeprefix("./"), entry["text"]


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def list_flat_folder(root: Path) -> list[str]:
    """The images directly in ``root`` (a captioned folder without class folders), sorted."""
    return [str(root / f) for f in sorted(os.listdir(root))
            if f.lower().endswith(IMAGE_EXTENSIONS) and (root / f).is_file()]


def _walk_once(top: Path) -> list[tuple[str, list[str]]]:
    """(directory, file names) of every directory under ``top``, following symbolic links as torchvision's
    ``os.walk(followlinks=True)`` does, but each real directory (device, inode) once: a link back to a folder
    above it would otherwise repeat the images until the 40-link limit (one loop), or never end (two)."""
    seen, out = set(), []
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:  # gone or unreadable meanwhile: nothing to list
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # walked already under another name: do not descend again
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # a sorted walk: which name of a directory reached twice is kept does not depend on the disk
        out.append((dirpath, files))
    return out


def write_example_folder(root: str | Path, num_classes: int = 2, per_class: int = 2, corrupt: bool = True) -> Path:
    """A tiny ImageNet-layout folder of random PNGs (plus one corrupt file): for tests and the contract kit."""
    root = Path(root)
    g = torch.Generator().manual_seed(0)
    for c in range(num_classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (24 + 4 * i, 18)  # non-square, so the crop matters
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"img{i}.png")
    if corrupt:
        (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


class ImageFolderDataset(Dataset):
    """ImageNet-layout folder (root/<class>/<image>): ADM center crop to image_size, random horizontal flip."""

    @classmethod
    def contract_args(cls) -> dict:  # a folder the kit writes: 2 classes x 2 PNGs and one corrupt file
        return {"root": str(write_example_folder(tempfile.mkdtemp(prefix="imagefolder-contract-"))), "image_size": 16}

    def __init__(
        self,
        root: str,  # e.g. the ImageNet train split: one sub-folder per class (n01440764/, ...)
        image_size: int = 256,  # MAR's ImageNet resolution (256 px -> 16 x 16 KL-16 tokens)
        random_flip: bool = True,  # the official augmentation: horizontal flip with probability 1/2
        min_size: int = 8,  # images with a shorter side below this are skipped and counted: upsampled to
        # image_size they are blur, and a 1-pixel strip would become a huge image in the resize
        max_aspect_ratio: float = 20.0,  # longer / shorter side beyond this is skipped and counted: the center
        # crop would keep under 5% of the image, and the resize of an extreme strip can exhaust memory
        captions: bool = False,  # items (image, {"label", "text"}), the captions read from root/metadata.jsonl
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root}; put the images there as <root>/<class>/<image> "
                            "(e.g. ImageNet's train split) or set --data.root")
        if image_size < 1:
            raise UserError(f"image_size must be positive, got {image_size}")
        self.image_size, self.random_flip = int(image_size), random_flip
        self.min_size, self.max_aspect_ratio = int(min_size), float(max_aspect_ratio)
        classes, paths, labels = list_image_folder(self.root)
        if captions and not classes:  # a captioned folder may hold its images directly: one class
            classes, paths = [self.root.name], list_flat_folder(self.root)
            labels = [0] * len(paths)
        if not paths:
            raise UserError(f"no images in {self.root}: expected <root>/<class>/<image> with extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        empty = sorted(set(classes) - {classes[i] for i in set(labels)})
        if empty:  # a class without images would still take a label (and a class embedding): a layout mistake
            raise UserError(f"{len(empty)} class folder(s) in {self.root} hold no images: "
                            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; add images or remove them")
        self.classes = classes
        self.num_classes = len(classes)
        # numpy arrays, not lists of str: loader workers read them without copy-on-write growth
        self.paths = np.array(paths)
        self.labels = np.array(labels, dtype=np.int64)
        self.unreadable: dict[str, str] = {}  # path -> why it was skipped (unreadable or unusable), in this process
        self.texts = PackedStrings(read_captions(self.root, paths)) if captions else None
        self.fields = ("label", "text") if captions else ("label",)

    def __len__(self) -> int:
        return len(self.paths)

    def conditioning(self, labels: Tensor):
        """With captions: the k-th request of a class gets the k-th caption of that class (in turn), so sample
        grids and evaluation ask a text-conditioned run with the folder's own captions; else the labels."""
        if self.texts is None:
            return labels
        labels = labels.cpu().long()
        by_class = {c: np.flatnonzero(self.labels == c) for c in set(labels.tolist())}
        texts, seen = [], {}
        for c in labels.tolist():
            rows = by_class[c]
            k = seen[c] = seen.get(c, -1) + 1
            texts.append(str(self.texts[int(rows[k % len(rows)])]) if len(rows) else "")
        return {"label": labels, "text": texts}

    def load(self, index: int) -> tuple[Tensor, int | dict] | None:
        path = str(self.paths[index])
        try:
            with Image.open(path) as image:
                w, h = image.size  # from the header: a bad size is caught before anything is decoded
                if min(w, h) < self.min_size:
                    self._report(path, f"too small: {w} x {h} px, shorter side under min_size {self.min_size}", "unusable")
                    return None
                if max(w, h) > self.max_aspect_ratio * min(w, h):
                    self._report(path, f"too elongated: {w} x {h} px, aspect ratio over max_aspect_ratio "
                                       f"{self.max_aspect_ratio:g}", "unusable")
                    return None
                arr = center_crop(to_rgb(image), self.image_size)  # (S, S, 3) uint8
        except MemoryError:
            raise
        except Exception as e:  # any undecodable file (truncated, not an image, bad header) is skipped
            self._report(path, f"{type(e).__name__}: {e}")
            return None
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1  # (3, S, S)
        if self.texts is not None:
            return image, {"label": int(self.labels[index]), "text": str(self.texts[index])}
        return image, int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[Tensor, int | dict]:
        n = len(self)
        for k in range(n):  # an unreadable file: take the next readable one, so a run never stops on it
            item = self.load((index + k) % n)
            if item is not None:
                return item
        raise UserError(f"none of the {n} images in {self.root} can be read")

    def _report(self, path: str, reason: str, what: str = "unreadable") -> None:
        if path not in self.unreadable:
            self.unreadable[path] = reason
            print(f"warning: skipping {what} image {path} ({reason}); "
                  f"{len(self.unreadable)} skipped so far", file=sys.stderr)

    def augment(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.random_flip:
            return images
        flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5  # (B,)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)  # (B, 3, S, S)
