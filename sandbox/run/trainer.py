"""The training loop: one ``Trainer`` for every recipe, in named phases.

    prepare   the run directory's recipe check, the device, a finished run left as it is
    build     the recipe's parts, the speed paths, the EMA copy, AdamW, the data
    restore   a resumed run's weights, optimizer, guards and metrics log
    loop      one ``train_step`` per step: lr, step, EMA, guards, logging, checkpoints, grids
    finish    the end checkpoint, the loss curve and the final grid

Under torchrun every rank runs the same loop: the model is wrapped in DistributedDataParallel, each rank takes
its slices of every global batch, and rank 0 alone writes the run directory.

References:
    MAR official main_mar.py / engine_mar.py (optimizer groups, lr scaling, EMA after each step, grad clip 3.0).
"""
from __future__ import annotations

import copy
import signal
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
from jsonargparse import Namespace
from tqdm.auto import tqdm

from sandbox import __version__, fast
from sandbox.config.build import build
from sandbox.config.recipe import check_values, instantiate, recipe_dict, slot_classes
from sandbox.config.schema import TrainConfig
from sandbox.core.model import upgrade_key
from sandbox.core.sampling import check_head_steps
from sandbox.core.training import StepResult, train_step, training_loss
from sandbox.errors import UserError
from sandbox.eval.diagnostics import run_warnings
from sandbox.eval.samples import conditioning_for, generate_many
from sandbox.fast.sampling import speed_kwargs
from sandbox.fast.step_cache import check_cache
from sandbox.images.grids import class_grid, save_png
from sandbox.run import distributed
from sandbox.run.checkpoints import state_mismatch
from sandbox.run.data import ResumableBatchSampler, batches, seed_micro_batch
from sandbox.run.device import autocast_dtype, resolve_device
from sandbox.run.guards import BestMetric, NonFiniteGuard
from sandbox.run.monitor import TensorBoardLogger, plot_metrics
from sandbox.run.optim import (
    base_lr,
    ema_decay_at,
    ema_update,
    grouped_names,
    lr_at,
    make_adamw,
    optimizer_names,
    remap_optimizer_state,
)
from sandbox.run.resume import check_run_recipe, finished, grid_name, rng_state
from sandbox.run.rundir import RunDir
from sandbox.run.signals import StopRequested


