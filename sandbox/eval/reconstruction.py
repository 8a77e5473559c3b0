"""How well a tokenizer reconstructs images: PSNR and SSIM (torchmetrics) and LPIPS (the lpips package).

LPIPS needs an ImageNet trunk (AlexNet or VGG16), which ``lpips.LPIPS`` downloads through torchvision;
here it comes from a local file (torchvision's ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``),
loaded into a trunk built with ``pnet_rand=True`` (no download). LPIPS' own linear layers ship inside
the lpips package. ``load_lpips`` and ``lpips_distance`` serve both ``sandbox eval-tokenizer`` and the
perceptual loss of ``sandbox train-tokenizer``.

References:
    Wang et al. 2004 (SSIM: 11x11 Gaussian window, sigma 1.5); Zhang et al. 2018 (LPIPS, v0.1 linear layers);
    LDM / MAR tokenizer tables (rFID, PSNR, SSIM of reconstructions).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.errors import UserError
from sandbox.run.checkpoints import load_checkpoint
from sandbox.weights import find_weights

LPIPS_TRUNKS = {  # net -> (torchvision's ImageNet trunk file, where it comes from, environment variable)
    "alex": ("alexnet-owt-7be5be79.pth", "torchvision's ImageNet AlexNet, AlexNet_Weights.IMAGENET1K_V1",
             "SANDBOX_LPIPS_WEIGHTS"),
    "vgg": ("vgg16-397923af.pth", "torchvision's ImageNet VGG16, VGG16_Weights.IMAGENET1K_V1",
            "SANDBOX_LPIPS_VGG_WEIGHTS"),
}
LPIPS_MIN_SIZE = 64  # VGG's four and AlexNet's three poolings need larger inputs: smaller images are upsampled


def load_lpips(weights: str | None = None, device: torch.device | str = "cpu", random_trunk: bool = False,
               net: str = "alex", option: str = "--lpips_weights", alternative: str | None = None):
    """LPIPS (v0.1 linear layers) on the ``net`` trunk read from a local file (``weights``, its environment
    variable, or the weight folders of sandbox/weights.py; ``option`` names the flag and ``alternative`` a
    way to run without the file in the missing-file error); ``random_trunk`` builds it with a random trunk
    and no file (for tests: the wiring, not the values)."""
    import lpips

    filename, source, env = LPIPS_TRUNKS[net]
    path = None if random_trunk else find_weights(weights, env, (filename,), f"LPIPS {net} trunk", option, source,
                                                  alternative)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if path is not None:
        state = load_checkpoint(path)  # tensors only; an unreadable file is a one-line error
        try:
            # lpips splits torchvision's `features` into slice1..5 but keeps its module indices: slice2.3 = features.3
            model.net.load_state_dict({k: state[f"features.{k.split('.', 1)[1]}"] for k in model.net.state_dict()})
        except Exception as e:  # a wrong or truncated file: one line
            msg = " ".join(str(e).split())[:200]
            raise UserError(f"{path} is not torchvision's {net} state dict ({type(e).__name__}: {msg})") from e
    return model.to(device).eval().requires_grad_(False)


def lpips_distance(model, x: Tensor, y: Tensor) -> Tensor:
    """(B,3,H,W) pairs in [-1,1] -> (B,) LPIPS distance; small images are upsampled first."""
    if x.shape[-1] < LPIPS_MIN_SIZE:
        size = (LPIPS_MIN_SIZE, LPIPS_MIN_SIZE)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return model(x, y).flatten()  # (B,)


@torch.no_grad()
def psnr(reference: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB of (N,3,H,W) images in [-1,1] against ``reference``, on the [0,1] scale (peak 1) -> (N,).

    torchmetrics' PSNR, per image (``dim=(1, 2, 3)``): the same numbers as ``sandbox eval-tokenizer``.
    A perfect reconstruction gives inf.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a = (reference.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
    b = (images.float().clamp(-1, 1) + 1) / 2
    return peak_signal_noise_ratio(b, a, data_range=1.0, dim=(1, 2, 3), reduction="none")  # (N,)


def reconstruction_scores(originals: Tensor, reconstructions: Tensor, lpips_model=None) -> dict[str, Tensor]:
    """Per-image PSNR (dB), SSIM and LPIPS of (N,3,H,W) images in [-1,1] -> {name: (N,)}."""
    from torchmetrics.functional.image import structural_similarity_index_measure


    a = (originals.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
    b = (reconstructions.float().clamp(-1, 1) + 1) / 2
    out = {
        "psnr": psnr(originals, reconstructions),
        "ssim": structural_similarity_index_measure(b, a, data_range=1.0, reduction="none"),
    }
    if lpips_model is not None:
        device = next(lpips_model.parameters()).device
        out["lpips"] = lpips_distance(lpips_model, (a * 2 - 1).to(device), (b * 2 - 1).to(device)).cpu()
    return out


def summarize(scores: dict[str, Tensor]) -> dict[str, float | str]:
    """Means over images; an infinite PSNR (a lossless tokenizer) is reported as the string "inf" (valid JSON)."""
    out: dict[str, float | str] = {}
    for name, values in scores.items():
        v = float(values.double().mean())
        out[name] = v if math.isfinite(v) else ("inf" if v > 0 else "nan")
    return out


def side_by_side(originals: Tensor, reconstructions: Tensor, gap: int = 8) -> np.ndarray:
    """Two panels, originals | reconstructions, each a square grid in the same order, titled."""
    from PIL import Image, ImageDraw

    from sandbox.images.grids import default_upscale, make_grid

    up = default_upscale(originals.shape[-1])
    left, right = make_grid(originals, upscale=up), make_grid(reconstructions, upscale=up)
    title = 14
    h, w = left.shape[:2]
    canvas = np.full((h + title, 2 * w + gap, 3), 255, dtype=np.uint8)
    canvas[title:, :w], canvas[title:, w + gap :] = left, right
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    draw.text((2, 1), "original", fill=(0, 0, 0))
    draw.text((w + gap + 2, 1), "reconstruction", fill=(0, 0, 0))
    return np.asarray(img)
