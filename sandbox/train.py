"""The training core: data -> tokenizer -> ordering -> MAR -> head.loss, for every recipe.

One loop for every plugin combination: a batch of images becomes a latent
(tokenizer), a token sequence with a visible/loss split (ordering), per-
position conditions (transformer) and a loss (head). Around it: AdamW with
the official no-decay groups, lr warmup and schedule, grad clipping, EMA,
autocast, atomic checkpoints, exact resume, a JSONL metrics log, sample grids.

References:
    MAR official main_mar.py / engine_mar.py (optimizer groups, lr scaling, EMA, grad clip);
    Goyal et al. 2017 (lr = blr * batch / 256).
"""
from __future__ import annotations

import copy
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from jsonargparse import Namespace
from torch import Tensor, nn
from tqdm.auto import tqdm

from sandbox import __version__, distributed
from sandbox.checkpoint import RunDir, state_mismatch
from sandbox.diagnostics import run_warnings
from sandbox.errors import UserError
from sandbox.generate import generate_many
from sandbox.guards import check_images, check_labels, check_split
from sandbox.images import class_grid, save_png
from sandbox.mar import xformers_available
from sandbox.monitor import TensorBoardLogger, plot_metrics
from sandbox.recipe import (Experiment, TrainConfig, build, instantiate, one_line, parse_recipe, recipe_dict,
                            recipe_parser)
from sandbox.reliability import BestMetric, NonFiniteGuard

# recipe keys that may change when a run resumes (they do not change what is being trained)
# (precision and the fp32 head are here too: switching them is how a run that diverged resumes from its last
# good checkpoint; `plugins` only says where the plugin files are, class paths and init_args say what is trained)
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.num_workers",
                  "train.device", "train.keep_checkpoints", "train.best_metric", "train.max_nonfinite_steps",
                  "train.precision", "train.head_fp32", "train.tensorboard", "sample", "plugins",
                  # how the global batch is split (per-rank batch x ranks x accumulation) and how it is computed;
                  # the global batch itself is checked against the checkpoint's
                  "train.batch_size", "train.grad_accum", "train.compile", "model.grad_checkpointing",
                  "model.attention", "head.init_args.grad_checkpointing"}


# --------------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule
# --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available; use --train.device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Official MAR groups: no decay on biases, 1-D parameters (norms, embeddings' vectors) and the head."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.startswith("head.") or ".head." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused (one kernel over all parameters) on CPU and CUDA: the same update
    within float rounding (~1e-8); on the CPU the fixture model's 92 tensors take 0.9 instead of 4.1 ms per
    step (the default loops over the tensors there)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def base_lr(tc: TrainConfig, world_size: int = 1) -> float:
    """lr = blr * global batch / 256 unless an absolute lr is given."""
    if tc.lr is not None:
        return tc.lr
    return tc.blr * tc.batch_size * tc.grad_accum * world_size / 256