def train(cfg: Namespace, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the recipe ``cfg`` in ``run_dir``. Returns a summary dict (``model``: the trained module;
    ``complete``, without a model, when the run had finished already; ``stopped`` after a signal)."""
    return Trainer(cfg, run_dir, progress).run()


def checkpoint_reserve(model: torch.nn.Module, tc: TrainConfig) -> int:
    """Disk bytes a run's checkpoints need at once: weights, EMA and AdamW's two moments (4x the
    parameters) per copy; copies: the kept ones (checkpoint-last.pt is a link to the newest) and
    checkpoint-prev.pt (a link to the one before, a copy of its own when fewer than 2 are kept): at least 2;
    the best one and the one being written."""
    size = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    return size * (max(tc.keep_checkpoints, 2) + 1 + (tc.best_metric is not None))


class Trainer:
    """One training run of a parsed recipe in a run directory (see the module docstring for the phases)."""

    def __init__(self, cfg: Namespace, run_dir: str | Path, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.dist = distributed.info()
        self.main = self.dist.is_main
        self.run_dir = RunDir(run_dir)
        self.recipe = recipe_dict(cfg)
        check_values(cfg)  # every value, before the run directory is touched
        self.tc: TrainConfig = instantiate(cfg, "train")
        self.step, self.tb, self.last = 0, None, {}

    # -- the phases ------------------------------------------------------------------------
    def run(self) -> dict:
        ckpt = self.prepare()
        if ckpt is not None and finished(self.run_dir, ckpt, self.tc.steps):  # nothing to do: leave it as it is
            if self.main and self.run_dir.recipe_damaged:  # but a damaged recipe.yaml: what was trained
                self.run_dir.write_recipe(ckpt["recipe"])
            if self.main:
                print(f"{self.run_dir.root} is complete: step {ckpt['step']} of {self.tc.steps} "
                      f"({self.run_dir.loaded_path.name}); raise --train.steps to train it longer")
            return {"step": int(ckpt["step"]), "run_dir": str(self.run_dir.root), "complete": True}
        self.build()
        if ckpt is not None:
            self.restore(ckpt)
        elif self.main:  # a run killed before its first checkpoint starts over, and so does its log
            self.run_dir.truncate_metrics(0)
        if self.main:  # only now: a resume refused above leaves the stored recipe as it was
            self.run_dir.write_recipe(self.recipe)
        self.last_good = self.run_dir.verified  # named when the run stops on non-finite numbers: checked ones only
        self.wrap()
        try:
            stopping = self.loop()
            return self.finish(stopping)
        finally:
            if self.tb is not None:
                self.tb.close()

    def prepare(self) -> dict | None:
        """Checks that need no model: the recipe against the run directory's, the accumulation count, the
        device and compiler; then the newest checkpoint, if any."""
        tc = self.tc
        check_run_recipe(self.run_dir, self.recipe, slot_classes(self.cfg))
        if tc.grad_accum < 1:
            raise UserError(f"--train.grad_accum must be >= 1, got {tc.grad_accum}")
        self.device = distributed.local_device(resolve_device(tc.device))
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        if tc.compile:
            from sandbox.fast.compile import check_compiler

            check_compiler(self.device)  # before the run directory is written
        # rank 0 logs; fails early when tensorboard is not installed
        self.tb = TensorBoardLogger(self.run_dir.root / "tensorboard") if tc.tensorboard and self.main else None
        return self.run_dir.load_latest(map_location=self.device)

    def build(self) -> None:
        """The recipe's parts on the device, the EMA copy, the optimizer, the grad scaler and the generator."""
        tc, cfg = self.tc, self.cfg
        self.exp = exp = build(cfg)
        self.grid_data()  # a dataset that cannot ask the condition for a class fails now, not at the final grid
        fast.apply(exp.model, tc.fast_paths, exp.model.config.attention)
        exp.model.head_fp32 = tc.head_fp32
        sc = instantiate(cfg, "sample")  # can the head follow the grids' settings? (before any write)
        check_head_steps(exp.model.head, sc.head_steps)
        check_cache(sc.cache, exp.model.backbone)
        # can the data fill a global batch? (before any write)
        ResumableBatchSampler(len(exp.dataset), tc.batch_size, cfg.seed, 0, 0, self.dist.world_size, tc.grad_accum)
        if self.main:
            self.run_dir.create(reserve_bytes=checkpoint_reserve(exp.model, tc))
        self.core = exp.model.to(self.device)  # the module itself; `self.model` is what the loop calls (maybe DDP)
        exp.tokenizer.to(self.device)
        if self.main:  # rank 0 reports
            for warning in run_warnings(exp, cfg.seed, self.device):  # latent std far from 1, tokens large for the head
                print(warning, file=sys.stderr, flush=True)
        self.ema = copy.deepcopy(self.core).eval().requires_grad_(False)
        self.global_batch = tc.batch_size * self.dist.world_size * tc.grad_accum
        self.peak_lr = base_lr(tc, self.dist.world_size)
        self.opt = make_adamw(self.core, tc.weight_decay, self.peak_lr, tuple(tc.betas))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)  # reseeded per micro-batch
        self.guard, self.best = NonFiniteGuard(tc.max_nonfinite_steps), BestMetric(tc.best_metric)

    def restore(self, ckpt: dict) -> None:
        """Continue from ``ckpt``: the same global batch, then every state the loop carries."""
        stored_batch, tc = ckpt.get("global_batch"), self.tc
        if stored_batch is not None and stored_batch != self.global_batch:
            raise UserError(
                f"{self.run_dir.root} was trained with a global batch of {stored_batch} images (per-rank batch x "
                f"ranks x grad_accum) but this run gives {tc.batch_size} x {self.dist.world_size} x {tc.grad_accum}"
                f" = {self.global_batch}; resume with the same global batch (e.g. change --train.grad_accum)")
        try:
            self.core.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
        except RuntimeError as e:
            raise UserError(f"checkpoint in {self.run_dir.ckpt_dir} does not fit this model: "
                            f"{state_mismatch(e)}") from e
        self.opt.load_state_dict(self.optimizer_state(ckpt))
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        if "guards" in ckpt:
            self.guard.load_state_dict(ckpt["guards"]["nonfinite"])
            self.best.load_state_dict(ckpt["guards"]["best"])
        if self.main:
            self.run_dir.truncate_metrics(self.step)  # a killed run logged steps past its checkpoint: redone now
            print(f"resuming {self.run_dir.root} from step {self.step} ({self.run_dir.loaded_path.name})")

    def optimizer_state(self, ckpt: dict) -> dict:
        """The checkpoint's optimizer state for this model, mapped by parameter name when the layout changed
        (checkpoints before 0.3 store no names: their model state dict's keys, renamed, give them)."""
        saved = ckpt.get("param_names")
        if saved is None:
            saved = [upgrade_key(n) for n in grouped_names(ckpt["model"].items())]
        names = optimizer_names(self.core)
        if saved == names:
            return ckpt["optimizer"]
        try:
            return remap_optimizer_state(ckpt["optimizer"], saved, names)
        except ValueError as e:
            raise UserError(f"checkpoint in {self.run_dir.ckpt_dir}: {e}") from e

    def wrap(self) -> None:
        """Compile (``train.compile``) and, on several ranks, wrap in DistributedDataParallel."""
        if self.tc.compile:
            from sandbox.fast.compile import compile_blocks, compile_sampling

            compile_blocks(self.core)
            compile_sampling(self.ema)  # the training grids sample with the EMA weights
        self.model = self.core
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # DDP broadcasts rank 0's weights at construction and averages gradients in backward
            self.model = DDP(self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def loop(self) -> bool:
        """Train until ``train.steps`` or a stop signal; True when a signal stopped it."""
        tc = self.tc
        self.data = batches(self.exp.dataset, tc, self.cfg.seed, self.step, self.device, self.dist, labelled=True)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.main), desc="train",
                   dynamic_ncols=True)
        self.t_last, self.seen = time.perf_counter(), 0
        self.model.train()
        # the bar ends its line before an error is printed; closing the data stops its loader workers
        with StopRequested() as stop, bar, closing(self.data):
            self.stop, stopping = stop, False
            while self.step < tc.steps and not stopping:
                result, stopping = self.one_step()
                bar.update(1)
                self.log(result, bar)
                if self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                    self.checkpoint()
                if self.main and tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    self.sample_grid(grid_name(self.step))
            bar.close()
            self.checkpoint("signal" if stopping else "end")
            self.curve = None
            if self.main:
                self.curve = plot_metrics(self.run_dir.metrics_path, self.run_dir.root / "loss_curve.png",
                                          title=f"{self.run_dir.root.name}: training metrics")
        return stopping

    def finish(self, stopping: bool) -> dict:
        """After the loop: the signal's report, or the final grid and the summary."""
        root = str(self.run_dir.root)
        if stopping:
            signum = int(self.stop.signal or signal.SIGTERM)  # a rank without a signal stops because another got one
            if self.main:
                print(f"stopped by signal {signum} at step {self.step}; checkpoint saved in {self.run_dir.ckpt_dir}")
            return {"step": self.step, "stopped": True, "signal": signum, "run_dir": root, "model": self.core}
        summary = {"step": self.step, "run_dir": root, "final_loss": self.last.get("loss"), "model": self.core,
                   "loss_curve": str(self.curve) if self.curve else None}
        if self.main:
            grid = self.sample_grid(grid_name(self.step))
            (self.run_dir.samples_dir / "final.png").write_bytes(grid.read_bytes())
            summary["grid"] = str(grid)
        return summary

    # -- one step ----------------------------------------------------------------------------
    def one_step(self) -> tuple[StepResult, bool]:
        """One optimizer step (``sandbox.core.training.train_step``); returns it and whether to stop."""
        tc, dist = self.tc, self.dist
        lr = lr_at(self.step, tc, self.peak_lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        stop_votes = [0.0]

        def forward(a: int) -> torch.Tensor:
            images, labels = next(self.data)
            seed_micro_batch(self.generator, self.cfg.seed, self.step, a * dist.world_size + dist.rank)
            self.seen += images.shape[0] * dist.world_size
            with amp:
                return training_loss(self.exp, self.model, images, labels, self.generator)

        def reduce_loss(total: float) -> float:
            # one small all-reduce: the mean loss over the ranks (logged, and checked by the guard, so every rank
            # takes the same decision) and whether any rank was asked to stop (all leave at the same step)
            total, stop_votes[0] = distributed.all_reduce_sum([total, float(self.stop.signal is not None)],
                                                              self.device)
            return total / dist.world_size

        def accept(loss: float, grad_norm: torch.Tensor) -> bool:  # a non-finite step is skipped and counted
            return self.guard.check(self.step + 1, loss, grad_norm)

        result = train_step(forward, self.opt, self.core.parameters(), accum=tc.grad_accum, scaler=self.scaler,
                            grad_clip=tc.grad_clip, no_sync=self.model.no_sync if dist.enabled else None,
                            reduce_loss=reduce_loss, accept=accept)
        if result.applied:
            ema_update(self.ema, self.core, ema_decay_at(self.step, tc))
            self.best.add({"loss": result.loss})
        self.step += 1
        self.lr = lr
        if self.guard.diverged():
            raise self.guard.stop(self.step, self.last_good)
        return result, stop_votes[0] > 0

    def log(self, result: StepResult, bar) -> None:
        """A metrics line (rank 0) every ``log_every`` steps and at the last."""
        tc = self.tc
        if not (self.main and (self.step % tc.log_every == 0 or self.step == tc.steps)):
            return
        now = time.perf_counter()
        self.last = {"step": self.step, "loss": result.loss, "lr": self.lr, "grad_norm": float(result.grad_norm),
                     "img_per_s": self.seen / max(now - self.t_last, 1e-9), "skipped": self.guard.total}
        self.run_dir.append_metrics(self.last)
        if self.tb is not None:
            self.tb.scalars(self.last)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{self.lr:.2e}", img_s=f"{self.last['img_per_s']:.0f}")
        self.t_last, self.seen = now, 0

    def checkpoint(self, why: str = "interval") -> None:
        """Save; ``why``: "interval" (skipped during a streak of non-finite steps, so the newest checkpoint
        stays the last good one), "end", or "signal" (does not close a best-metric interval, so a stopped
        and resumed run keeps the same best checkpoint as an uninterrupted one)."""
        if why == "interval" and self.guard.consecutive:
            return
        is_best = self.best.close_interval(self.step) if why != "signal" else False  # same state on every rank
        if not self.main:  # rank 0 writes; the weights are the same on every rank
            return
        self.last_good = self.run_dir.save({
            "model": self.core.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "skipped": self.guard.total,
            "rng": rng_state(self.generator),
            "guards": {"nonfinite": self.guard.state_dict(), "best": self.best.state_dict()},
            "param_names": optimizer_names(self.core),
            "global_batch": self.global_batch, "world_size": self.dist.world_size, "ended": why == "end",
            "recipe": self.recipe, "meta": self.exp.meta, "version": __version__,
        }, self.step, self.tc.keep_checkpoints, best=is_best)

    def grid_data(self):
        """(labels: one row per class, the data that asks for them: the labels, or the dataset's prompts)."""
        sc = instantiate(self.cfg, "sample")
        k = min(sc.grid_classes, self.exp.num_classes)
        labels = torch.arange(k).repeat_interleave(sc.grid_per_class)  # one row per class
        return labels, conditioning_for(self.exp.model.condition, self.exp.dataset, labels)

    def sample_grid(self, tag: str) -> Path:
        """A grid of EMA samples, one row per class, into samples/<tag>.png (and TensorBoard)."""
        sc = instantiate(self.cfg, "sample")
        labels, data = self.grid_data()
        images = generate_many(self.exp, data, batch_size=max(len(labels), 1), seed=self.cfg.seed, model=self.ema,
                               num_iter=sc.num_iter, cfg=sc.cfg, cfg_schedule=sc.cfg_schedule,
                               temperature=sc.temperature, autocast_dtype=self.amp_dtype,
                               **speed_kwargs(sc.head_steps, sc.cache))
        path, grid = self.run_dir.samples_dir / f"{tag}.png", class_grid(images, labels)
        save_png(grid, path)
        if self.tb is not None:
            self.tb.image("samples", grid, self.step)
        return path
