"""Training a small autoencoder to use as a MAR tokenizer: KL (a diffusers ``AutoencoderKL``) or VQ (``VQModel``).

The LDM recipe: a pixel L1 loss plus LPIPS (perceptual) plus a small KL term towards N(0, I), and a
PatchGAN discriminator (hinge loss) that joins after a warm-up step with LDM's adaptive weight; EMA of
the autoencoder's weights. ``autoencoder.bottleneck: vq`` swaps the KL term for a codebook: the encoder's
latent is replaced by its nearest codebook vector, the decoder's gradient passes it straight through, and
VQ-VAE's codebook loss ||sg[z_e] - e||^2 plus commitment loss beta ||z_e - sg[e]||^2 (beta 0.25) train the
codebook and keep the encoder near it. The run directory follows ``sandbox train``'s conventions
(``recipe.yaml``, ``checkpoints/``, ``metrics.jsonl``, ``samples/``, exact resume, atomic saves). At the end the
EMA weights are exported to ``RUN/vae/`` in diffusers format, with the latent scale measured on the dataset
written as its ``scaling_factor``, so ``DiffusersVAETokenizer`` (KL) or ``VQTokenizer`` (VQ) with
``--tokenizer.path RUN`` uses it in a MAR recipe.

References:
    Rombach et al., CVPR 2022 and CompVis latent-diffusion ``LPIPSWithDiscriminator`` (L1 + LPIPS + KL with
    kl_weight 1e-6, hinge PatchGAN from disc_start, adaptive weight ||grad nll|| / ||grad g||, Adam betas 0.5, 0.9);
    Isola et al., CVPR 2017 (pix2pix PatchGAN ``NLayerDiscriminator``); Zhang et al., CVPR 2018 (LPIPS);
    van den Oord et al., NeurIPS 2017 (VQ-VAE eq. 3: straight-through codes, codebook + commitment loss, beta 0.25);
    Esser et al., CVPR 2021 and taming-transformers ``VQLPIPSWithDiscriminator`` (VQGAN: the same losses as means).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser, Namespace
from torch import Tensor, nn
from tqdm.auto import tqdm

from sandbox import __version__
from sandbox.config.recipe import add_run_arguments, instantiate, one_line
from sandbox.config.schema import TrainConfig
from sandbox.core.contracts import Dataset
from sandbox.errors import UserError
from sandbox.eval import reconstruction
from sandbox.eval.reconstruction import lpips_distance, psnr
from sandbox.run.checkpoints import state_mismatch
from sandbox.run.data import batches
from sandbox.run.device import autocast_dtype, resolve_device
from sandbox.run.files import atomic_write_bytes
from sandbox.run.guards import NonFiniteGuard
from sandbox.run.optim import base_lr, ema_decay_at, ema_update, lr_at
from sandbox.run.resume import check_run_recipe, rng_state, set_rng_state
from sandbox.run.rundir import RunDir
from sandbox.run.signals import StopRequested

EVAL_IMAGES = 512  # images (seeded sample) for the final reconstruction PSNR and the exported latent scale

# --------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------
@dataclass
class AutoencoderConfig:
    """A diffusers AutoencoderKL or VQModel; every level but the last halves the resolution (stride 2**(levels-1))."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)  # three levels: stride 4 (LDM KL-16: 128,128,256,256,512)
    layers_per_block: int = 1  # residual blocks per level (LDM uses 2; 1 halves the cost of a small model)
    latent_channels: int = 4  # c: KL-8 / KL-4 use 4, KL-16 16
    norm_num_groups: int = 32  # GroupNorm groups (LDM: 32); must divide every block width
    mid_block_add_attention: bool = True  # LDM: one self-attention block at the lowest resolution
    bottleneck: Literal["kl", "vq"] = "kl"  # kl: Gaussian posterior (AutoencoderKL); vq: codebook (VQModel)
    codebook_size: int = 1024  # K, vq only: VQGAN's ImageNet codebook size (Esser et al. 2021); c = latent_channels

    def build(self):
        from diffusers import AutoencoderKL, VQModel

        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise UserError(f"autoencoder.norm_num_groups {self.norm_num_groups} must divide every block width; "
                            f"{bad or 'no levels'} do not")
        if self.bottleneck == "vq" and self.codebook_size < 2:
            raise UserError(f"autoencoder.codebook_size must be >= 2, got {self.codebook_size}")
        levels = len(self.block_out_channels)
        common = dict(
            in_channels=3, out_channels=3, block_out_channels=tuple(self.block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
        )
        if self.bottleneck == "vq":
            return VQModel(**common, num_vq_embeddings=self.codebook_size)
        return AutoencoderKL(**common)


@dataclass
class LossConfig:
    """L1 + LPIPS + KL, and an optional PatchGAN. Defaults are LDM's autoencoder settings where it has one."""

    l1_weight: float = 1.0  # LDM: pixel L1 reconstruction loss
    perceptual_weight: float = 1.0  # LDM: LPIPS weight 1.0; 0 trains offline without LPIPS (it is then not built)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LDM's LPIPS runs on VGG16; AlexNet is cheaper
    lpips_weights: Optional[str] = None  # the torchvision trunk file; None: its env variable or the weight folders
    lpips_random_trunk: bool = False  # tests only: a random trunk and no file (checks the wiring, not the values)
    kl_weight: float = 1e-6  # LDM KL-8 / KL-16 configs: a weak pull towards N(0, I) keeps the latent smooth
    commitment_weight: float = 0.25  # vq only: VQ-VAE's beta (van den Oord et al. 2017, sec. 3.2; VQGAN keeps it)
    # vq only: a code no batch picked for this many steps restarts at a random encoder output of the current
    # batch (Jukebox's random restarts), and at step 0 every unpicked code does (a data-dependent init). Without
    # them the digits recipe's batches used 9 of 256 codes after 100 steps (with them ~220); 0: plain VQ-VAE
    codebook_restart_steps: int = 20
    disc_start: Optional[int] = None  # step the discriminator joins (LDM KL-16: 50001); None: no discriminator
    disc_weight: float = 0.5  # LDM: scales the adaptive generator weight
    disc_layers: int = 3  # pix2pix PatchGAN: 3 strided layers (70 px receptive field); fewer for tiny images
    disc_channels: int = 64  # pix2pix ndf
    disc_lr: Optional[float] = None  # None: the autoencoder's lr (LDM uses the same)


def add_tokenizer_recipe_arguments(parser: ArgumentParser) -> None:
    add_run_arguments(parser, seed_help="Fixes initialisation, data order and posterior samples.",
                      plugins_help="Plugin files (.py) the recipe needs (a dataset), relative to the recipe file; "
                                   "the CLI loads them before parsing and stores them as absolute paths.")
    parser.add_argument("--data", type=Dataset, required=True, help="Dataset plugin (the images to reconstruct).")
    parser.add_argument("--autoencoder", type=AutoencoderConfig, default=AutoencoderConfig(),
                        help="The diffusers AutoencoderKL to train.")
    parser.add_argument("--loss", type=LossConfig, default=LossConfig(), help="Reconstruction, KL and GAN losses.")
    parser.add_argument("--train", type=TrainConfig, default=TrainConfig(),
                        help="Training settings (the same fields as `sandbox train`).")


TOKENIZER_RECIPE_KEYS = ("seed", "plugins", "data", "autoencoder", "loss", "train")


def tokenizer_recipe_dict(cfg: Namespace) -> dict:
    d = cfg.clone().as_dict()
    return {k: d[k] for k in TOKENIZER_RECIPE_KEYS if k in d}


def _slot(cfg: Namespace, key: str, typ: type):
    single = ArgumentParser(exit_on_error=False)
    single.add_argument(f"--{key}", type=typ)
    sub = Namespace()
    sub[key] = cfg[key].clone()
    try:
        return single.instantiate(sub)[key]
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {key} settings: {one_line(e)}") from e


# --------------------------------------------------------------------------------------
# Loss parts
# --------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: strided 4x4 convolutions -> one real/fake logit per overlapping patch."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        # hand-written: diffusers and timm ship no PatchGAN; this is the 20-line pix2pix network LDM uses
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            prev, width = width, channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last layer keeps the resolution
            mods += [nn.Conv2d(prev, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convolutions, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h', w') patch logits


def load_lpips(net: str, weights: str | None, random_trunk: bool = False) -> nn.Module:
    """The perceptual loss's LPIPS (sandbox/reconstruction.py), with this command's flags in a missing-file error."""
    return reconstruction.load_lpips(weights, "cpu", random_trunk, net=net, option="--loss.lpips_weights",
                                     alternative="train without LPIPS: --loss.perceptual_weight 0")


# --------------------------------------------------------------------------------------
# Bottlenecks: a Gaussian posterior (KL) or a codebook (VQ) between the encoder and the decoder
# --------------------------------------------------------------------------------------
def is_vq(vae) -> bool:
    return hasattr(vae, "quantize")  # a diffusers VQModel holds its codebook there; an AutoencoderKL has none


def quantize(vae, h: Tensor) -> tuple[Tensor, Tensor]:
    """VQ: the latent before quantisation h (B,c,h,w) -> (its nearest codebook vectors (B,c,h,w), differentiable
    in the codebook, and their indices (B,h,w)). The same nearest-code rule as ``VQTokenizer``."""
    from sandbox.plugins.tokenizers.vq import nearest_code

    B, c, hh, ww = h.shape
    index = nearest_code(h.permute(0, 2, 3, 1).reshape(-1, c), vae.quantize.embedding.weight)  # (B h w,)
    z_q = vae.quantize.embedding(index).view(B, hh, ww, c).permute(0, 3, 1, 2)  # (B, c, h, w)
    return z_q, index.view(B, hh, ww)


def encode_for_training(vae, images: Tensor, generator, lc: LossConfig) -> tuple[Tensor, Tensor, dict]:
    """images (B,3,H,W) -> (the latent the decoder reads (B,c,h,w), the bottleneck's loss, its readable parts)."""
    B = images.shape[0]
    if not is_vq(vae):
        posterior = vae.encode(images).latent_dist
        kl = posterior.kl().sum() / B  # summed over latent elements, as LDM
        return posterior.sample(generator), lc.kl_weight * kl, {"kl": float(kl.detach()) / posterior.mean[0].numel()}
    h = vae.encode(images).latents  # (B, c, h, w) before quantisation
    z_q, index = quantize(vae, h)
    codebook = F.mse_loss(z_q.float(), h.detach().float())  # ||sg[z_e] - e||^2: codes move to the encoder outputs
    commitment = F.mse_loss(h.float(), z_q.detach().float())  # ||z_e - sg[e]||^2: the encoder stays near its codes
    # VQGAN adds these means to a mean reconstruction loss; the losses here are per-image sums (LDM's KL
    # convention), so the VQ term is scaled by the image's 3HW elements: VQGAN's balance, times a constant
    loss = (codebook + lc.commitment_weight * commitment) * images[0].numel()
    used = index.unique().numel() / vae.quantize.n_e
    z = h + (z_q - h).detach()  # straight-through: the decoder reads the codes, the encoder gets their gradient
    # both terms have the value mean ||z_e - e||^2 (they differ in where the gradient goes): logged once
    return z, loss, {"vq_mse": float(commitment.detach()), "used": used,
                     "codes": (h.detach(), index)}  # for CodebookRestarts; popped by the loop, never logged


class CodebookRestarts:
    """Random restarts of dead codes, after Jukebox (Dhariwal et al. 2020, "random restarts for embeddings", which
    resets codes whose usage falls below a threshold): after an optimizer step, every code that no batch picked
    for ``after`` steps moves to a random encoder output of the current batch, in the model and its EMA, with
    its Adam momentum cleared. At step 0 every code not picked restarts, so the codebook starts on the data
    (diffusers' init spans +-1/K, far from the encoder's outputs)."""

    def __init__(self, num_codes: int, after: int):
        self.after = after
        self.last_used = torch.full((num_codes,), -(2**62), dtype=torch.long)  # step each code was last picked

    @torch.no_grad()
    def update(self, step: int, codes: list[tuple[Tensor, Tensor]], models, opt, generator) -> int:
        """After optimizer step ``step``: ``codes`` holds each micro-batch's (latent (B,c,h,w), indices (B,h,w)).
        Returns the number of codes restarted."""
        for _, index in codes:
            self.last_used[index.flatten().unique().cpu()] = step
        if not self.after:
            return 0
        dead = ((step - self.last_used) >= self.after) if step else (self.last_used < 0)  # (K,) bool
        if not dead.any():
            return 0
        h = codes[-1][0]
        rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B h w, c) encoder outputs of the last micro-batch
        pick = torch.randint(len(rows), (int(dead.sum()),), generator=generator, device=generator.device)
        new = rows[pick.to(rows.device)].float()
        dead = dead.to(rows.device)
        for vae in models:  # the model and its EMA: an exported EMA must not keep a dead code's old place
            vae.quantize.embedding.weight[dead] = new.to(vae.quantize.embedding.weight.dtype)
        state = opt.state.get(models[0].quantize.embedding.weight, {})
        if "exp_avg" in state:
            state["exp_avg"][dead] = 0.0  # stale momentum would push the new code away from the data at once
        self.last_used[dead.cpu()] = step
        return len(new)

    def state_dict(self) -> dict:
        return {"last_used": self.last_used.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.last_used = state["last_used"].clone()


def decode(vae, z: Tensor) -> Tensor:
    """The latent the decoder reads (B,c,h,w) -> images (B,3,H,W); a VQ latent is not quantised again."""
    return (vae.decode(z, force_not_quantize=True) if is_vq(vae) else vae.decode(z)).sample


def encode_mode(vae, images: Tensor) -> Tensor:
    """images -> the deterministic latent the decoder reads: KL's posterior mean, VQ's codebook vectors."""
    return quantize(vae, vae.encode(images).latents)[0] if is_vq(vae) else vae.encode(images).latent_dist.mode()


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
def _adaptive_weight(nll: Tensor, g_loss: Tensor, last: Tensor) -> Tensor:
    """LDM: balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class _Losses:
    def __init__(self, lc: LossConfig, device: torch.device):
        self.lc = lc
        self.lpips = load_lpips(lc.lpips_net, lc.lpips_weights, lc.lpips_random_trunk).to(device) \
            if lc.perceptual_weight > 0 else None  # never built without a perceptual weight: works offline

    def generator_loss(self, vae, disc, images: Tensor, generator, gan: bool) -> tuple[Tensor, dict]:
        """images (B,3,H,W) -> autoencoder loss and its parts (per-image sums as LDM, divided by B)."""
        lc = self.lc
        z, bottleneck_loss, bottleneck_parts = encode_for_training(vae, images, generator, lc)
        recon = decode(vae, z)  # (B, 3, H, W)
        l1 = (images - recon).abs()  # (B, 3, H, W)
        rec = lc.l1_weight * l1
        parts = {"l1": float(l1.detach().mean())}
        if self.lpips is not None:
            p = lpips_distance(self.lpips, images, recon)  # (B,)
            rec = rec + lc.perceptual_weight * p[:, None, None, None]  # LDM adds it at every pixel
            parts["lpips"] = float(p.detach().mean())
        nll = rec.sum() / images.shape[0]
        loss = nll + bottleneck_loss
        parts.update(bottleneck_parts)  # KL per latent element; VQ's mean losses and the share of codes used
        if gan:
            g_loss = -disc(recon).mean()
            d_weight = _adaptive_weight(nll, g_loss, vae.decoder.conv_out.weight) * lc.disc_weight
            loss = loss + d_weight * g_loss
            parts.update(g_loss=float(g_loss.detach()), d_weight=float(d_weight))
        return loss, {**parts, "recon": recon.detach()}

    @staticmethod
    def discriminator_loss(disc, images: Tensor, recon: Tensor) -> Tensor:
        """Hinge loss (LDM's default): real logits above 1, fake below -1."""
        return 0.5 * (F.relu(1.0 - disc(images)).mean() + F.relu(1.0 + disc(recon)).mean())


def _save_vae(vae, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in: a crash leaves the old export or none, never half."""
    tmp, old = folder.with_name(f".{folder.name}.tmp{os.getpid()}"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train_tokenizer(cfg: Namespace, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the tokenizer recipe ``cfg`` in ``run_dir``. Returns a summary dict."""
    run = RunDir(run_dir)
    recipe = tokenizer_recipe_dict(cfg)
    check_run_recipe(run, recipe)
    tc: TrainConfig = _slot(cfg, "train", TrainConfig)
    lc: LossConfig = _slot(cfg, "loss", LossConfig)
    ac: AutoencoderConfig = _slot(cfg, "autoencoder", AutoencoderConfig)
    device = resolve_device(tc.device)
    amp_dtype = autocast_dtype(tc.precision, device)
    if amp_dtype == torch.float16:  # LDM VAEs overflow in fp16 (diffusers marks them force_upcast)
        raise UserError("train-tokenizer runs in fp32 or bf16; set --train.precision bf16 or fp32")
    torch.manual_seed(cfg.seed)  # initial weights follow the recipe's seed
    dataset = instantiate(cfg, "data")
    if dataset.provides != "images":
        raise UserError(f"dataset {type(dataset).__name__} provides {dataset.provides}: a tokenizer trains on images")
    stride = 2 ** (len(ac.block_out_channels) - 1)
    if dataset.image_size % stride:
        raise UserError(f"image size {dataset.image_size} is not divisible by the autoencoder's stride {stride} "
                        f"({len(ac.block_out_channels)} levels); change the dataset's image_size or the levels")
    vae = ac.build().to(device)
    disc = PatchDiscriminator(lc.disc_layers, lc.disc_channels).to(device) if lc.disc_start is not None else None
    losses = _Losses(lc, device)
    params = sum(p.numel() * p.element_size() for m in (vae, disc) if m is not None for p in m.parameters())
    run.create(reserve_bytes=4 * params * (max(tc.keep_checkpoints, 2) + 1))  # copies as trainer.checkpoint_reserve
    run.write_recipe(recipe)

    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    restarts = CodebookRestarts(ac.codebook_size, lc.codebook_restart_steps) if is_vq(vae) else None
    peak_lr = base_lr(tc)
    opt = torch.optim.AdamW(vae.parameters(), lr=peak_lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr or peak_lr, betas=tuple(tc.betas),
                                 weight_decay=tc.weight_decay) if disc is not None else None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    step, guard = 0, NonFiniteGuard(tc.max_nonfinite_steps)
    ckpt = run.load_latest(map_location=device)
    if ckpt is not None:
        try:
            vae.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            if disc is not None:
                disc.load_state_dict(ckpt["disc"])
                disc_opt.load_state_dict(ckpt["disc_optimizer"])
        except (RuntimeError, KeyError, TypeError) as e:
            detail = state_mismatch(e) if isinstance(e, RuntimeError) else one_line(e)
            raise UserError(f"checkpoint in {run.ckpt_dir} does not fit this autoencoder: {detail}") from e
        opt.load_state_dict(ckpt["optimizer"])
        if restarts is not None and "vq_restarts" in ckpt:
            restarts.load_state_dict(ckpt["vq_restarts"])
        step = int(ckpt["step"])
        guard.load_state_dict(ckpt["guard"])
        set_rng_state(ckpt["rng"], generator)
        run.truncate_metrics(step)  # a killed run logged steps past its checkpoint; they are redone now
        print(f"resuming {run.root} from step {step}")
    meta = {"image_size": int(dataset.image_size), "stride": stride, "latent_channels": ac.latent_channels}

    def checkpoint() -> None:
        run.save({
            "model": vae.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "disc": disc.state_dict() if disc is not None else {},
            "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else {},
            "step": step, "skipped": guard.total, "guard": guard.state_dict(), "rng": rng_state(generator), "recipe": recipe, "meta": meta,
            "version": __version__, **({"vq_restarts": restarts.state_dict()} if restarts is not None else {}),
        }, step, tc.keep_checkpoints)

    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    data = batches(dataset, tc, cfg.seed, step, device)  # starts at micro-batch step * grad_accum
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train-tokenizer", dynamic_ncols=True)
    t_last, seen, last = time.perf_counter(), 0, {}
    vae.train()
    with StopRequested() as stop, bar, closing(data):  # bar: its line ends before an error; closing: the workers
        while step < tc.steps and stop.signal is None:
            lr = lr_at(step, tc, peak_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            gan = disc is not None and step >= lc.disc_start
            if disc is not None:
                disc.requires_grad_(False)  # the generator's loss must not leave gradients in the discriminator
            total, parts_sum, d_total = 0.0, {}, 0.0
            recons, codes = [], []
            for _ in range(tc.grad_accum):
                images, _ = next(data)
                images = dataset.augment(images, generator)
                with amp:
                    loss, parts = losses.generator_loss(vae, disc, images, generator, gan)  # disc frozen here
                (loss / tc.grad_accum).backward()
                total += float(loss.detach()) / tc.grad_accum
                recons.append((images, parts.pop("recon")))
                if "codes" in parts:  # VQ: this micro-batch's encoder outputs and picked codes
                    codes.append(parts.pop("codes"))
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / tc.grad_accum
                seen += images.shape[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e30)
            ok = guard.check(step + 1, total, grad_norm)  # a non-finite step is skipped, counted and reported
            if ok:
                opt.step()
                ema_update(ema, vae, ema_decay_at(step, tc))
                if restarts is not None:
                    parts_sum["restarted"] = restarts.update(step, codes, (vae, ema), opt, generator)
            opt.zero_grad(set_to_none=True)
            if gan and ok:  # the discriminator learns from this step's reconstructions (LDM's second optimizer)
                disc.requires_grad_(True)
                for group in disc_opt.param_groups:
                    group["lr"] = lc.disc_lr or lr
                for images, recon in recons:
                    with amp:
                        d_loss = losses.discriminator_loss(disc, images, recon) / tc.grad_accum
                    d_loss.backward()
                    d_total += float(d_loss.detach())
                disc_opt.step()
                disc_opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if guard.diverged():
                raise guard.stop(step, run.verified)

            if step % tc.log_every == 0 or step == tc.steps:
                now = time.perf_counter()
                last = {"step": step, "loss": total, **{k: round(v, 6) for k, v in parts_sum.items()},
                        **({"d_loss": d_total} if gan else {}), "lr": lr, "grad_norm": float(grad_norm),
                        "img_per_s": seen / max(now - t_last, 1e-9), "skipped": guard.total}
                run.append_metrics(last)
                bar.set_postfix(l1=f"{parts_sum.get('l1', 0):.4f}", lr=f"{lr:.2e}", img_s=f"{last['img_per_s']:.0f}")
                t_last, seen = now, 0
            if step % tc.ckpt_every == 0 and step < tc.steps:
                checkpoint()
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                _reconstruction_grid(ema, dataset, device, cfg.seed, run.samples_dir / f"step_{step:07d}.png")
        bar.close()
        checkpoint()
        if stop.signal is not None:
            print(f"stopped by signal {stop.signal} at step {step}; checkpoint saved in {run.ckpt_dir}")
            return {"step": step, "stopped": True, "run_dir": str(run.root)}
    return {"step": step, "run_dir": str(run.root), **export(ema, dataset, run, device, cfg.seed)}


# --------------------------------------------------------------------------------------
# Export: the EMA autoencoder as a diffusers folder with its measured scale, and its reconstruction score
# --------------------------------------------------------------------------------------
def _sample_images(dataset: Dataset, n: int, seed: int) -> Tensor:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: min(n, len(dataset))]
    return torch.stack([dataset[int(i)][0] for i in order])  # (n, 3, H, W)


@torch.no_grad()
def _reconstruction_grid(vae, dataset: Dataset, device: torch.device, seed: int, path: Path, n: int = 32) -> None:
    from sandbox.images.grids import save_grid

    images = _sample_images(dataset, n, seed).to(device)
    recon = decode(vae, encode_mode(vae, images))
    rows = torch.stack([images, recon], 1)  # (n, 2, 3, H, W): original beside its reconstruction
    save_grid(rows.flatten(0, 1), path, ncol=16)


def _kl_report(vae, images: Tensor, device: torch.device, seed: int) -> tuple[list[Tensor], list[Tensor], dict]:
    """KL: PSNR of the posterior mean's reconstruction, and one posterior sample per image (the latent scale)."""
    g = torch.Generator(device).manual_seed(seed)
    scores, latents = [], []
    for lo in range(0, len(images), 64):
        x = images[lo : lo + 64].to(device)
        posterior = vae.encode(x).latent_dist
        scores.append(psnr(x, vae.decode(posterior.mode()).sample).cpu())  # reconstruction of the posterior mean
        latents.append(posterior.sample(g).double().cpu())  # (b, c, h, w): one posterior sample per image
    return scores, latents, {}


def _vq_report(vae, images: Tensor, device: torch.device) -> tuple[list[Tensor], list[Tensor], dict]:
    """VQ: PSNR through the codebook, the quantised latents (VQTokenizer's tokens: their scale), PSNR of the latent
    before quantisation (VQTokenizer with quantize false), the codes in use and the perplexity of their
    distribution (K when every code is used equally often)."""
    scores, latents, unquantised = [], [], []
    counts = torch.zeros(vae.quantize.n_e, dtype=torch.float64)
    for lo in range(0, len(images), 64):
        x = images[lo : lo + 64].to(device)
        h = vae.encode(x).latents  # (b, c, h, w) before quantisation
        z_q, index = quantize(vae, h)
        scores.append(psnr(x, decode(vae, z_q)).cpu())
        latents.append(z_q.double().cpu())
        unquantised.append(psnr(x, decode(vae, h)).cpu())
        counts += torch.bincount(index.flatten().cpu(), minlength=len(counts)).double()
    p = counts[counts > 0] / counts.sum()
    return scores, latents, {"psnr_before_quantisation": round(float(torch.cat(unquantised).mean()), 3),
                             "codebook_size": len(counts), "codes_used": int((counts > 0).sum()),
                             "code_perplexity": round(float(torch.exp(-(p * p.log()).sum())), 2)}


@torch.no_grad()
def export(vae, dataset: Dataset, run: RunDir, device: torch.device, seed: int) -> dict:
    """Measure PSNR and the latent scale of ``vae`` on a seeded sample, write RUN/vae and RUN/reconstruction.json."""
    images = _sample_images(dataset, EVAL_IMAGES, seed)
    scores, latents, extra = _vq_report(vae, images, device) if is_vq(vae) else _kl_report(vae, images, device, seed)
    z = torch.cat(latents)
    stats = {"std": float(z.std()), "mean": float(z.mean())}
    scale = float(f"{1.0 / stats['std']:.4g}")  # 1 / std of the latents, as MAR's 0.2325 (LTH14/mar#2)
    # how far the scaled latents reach: a head that clips x0 (DiffusionHead.x0_clip) must not clip below it
    reach = torch.quantile((z.flatten() * scale).abs()[:1_000_000].float(), 0.999).item()
    vae.register_to_config(scaling_factor=scale)
    _save_vae(vae, run.root / "vae")
    _reconstruction_grid(vae, dataset, device, seed, run.samples_dir / "reconstructions.png")
    result = {"psnr": round(float(torch.cat(scores).mean()), 3), "num_images": len(images),
              "latent_std": round(stats["std"], 5), "latent_mean": round(stats["mean"], 5), "scale": scale,
              "scaled_abs_q999": round(reach, 3), **extra,
              "vae": str(run.root / "vae")}
    atomic_write_bytes(run.root / "reconstruction.json", json.dumps(result, indent=2).encode())
    return result
