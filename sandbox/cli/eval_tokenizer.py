"""``sandbox eval-tokenizer --config RECIPE``: reconstruction PSNR / SSIM / LPIPS of the recipe's tokenizer
on its dataset, as JSON, with an originals | reconstructions PNG."""
from __future__ import annotations

import json
import time
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from sandbox.config.recipe import add_recipe_arguments
from sandbox.errors import UserError

NAME = "eval-tokenizer"
HELP = "Reconstruction PSNR, SSIM and LPIPS of a recipe's tokenizer on its dataset (+ a side-by-side PNG)."
ORDER = 35


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_recipe_arguments(p)  # the recipe names the tokenizer and the dataset (its other parts are not built)
    p.add_argument("--num_images", type=int, default=256, help="Images scored (a seeded random subset).")
    p.add_argument("--batch_size", type=int, default=32, help="Images per tokenizer batch.")
    p.add_argument("--out", type=str, default="reconstructions.png",
                   help="The originals | reconstructions PNG (the first --grid_images images).")
    p.add_argument("--grid_images", type=int, default=32, help="Images shown in the PNG.")
    p.add_argument("--lpips", type=bool, default=True, help="Also compute LPIPS (needs the AlexNet trunk file).")
    p.add_argument("--lpips_weights", type=str | None, default=None,
                   help="AlexNet trunk for LPIPS (alexnet-owt-7be5be79.pth); default: $SANDBOX_LPIPS_WEIGHTS, "
                        "$SANDBOX_CACHE/weights or $TORCH_HOME/hub/checkpoints.")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, ... (auto: cuda if available).")
    p.add_argument("--json", type=str | None, default=None, help="Also write the result here.")
    return p


def run(cfg: Namespace) -> None:
    import torch

    from sandbox.config.recipe import instantiate
    from sandbox.eval.reconstruction import (
        load_lpips,
        reconstruction_scores,
        side_by_side,
        summarize,
    )
    from sandbox.images.grids import save_png
    from sandbox.run.device import resolve_device
    from sandbox.run.files import atomic_write_bytes

    out = Path(cfg.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {out}")
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise UserError("--num_images and --batch_size must be >= 1")
    device = resolve_device(cfg.device)
    lpips_model = load_lpips(cfg.lpips_weights, device) if cfg.lpips else None  # a missing file fails first
    dataset = instantiate(cfg, "data")
    tokenizer = instantiate(cfg, "tokenizer").to(device).eval()
    tokenizer.grid_size(dataset.image_size)  # a clear error when the image size does not fit the tokenizer
    n = min(cfg.num_images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    t0 = time.perf_counter()
    originals, recons, parts = [], [], []
    with torch.no_grad():
        for lo in range(0, n, cfg.batch_size):
            x = torch.stack([dataset[i][0] for i in order[lo : lo + cfg.batch_size]]).to(device)  # (b, 3, H, W)
            y = tokenizer.decode(tokenizer.encode(x, sample=False)).float().clamp(-1, 1)  # (b, 3, H, W)
            parts.append(reconstruction_scores(x.cpu(), y.cpu(), lpips_model))
            if sum(len(o) for o in originals) < cfg.grid_images:
                originals.append(x.cpu())
                recons.append(y.cpu())
    scores = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    k = cfg.grid_images
    save_png(side_by_side(torch.cat(originals)[:k], torch.cat(recons)[:k]), out)
    result = {"tokenizer": cfg.tokenizer.class_path, "dataset": cfg.data.class_path, "image_size": dataset.image_size,
              "num_images": n, **summarize(scores), "seconds": round(time.perf_counter() - t0, 2), "png": str(out)}
    text = json.dumps(result, indent=2)
    print(text)
    if cfg.json:
        atomic_write_bytes(Path(cfg.json), text.encode())