def lr_at(step: int, tc: TrainConfig, peak: float) -> float:
    """Linear warmup to ``peak``, then constant (official) or cosine down to ``min_lr``."""
    if step < tc.warmup_steps:
        return peak * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return peak
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.min_lr + (peak - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def ema_decay_at(step: int, tc: TrainConfig) -> float:
    return min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay


# --------------------------------------------------------------------------------------
# Data: epoch-seeded permutations that can restart at any step
# --------------------------------------------------------------------------------------
class ResumableBatchSampler(torch.utils.data.Sampler):
    """One rank's micro-batches of per-epoch permutations seeded by (seed, epoch), from any micro-batch on.

    Replaces ``DistributedSampler``, which deals each rank every world_size-th index of the
    permutation (so what a rank sees depends on how many ranks there are) and can only start an
    epoch at its beginning. Here each global batch (batch_size x world_size x accum images) is a
    contiguous slice of the permutation, cut into world_size x accum micro-batches; global
    micro-batch j = a * world_size + rank goes to ``rank`` at accumulation step a. So the same
    global batches are drawn whatever the split into ranks and accumulation steps, and a resumed
    run -- on any number of ranks -- continues exactly where the last one stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.global_batch = batch_size * world_size * accum
        if n < self.global_batch:
            raise UserError(f"the dataset has {n} images, fewer than one global batch ({self.global_batch} = "
                            f"{batch_size} per rank x {world_size} ranks x {accum} accumulation steps); "
                            "lower --train.batch_size or --train.grad_accum")
        self.per_epoch = n // self.global_batch  # optimizer steps per epoch; the ragged end is dropped (official)

    def __iter__(self):
        k = self.start  # this rank's micro-batch counter: step * accum + a
        while True:
            epoch, rest = divmod(k, self.per_epoch * self.accum)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for kk in range(rest, self.per_epoch * self.accum):
                s, a = divmod(kk, self.accum)
                lo = s * self.global_batch + (a * self.world_size + self.rank) * self.batch_size
                yield perm[lo : lo + self.batch_size].tolist()
            k = (epoch + 1) * self.per_epoch * self.accum

    def __len__(self) -> int:  # infinite stream; len is one epoch for DataLoader's bookkeeping
        return self.per_epoch * self.accum


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGINT/SIGTERM (a Ctrl-C reaches the whole process group): the main process
    finishes its step, saves a checkpoint and shuts them down, instead of dying on a lost worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(dataset, tc: TrainConfig, seed: int, start_step: int, device: torch.device,
            dist_info: distributed.DistInfo = distributed.DistInfo(), labelled: bool = False):
    """(images, labels) micro-batches on ``device`` from micro-batch ``start_step * grad_accum`` on; ``labelled``:
    the labels condition the model, so each batch's are checked against the dataset's classes first."""
    start_micro = start_step * tc.grad_accum
    sampler = ResumableBatchSampler(len(dataset), tc.batch_size, seed, start_micro, dist_info.rank,
                                    dist_info.world_size, tc.grad_accum)
    # the loader draws its worker base seed from `generator`, not from the global RNG that dropout uses
    # (otherwise creating it after a resume would shift every later dropout mask)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=tc.num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed + start_micro),
                                         worker_init_fn=_ignore_stop_signals if tc.num_workers > 0 else None)
    for images, labels in loader:
        if labelled:
            check_labels(dataset, labels)  # on the CPU, before they move: no device sync
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------
# One step of the core
# --------------------------------------------------------------------------------------
def training_loss(exp: Experiment, model: nn.Module, images: Tensor, labels: Tensor,
                  generator: torch.Generator | None) -> Tensor:
    """images (B,3,H,W) (or a latent cache's items), labels (B,) -> scalar loss. ``model`` may be DDP-wrapped."""
    with torch.no_grad():
        images = exp.dataset.augment(images, generator) if exp.dataset is not None else images
        if exp.dataset is not None and exp.dataset.provides == "moments":  # a latent cache: no encoder pass
            latent = exp.tokenizer.latent_from_moments(images, generator, sample=True)  # (B, c, h*p, w*p)
        else:
            if exp.dataset is not None:
                check_images(exp.dataset, images, exp.image_size)
            latent = exp.tokenizer.encode(images, generator, sample=True)  # (B, c, h*p, w*p)
        seq = exp.ordering.to_sequence(exp.tokenizer.to_tokens(latent))  # (B, L, C)
        split = exp.ordering.training_split(seq, generator)
        check_split(exp.ordering, split, seq)
    return model(seq, split, labels, generator)


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_micro_batch(generator: torch.Generator, seed: int, step: int, micro: int) -> None:
    """Seed the randomness of global micro-batch ``micro`` of ``step``: the trainer's generator (masks,
    label drop, timesteps, noise) and torch's global RNG (dropout).

    Keyed by what is computed rather than by who computes it, so 1 process with accumulation 2 and
    2 processes without draw the same numbers for the same images, and a resumed run (on any
    number of ranks) draws what an uninterrupted one would without restoring RNG state.
    """
    generator.manual_seed(distributed.derive_seed(seed, step, micro))
    torch.manual_seed(distributed.derive_seed(seed, step, micro, "dropout"))


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS):
                continue
            out += _differences(a.get(k), b.get(k), key)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def check_run_recipe(run: RunDir, recipe: dict) -> None:
    """Refuse to continue a run directory that holds a different recipe (the resumable keys aside)."""
    if not run.exists():
        return
    diffs = _differences(run.read_recipe(), recipe)
    if diffs:
        raise UserError(f"run directory {run.root} holds a different recipe ({'; '.join(diffs[:3])}); "
                        "use a new --run_dir or the stored recipe")


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
class _StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def grid_name(step: int) -> str:
    """The sample grid drawn at ``step`` (samples/<name>.png)."""
    return f"step_{step:07d}"


def finished(run: RunDir, ckpt: dict, steps: int) -> bool:
    """Whether a run reached ``steps`` and did its end work: the end checkpoint, then the final grid (a run
    stopped by a signal in its last step, or whose final grid failed, still does them when rerun)."""
    step = int(ckpt["step"])
    return step >= steps and bool(ckpt.get("ended")) and (run.samples_dir / f"{grid_name(step)}.png").is_file()


def checkpoint_reserve(model: nn.Module, tc: TrainConfig) -> int:
    """Disk bytes a run's checkpoints need at once: weights, EMA and AdamW's two moments (4x the
    parameters) per copy; copies: the kept ones (checkpoint-last.pt is a link to the newest), the best
    one and the one being written."""
    size = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    return size * (max(tc.keep_checkpoints, 1) + 1 + (tc.best_metric is not None))


def train(cfg: Namespace, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the recipe ``cfg`` in ``run_dir``. Returns a summary dict (``model``: the trained module;
    ``complete``, without a model, when the run had finished already).

    Under torchrun (see ``sandbox.distributed.session``) every rank runs this function: the model is
    wrapped in DistributedDataParallel, each rank takes its slices of every global batch, and rank 0
    alone writes the run directory (recipe, metrics, checkpoints, grids).
    """
    dist_info = distributed.info()
    main = dist_info.is_main
    run = RunDir(run_dir)
    recipe = recipe_dict(cfg)
    check_run_recipe(run, recipe)
    tc: TrainConfig = instantiate(cfg, "train")
    if tc.grad_accum < 1:
        raise UserError(f"--train.grad_accum must be >= 1, got {tc.grad_accum}")
    device = distributed.local_device(resolve_device(tc.device))
    amp_dtype = autocast_dtype(tc.precision, device)
    if tc.compile:
        from sandbox.model import check_compiler

        check_compiler(device)  # before the run directory is written
    # rank 0 logs; fails early when tensorboard is not installed
    tb = TensorBoardLogger(run.root / "tensorboard") if tc.tensorboard and main else None
    ckpt = run.load_latest(map_location=device)
    if ckpt is not None and finished(run, ckpt, tc.steps):  # nothing to do: leave the run as it is
        if main:
            print(f"{run.root} is complete: step {ckpt['step']} of {tc.steps} ({run.loaded_path.name}); "
                  "raise --train.steps to train it longer")
        return {"step": int(ckpt["step"]), "run_dir": str(run.root), "complete": True}
    exp = build(cfg)
    exp.model.head_fp32 = tc.head_fp32
    # can the data fill a global batch? (before any write)
    ResumableBatchSampler(len(exp.dataset), tc.batch_size, cfg.seed, 0, 0, dist_info.world_size, tc.grad_accum)
    if main:
        run.create(reserve_bytes=checkpoint_reserve(exp.model, tc))

    core = exp.model.to(device)  # the module itself; `model` is what the loop calls (DDP-wrapped on several ranks)
    exp.tokenizer.to(device)
    if main:  # rank 0 reports
        for warning in run_warnings(exp, cfg.seed, device):  # latent std far from 1, tokens large for the head
            print(warning, file=sys.stderr, flush=True)
    ema = copy.deepcopy(core).eval().requires_grad_(False)
    global_batch = tc.batch_size * dist_info.world_size * tc.grad_accum
    peak_lr = base_lr(tc, dist_info.world_size)
    opt = make_adamw(core, tc.weight_decay, peak_lr, tuple(tc.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device).manual_seed(cfg.seed)  # reseeded per micro-batch (seed_micro_batch)

    step, guard, best = 0, NonFiniteGuard(tc.max_nonfinite_steps), BestMetric(tc.best_metric)
    if ckpt is not None:
        stored_batch = ckpt.get("global_batch")
        if stored_batch is not None and stored_batch != global_batch:
            raise UserError(
                f"{run.root} was trained with a global batch of {stored_batch} images (per-rank batch x ranks x "
                f"grad_accum) but this run gives {tc.batch_size} x {dist_info.world_size} x {tc.grad_accum} = "
                f"{global_batch}; resume with the same global batch (e.g. change --train.grad_accum)")
        try:
            core.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        except RuntimeError as e:
            raise UserError(f"checkpoint in {run.ckpt_dir} does not fit this model: {state_mismatch(e)}") from e
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        if "guards" in ckpt:
            guard.load_state_dict(ckpt["guards"]["nonfinite"])
            best.load_state_dict(ckpt["guards"]["best"])
        if main:
            run.truncate_metrics(step)  # a killed run logged steps past its checkpoint; they are redone now
            print(f"resuming {run.root} from step {step} ({run.loaded_path.name})")
    if main:  # only now: a resume refused above leaves the stored recipe as it was
        run.write_recipe(recipe)
    last_good = run.loaded_path  # named when the run stops on non-finite numbers

    if tc.compile:
        from sandbox.model import compile_blocks, compile_sampling

        compile_blocks(core)
        compile_sampling(ema)  # the training grids sample with the EMA weights
    model = core
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's weights at construction and averages gradients in backward
        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(why: str = "interval") -> None:
        """Save; ``why``: "interval" (skipped during a streak of non-finite steps, so the newest checkpoint
        stays the last good one), "end", or "signal" (does not close a best-metric interval, so a stopped
        and resumed run keeps the same best checkpoint as an uninterrupted one)."""
        nonlocal last_good
        if why == "interval" and guard.consecutive:
            return
        is_best = best.close_interval(step) if why != "signal" else False  # every rank keeps the same state
        if not main:  # rank 0 writes; the weights are the same on every rank
            return
        last_good = run.save({
            "model": core.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "skipped": guard.total, "rng": rng_state(generator),
            "guards": {"nonfinite": guard.state_dict(), "best": best.state_dict()},
            "global_batch": global_batch, "world_size": dist_info.world_size, "ended": why == "end",
            "recipe": recipe, "meta": exp.meta, "version": __version__,
        }, step, tc.keep_checkpoints, best=is_best)

    def sample_grid(tag: str) -> Path:
        sc = instantiate(cfg, "sample")
        k = min(sc.grid_classes, exp.num_classes)
        labels = torch.arange(k).repeat_interleave(sc.grid_per_class)  # one row per class
        images = generate_many(exp, labels, batch_size=max(len(labels), 1), seed=cfg.seed, model=ema,
                               num_iter=sc.num_iter, cfg=sc.cfg, cfg_schedule=sc.cfg_schedule,
                               temperature=sc.temperature, autocast_dtype=amp_dtype)
        path, grid = run.samples_dir / f"{tag}.png", class_grid(images, labels)
        save_png(grid, path)
        if tb is not None:
            tb.image("samples", grid, step)
        return path

    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    data = batches(exp.dataset, tc, cfg.seed, step, device, dist_info, labelled=True)
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and main), desc="train", dynamic_ncols=True)
    t_last, seen, last = time.perf_counter(), 0, {}
    model.train()
    with _StopRequested() as stop, bar:  # the bar ends its line before an error is printed
        stopping = False
        while step < tc.steps and not stopping:
            lr = lr_at(step, tc, peak_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for a in range(tc.grad_accum):
                images, labels = next(data)
                seed_micro_batch(generator, cfg.seed, step, a * dist_info.world_size + dist_info.rank)
                # gradients are averaged over the ranks once per optimizer step, not per micro-batch
                sync = a == tc.grad_accum - 1 or not dist_info.enabled
                with nullcontext() if sync else model.no_sync():
                    with amp:
                        loss = training_loss(exp, model, images, labels, generator) / tc.grad_accum
                    scaler.scale(loss).backward()
                total += loss.item()
                seen += images.shape[0] * dist_info.world_size
            # one small all-reduce: the mean loss over the ranks (logged, and checked by the guard, so every rank
            # takes the same decision) and whether any rank was asked to stop (all leave at the same step)
            total, n_stop = distributed.all_reduce_sum([total, float(stop.signal is not None)], device)
            total /= dist_info.world_size
            stopping = n_stop > 0
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e30)
            if guard.check(step + 1, total, grad_norm):
                scaler.step(opt)
                ema_update(ema, core, ema_decay_at(step, tc))
                best.add({"loss": total})
            scaler.update()  # fp16: backs the scale off after an overflow; a no-op otherwise
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if guard.diverged():
                raise guard.stop(step, last_good)

            if main and (step % tc.log_every == 0 or step == tc.steps):
                now = time.perf_counter()
                last = {"step": step, "loss": total, "lr": lr, "grad_norm": float(grad_norm),
                        "img_per_s": seen / max(now - t_last, 1e-9), "skipped": guard.total}
                run.append_metrics(last)
                if tb is not None:
                    tb.scalars(last)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", img_s=f"{last['img_per_s']:.0f}")
                t_last, seen = now, 0
            if step % tc.ckpt_every == 0 and step < tc.steps:
                checkpoint()
            if main and tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                sample_grid(grid_name(step))
        bar.close()
        checkpoint("signal" if stopping else "end")
        curve = None
        if main:
            curve = plot_metrics(run.metrics_path, run.root / "loss_curve.png",
                                 title=f"{run.root.name}: training metrics")
        if stopping:
            signum = int(stop.signal or signal.SIGTERM)  # a rank without a signal stops because another got one
            if tb is not None:
                tb.close()
            if main:
                print(f"stopped by signal {signum} at step {step}; checkpoint saved in {run.ckpt_dir}")
            return {"step": step, "stopped": True, "signal": signum, "run_dir": str(run.root), "model": core}
    summary = {"step": step, "run_dir": str(run.root), "final_loss": last.get("loss"), "model": core,
               "loss_curve": str(curve) if curve else None}
    if main:
        grid = sample_grid(grid_name(step))
        (run.samples_dir / "final.png").write_bytes(grid.read_bytes())
        summary["grid"] = str(grid)
    if tb is not None:
        tb.close()
    return summary


def load_run(run_dir: str | Path, use_ema: bool = True, device: str = "auto", head_args: dict | None = None,
             compile: bool = False) -> tuple[Experiment, nn.Module, dict]:
    """Rebuild a run's parts from its last checkpoint alone. Returns (experiment, model to sample, checkpoint).

    ``head_args`` overrides the head's init_args (sampling options such as a head's sampler or step count);
    the overridden recipe is type-checked like any recipe and must still fit the checkpoint. ``compile``: the
    head samples through ``torch.compile`` (``sandbox.model.compile_sampling``).
    """
    run = RunDir(run_dir).require()
    ckpt = run.load_latest()
    if ckpt is None:
        raise UserError(f"{run.root} has no checkpoint yet; train it first")
    cfg = parse_recipe(ckpt["recipe"], origin=f"the recipe of {run.root}")
    if head_args:
        recipe = copy.deepcopy(ckpt["recipe"])
        recipe["head"].setdefault("init_args", {}).update(head_args)
        try:
            cfg = recipe_parser().parse_object(recipe)
        except Exception as e:
            raise UserError(f"--head_args {head_args} do not fit head {recipe['head']['class_path']}: "
                            f"{one_line(e)}") from e
    if cfg.model.attention == "xformers" and not xformers_available():
        cfg.model.attention = "sdpa"  # same math; a run trained on GPUs with xformers still samples anywhere
    exp = build(cfg, meta=ckpt["meta"])
    exp.model.head_fp32 = instantiate(cfg, "train").head_fp32
    state = ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"]
    try:
        exp.model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint of {run.root} does not fit its recipe's model: {state_mismatch(e)}") from e
    dev = distributed.local_device(resolve_device(device))
    exp.model.to(dev).eval()
    exp.tokenizer.to(dev)
    if compile:
        from sandbox.model import compile_sampling

        compile_sampling(exp.model)
    return exp, exp.model, ckpt
