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
    return TokenizerTrainer(cfg, run_dir, progress).run()


class TokenizerTrainer:
    """One tokenizer run, in phases as ``sandbox.run.trainer.Trainer``: build, restore, loop (steps of the
    autoencoder and, once it joins, the discriminator), export."""

    def __init__(self, cfg: Namespace, run_dir: str | Path, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.run_dir = RunDir(run_dir)
        self.recipe = tokenizer_recipe_dict(cfg)
        check_run_recipe(self.run_dir, self.recipe)
        self.tc: TrainConfig = _slot(cfg, "train", TrainConfig)
        self.lc: LossConfig = _slot(cfg, "loss", LossConfig)
        self.ac: AutoencoderConfig = _slot(cfg, "autoencoder", AutoencoderConfig)
        self.device = resolve_device(self.tc.device)
        self.amp_dtype = autocast_dtype(self.tc.precision, self.device)
        if self.amp_dtype == torch.float16:  # LDM VAEs overflow in fp16 (diffusers marks them force_upcast)
            raise UserError("train-tokenizer runs in fp32 or bf16; set --train.precision bf16 or fp32")
        self.step = 0

    def run(self) -> dict:
        self.build()
        ckpt = self.run_dir.load_latest(map_location=self.device)
        if ckpt is not None:
            self.restore(ckpt)
        stopped = self.loop()
        root = str(self.run_dir.root)
        if stopped is not None:
            print(f"stopped by signal {stopped} at step {self.step}; checkpoint saved in {self.run_dir.ckpt_dir}")
            return {"step": self.step, "stopped": True, "run_dir": root}
        return {"step": self.step, "run_dir": root,
                **export(self.ema, self.dataset, self.run_dir, self.device, self.cfg.seed)}

    def build(self) -> None:
        """The dataset, the autoencoder (and discriminator), their optimizers; the run directory."""
        cfg, tc, lc, ac = self.cfg, self.tc, self.lc, self.ac
        torch.manual_seed(cfg.seed)  # initial weights follow the recipe's seed
        self.dataset = dataset = instantiate(cfg, "data")
        if dataset.provides != "images":
            raise UserError(f"dataset {type(dataset).__name__} provides {dataset.provides}: a tokenizer trains on "
                            "images")
        stride = 2 ** (len(ac.block_out_channels) - 1)
        if dataset.image_size % stride:
            raise UserError(f"image size {dataset.image_size} is not divisible by the autoencoder's stride {stride} "
                            f"({len(ac.block_out_channels)} levels); change the dataset's image_size or the levels")
        self.vae = vae = ac.build().to(self.device)
        self.disc = PatchDiscriminator(lc.disc_layers, lc.disc_channels).to(self.device) \
            if lc.disc_start is not None else None
        self.losses = _Losses(lc, self.device)
        params = sum(p.numel() * p.element_size() for m in (vae, self.disc) if m is not None for p in m.parameters())
        self.run_dir.create(reserve_bytes=4 * params * (max(tc.keep_checkpoints, 2) + 1))  # as checkpoint_reserve
        self.run_dir.write_recipe(self.recipe)
        self.ema = copy.deepcopy(vae).eval().requires_grad_(False)
        self.restarts = CodebookRestarts(ac.codebook_size, lc.codebook_restart_steps) if is_vq(vae) else None
        self.peak_lr = base_lr(tc)
        self.opt = torch.optim.AdamW(vae.parameters(), lr=self.peak_lr, betas=tuple(tc.betas),
                                     weight_decay=tc.weight_decay)
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=lc.disc_lr or self.peak_lr, betas=tuple(tc.betas),
                                          weight_decay=tc.weight_decay) if self.disc is not None else None
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.guard = NonFiniteGuard(tc.max_nonfinite_steps)
        self.meta = {"image_size": int(dataset.image_size), "stride": stride, "latent_channels": ac.latent_channels}

    def restore(self, ckpt: dict) -> None:
        """Continue from ``ckpt``: weights, optimizers, codebook restarts, the guard and the generator."""
        try:
            self.vae.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            if self.disc is not None:
                self.disc.load_state_dict(ckpt["disc"])
                self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
        except (RuntimeError, KeyError, TypeError) as e:
            detail = state_mismatch(e) if isinstance(e, RuntimeError) else one_line(e)
            raise UserError(f"checkpoint in {self.run_dir.ckpt_dir} does not fit this autoencoder: {detail}") from e
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.restarts is not None and "vq_restarts" in ckpt:
            self.restarts.load_state_dict(ckpt["vq_restarts"])
        self.step = int(ckpt["step"])
        self.guard.load_state_dict(ckpt["guard"])
        set_rng_state(ckpt["rng"], self.generator)
        self.run_dir.truncate_metrics(self.step)  # a killed run logged steps past its checkpoint; redone now
        print(f"resuming {self.run_dir.root} from step {self.step}")

    def checkpoint(self) -> None:
        self.run_dir.save({
            "model": self.vae.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc is not None else {},
            "disc_optimizer": self.disc_opt.state_dict() if self.disc_opt is not None else {},
            "step": self.step, "skipped": self.guard.total, "guard": self.guard.state_dict(),
            "rng": rng_state(self.generator), "recipe": self.recipe, "meta": self.meta, "version": __version__,
            **({"vq_restarts": self.restarts.state_dict()} if self.restarts is not None else {}),
        }, self.step, self.tc.keep_checkpoints)

    def loop(self) -> int | None:
        """Train to ``train.steps``; returns the signal that stopped it, or None."""
        tc = self.tc
        self.amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None \
            else nullcontext()
        data = batches(self.dataset, tc, self.cfg.seed, self.step, self.device)  # from micro-batch step * accum
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, desc="train-tokenizer",
                   dynamic_ncols=True)
        self.t_last, self.seen = time.perf_counter(), 0
        self.vae.train()
        with StopRequested() as stop, bar, closing(data):  # bar: its line ends before an error; closing: workers
            while self.step < tc.steps and stop.signal is None:
                self.one_step(data)
                bar.update(1)
                if self.guard.diverged():
                    raise self.guard.stop(self.step, self.run_dir.verified)
                self.log(bar)
                if self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                    self.checkpoint()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    _reconstruction_grid(self.ema, self.dataset, self.device, self.cfg.seed,
                                         self.run_dir.samples_dir / f"step_{self.step:07d}.png")
            bar.close()
            self.checkpoint()
            return stop.signal

    def one_step(self, data) -> None:
        """One optimizer step of the autoencoder (the discriminator frozen), then, once it has joined, one of
        the discriminator on this step's reconstructions (LDM's second optimizer)."""
        tc, lc = self.tc, self.lc
        self.lr = lr = lr_at(self.step, tc, self.peak_lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.gan = gan = self.disc is not None and self.step >= lc.disc_start
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the generator's loss must not leave gradients in the discriminator
        total, parts_sum, recons, codes = 0.0, {}, [], []
        for _ in range(tc.grad_accum):
            images, _ = next(data)
            images = self.dataset.augment(images, self.generator)
            with self.amp:
                loss, parts = self.losses.generator_loss(self.vae, self.disc, images, self.generator, gan)
            (loss / tc.grad_accum).backward()
            total += float(loss.detach()) / tc.grad_accum
            recons.append((images, parts.pop("recon")))
            if "codes" in parts:  # VQ: this micro-batch's encoder outputs and picked codes
                codes.append(parts.pop("codes"))
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / tc.grad_accum
            self.seen += images.shape[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e30)
        ok = self.guard.check(self.step + 1, total, grad_norm)  # a non-finite step is skipped, counted, reported
        if ok:
            self.opt.step()
            ema_update(self.ema, self.vae, ema_decay_at(self.step, tc))
            if self.restarts is not None:
                parts_sum["restarted"] = self.restarts.update(self.step, codes, (self.vae, self.ema), self.opt,
                                                              self.generator)
        self.opt.zero_grad(set_to_none=True)
        self.d_total = self.discriminator_step(recons, lr) if gan and ok else 0.0
        self.total, self.parts_sum, self.grad_norm = total, parts_sum, grad_norm
        self.step += 1

    def discriminator_step(self, recons: list, lr: float) -> float:
        """The discriminator learns from this step's (images, reconstructions); returns its loss."""
        self.disc.requires_grad_(True)
        for group in self.disc_opt.param_groups:
            group["lr"] = self.lc.disc_lr or lr
        d_total = 0.0
        for images, recon in recons:
            with self.amp:
                d_loss = self.losses.discriminator_loss(self.disc, images, recon) / self.tc.grad_accum
            d_loss.backward()
            d_total += float(d_loss.detach())
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return d_total

    def log(self, bar) -> None:
        """A metrics line every ``log_every`` steps and at the last."""
        if not (self.step % self.tc.log_every == 0 or self.step == self.tc.steps):
            return
        now = time.perf_counter()
        last = {"step": self.step, "loss": self.total, **{k: round(v, 6) for k, v in self.parts_sum.items()},
                **({"d_loss": self.d_total} if self.gan else {}), "lr": self.lr, "grad_norm": float(self.grad_norm),
                "img_per_s": self.seen / max(now - self.t_last, 1e-9), "skipped": self.guard.total}
        self.run_dir.append_metrics(last)
        bar.set_postfix(l1=f"{self.parts_sum.get('l1', 0):.4f}", lr=f"{self.lr:.2e}", img_s=f"{last['img_per_s']:.0f}")
        self.t_last, self.seen = now, 0


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
