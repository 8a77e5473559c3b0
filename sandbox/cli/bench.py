"""``sandbox bench``: training and sampling speed and peak memory of the MAR core, as JSON.

Measures the model, not the input pipeline: training steps run on random
token sequences (what a tokenizer or a latent cache hands the core; the
official ``engine_mar`` likewise times the model on VAE latents) and
sampling stops at tokens (no tokenizer decode). A training step is the
trainer's: the ordering's split, forward, backward, grad clipping and an
AdamW step (no EMA, no data loading). Peak memory is the process's peak
resident set on the CPU (reset before each phase through
``/proc/self/clear_refs``; the lifetime peak where that is unavailable) and
``torch.cuda.max_memory_allocated`` on a GPU.

    sandbox bench --recipe recipes/quickstart.yaml
    sandbox bench --official_config ../shared/fixtures/official_mar_latent.pt --batch_size 64 \
        --num_iter 16 --num_sampling_steps 50 --cfg 3.0
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.errors import UserError

NAME = "bench"
HELP = "Time training and sampling of a recipe's (or an official configuration's) model; print JSON."
ORDER = 40


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--recipe", type=str | None, default=None, help="A recipe YAML (its model, head and ordering).")
    p.add_argument("--official_config", type=str | None, default=None,
                   help="A .pt file holding an official MAR `config` dict (e.g. a parity fixture), or mar_base, "
                        "mar_large, mar_huge (the released sizes at ImageNet 256); random weights.")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
    p.add_argument("--precision", type=str | None, default=None,
                   help="auto, fp32, bf16 or fp16 (default: the recipe's; auto for an official config).")
    p.add_argument("--batch_size", type=int, default=64, help="Training batch (0 skips training).")
    p.add_argument("--steps", type=int, default=10, help="Timed training steps (after --warmup).")
    p.add_argument("--warmup", type=int, default=2,
                   help="Untimed training steps first (allocator, compile); > 0 also runs one untimed small "
                        "sampling call before the timed ones.")
    p.add_argument("--sample_batch_size", type=int, default=64, help="Images per sampling call (0 skips sampling).")
    p.add_argument("--sample_batches", type=int, default=1, help="Timed sampling calls.")
    p.add_argument("--num_iter", type=int | None, default=None, help="Sampling steps (default: recipe's, else 64).")
    p.add_argument("--num_iter_sweep", type=list[int] | None, default=None,
                   help="Also time sampling at each of these step counts, e.g. [8,16,32,64]: images/s against "
                        "steps (the MAR paper's Fig. 6; .ci/measure_speed.sh draws it).")
    p.add_argument("--backbone", type=str | None, default=None,
                   help="A backbone class (e.g. CausalBackbone) in place of the recipe's or the official config's, "
                        "at the same model settings (random weights).")
    p.add_argument("--backbone_args", type=dict | None, default=None,
                   help="Its init_args, e.g. '{use_cache: false}' (with --backbone).")
    p.add_argument("--num_sampling_steps", type=int | None, default=None,
                   help="Diffusion steps per token (default: the recipe's head / the official config's).")
    p.add_argument("--cfg", type=float | None, default=None, help="Guidance scale (default: the recipe's, else 1.0).")
    p.add_argument("--temperature", type=float | None, default=None,
                   help="Head temperature (default: the recipe's, else 1.0).")
    p.add_argument("--head_steps", type=Optional[Union[int, str, list[int]]], default=None,
                   help="The head's steps per plan step, e.g. linear:50:5 (default: the recipe's; `sandbox sample "
                        "--help` has the syntax).")
    p.add_argument("--cache", type=str | None, default=None,
                   help="Reuse across plan steps: off, exact or approx:N[:W] (default: the recipe's, else off).")
    p.add_argument("--grad_checkpointing", type=bool | None, default=None,
                   help="Recompute transformer and head blocks in backward (default: the recipe's).")
    p.add_argument("--compile", type=bool | None, default=None,
                   help="torch.compile the blocks and the head's sampling step (default: the recipe's).")
    p.add_argument("--compile_sampling", type=bool | None, default=None,
                   help="torch.compile the head's sampling step alone (default: as --compile); on the CPU it "
                        "speeds sampling up, where compiled blocks do not (README, Performance).")
    p.add_argument("--attention", type=str | None, default=None, help="sdpa or xformers (default: the recipe's).")
    p.add_argument("--fast_paths", type=bool, default=True,
                   help="The speed paths of sandbox.fast (false: the plain PyTorch model).")
    p.add_argument("--seed", type=int, default=0, help="Fixes the random weights and inputs.")
    p.add_argument("--json", type=str | None, default=None, help="Also write the result to this file.")
    p.add_argument("--profile", type=str | None, default=None,
                   help="After timing, run --profile_steps more training steps and one sampling call under "
                        "torch.profiler and write its table of operators (most device time first) to this file.")
    p.add_argument("--profile_steps", type=int, default=3, help="Training steps under the profiler.")
    p.add_argument("--pareto", type=str | None, default=None,
                   help="RUN: a quality-speed map of a trained run instead (sandbox/eval/pareto.py): every point of "
                        "--pareto_grid scored as `sandbox sweep` scores it and timed in this process; writes "
                        "RUN/sweeps/NAME/pareto.{json,md,png}.")
    p.add_argument("--pareto_grid", type=dict | None, default=None,
                   help="Sampling options and their values: those of `sandbox sweep --grid` (a head's fields "
                        "too, e.g. sampler); default: num_iter [4, 8, 16] x head_steps [100%, linear:100%:10%] x "
                        "cache [off, approx:2].")
    p.add_argument("--pareto_seeds", type=int, default=3, help="Seeds per point (mean +- std).")
    p.add_argument("--pareto_images", type=int, default=1000, help="Samples per seed (the digits tables' count).")
    p.add_argument("--pareto_timing_images", type=int, default=256, help="Images timed per point.")
    p.add_argument("--pareto_name", type=str, default="pareto", help="The sweep's folder RUN/sweeps/NAME.")
    return p


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a phase: CUDA max allocated on a GPU, the process's peak RSS on the CPU."""

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets VmHWM, the peak RSS, to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_peak_rss_since_start"

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# The protocol (shared with .ci/bench_official.py, so the two implementations are timed alike)
# --------------------------------------------------------------------------------------
def time_training(loss_fn, model, opt, batch_size: int, warmup: int, steps: int, memory: PeakMemory,
                  device, profiles: list[str] | None = None, profile_steps: int = 3, label: str = "training",
                  grad_clip: float = 3.0) -> dict:
    """``warmup`` untimed, then ``steps`` timed training steps -- the trainer's ``train_step``
    (sandbox/core/training.py): ``loss_fn()`` (forward, under the caller's autocast), backward, clipping at
    ``grad_clip`` (3.0: the official max norm), the optimizer step. With a ``profiles`` list, then
    ``profile_steps`` more under the profiler, whose table (``profile_ops``) is appended to it."""
    from sandbox.core.training import train_step

    def step() -> float:
        return train_step(lambda _: loss_fn(), opt, model.parameters(), grad_clip=grad_clip).loss

    memory.reset()
    for _ in range(warmup):
        step()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ms = 1000 * seconds / steps
    result = {"ms_per_step": round(ms, 2), "images_per_s": round(batch_size * 1000 / ms, 2),
              "peak_memory_mb": round(memory.peak_mb(), 1),
              "final_loss": float(loss) if math.isfinite(float(loss)) else None,
              "cpu_ms_per_step": round(1000 * cpu / steps, 2)}
    if profiles is not None:
        profiles.append(profile_ops(step, profile_steps, device, f"{label}, batch {batch_size}"))
    return result


def time_sampling(sample_fn, batch_size: int, batches: int, warmup_fn, memory: PeakMemory, device,
                  profiles: list[str] | None = None, label: str = "sampling") -> dict:
    """``warmup_fn()`` untimed when given (one-time work: compiling, cached embeddings, the allocator), then
    ``batches`` timed calls of ``sample_fn()``, each ``batch_size`` images. With a ``profiles`` list, then
    one more call under the profiler, whose table (``profile_ops``) is appended to it."""
    memory.reset()
    t0 = time.perf_counter()
    if warmup_fn is not None:
        warmup_fn()
    _sync(device)
    warmup_seconds = time.perf_counter() - t0  # what one-time work cost (with --compile: mostly compiling)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        sample_fn()
    _sync(device)
    seconds = (time.perf_counter() - t0) / batches
    cpu = (time.process_time() - c0) / batches
    result = {"seconds": round(seconds, 3), "images_per_s": round(batch_size / seconds, 2),
              "peak_memory_mb": round(memory.peak_mb(), 1), "cpu_seconds": round(cpu, 3),
              "warmup_seconds": round(warmup_seconds, 3)}
    if profiles is not None:
        profiles.append(profile_ops(sample_fn, 1, device, f"{label}, batch {batch_size}"))
    return result


def profile_ops(fn, repeat: int, device, title: str, rows: int = 40) -> str:
    """``fn()`` ``repeat`` times under ``torch.profiler``: its operator table, most self device time first
    (self CPU time on the CPU), headed by ``title`` and the wall time the profiled calls took."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # kineto's own log lines (a "gpuGetDeviceCount failed" ERROR on a machine without a GPU) are not ours to show
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        _sync(device)
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=60)
    return f"== {title}: {repeat} call(s), {wall * 1000:.1f} ms under the profiler ({torch.__version__})\n{table}\n"


def write_profiles(path: str | Path, profiles: list[str]) -> None:
    """The phases' operator tables (``--profile``) into one text file."""
    from sandbox.run.files import atomic_write_bytes

    atomic_write_bytes(Path(path), "\n".join(profiles).encode())


# --------------------------------------------------------------------------------------
# What to benchmark
# --------------------------------------------------------------------------------------
def _official_parts(cfg: Namespace, device):
    """Model, ordering, token geometry and a config summary from an official ``config`` dict."""
    import torch

    from sandbox.lab.official import PRESETS, build_model, geometry
    from sandbox.plugins.orderings.random import RandomOrdering
    from sandbox.run.checkpoints import load_checkpoint

    path = Path(cfg.official_config)
    if cfg.official_config in PRESETS:
        official = dict(PRESETS[cfg.official_config])
    elif not path.is_file():
        raise UserError(f"official config file not found: {path} (or name one of {', '.join(PRESETS)})")
    else:
        data = load_checkpoint(path)  # the safe loader: tensors and plain containers only
        official = data.get("config") if isinstance(data, dict) else None
        if not isinstance(official, dict):
            raise UserError(f"{path} has no `config` dict of official MAR constructor arguments")
    geo = geometry(official)
    steps = cfg.num_sampling_steps or int(official.get("num_sampling_steps", 100))
    torch.manual_seed(cfg.seed)
    head_args = {} if cfg.grad_checkpointing is None else {"grad_checkpointing": cfg.grad_checkpointing}
    model = build_model(official, num_sampling_steps=steps, **head_args)
    if cfg.grad_checkpointing is not None:
        model.config.grad_checkpointing = cfg.grad_checkpointing
    ordering = RandomOrdering(geo["grid"], mask_ratio_min=official.get("mask_ratio_min", 0.7))
    if cfg.backbone is not None:
        model.backbone = _other_backbone(cfg, model, ordering, geo["token_dim"])
    info = {"source": cfg.official_config, "official": dict(official)}
    return model, ordering, geo["token_dim"], geo["num_classes"], info, "auto", steps, None


def _recipe_parts(cfg: Namespace, device):
    from sandbox.config.build import build
    from sandbox.config.files import parse_recipe_file
    from sandbox.config.recipe import instantiate, recipe_dict

    path = Path(cfg.recipe)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    # read as `sandbox train --config` reads it (bases, plugin files); the parser checks that the head takes
    # num_sampling_steps when it is given
    overrides = [] if cfg.num_sampling_steps is None else ["--head.init_args.num_sampling_steps",
                                                            str(cfg.num_sampling_steps)]
    if cfg.backbone is not None:
        overrides += ["--backbone", json.dumps({"class_path": cfg.backbone, "init_args": cfg.backbone_args or {}})]
    if cfg.grad_checkpointing is not None:  # the transformer's and the head's (a head without it: one error line)
        flag = str(cfg.grad_checkpointing).lower()
        overrides += ["--model.grad_checkpointing", flag, "--head.init_args.grad_checkpointing", flag]
    rcfg = parse_recipe_file(path, overrides)
    recipe = recipe_dict(rcfg)
    exp = build(rcfg)
    tc, sc = instantiate(rcfg, "train"), instantiate(rcfg, "sample")
    steps = getattr(exp.model.head, "num_sampling_steps", None) or cfg.num_sampling_steps
    info = {"source": str(path), "recipe": recipe}
    return (exp.model, exp.ordering, exp.tokenizer.token_dim, exp.num_classes, info, tc.precision, steps,
            (sc, tc))


def run(cfg: Namespace) -> None:
    import torch

    from sandbox.config.schema import check_sampling
    from sandbox.run.device import resolve_device

    if cfg.pareto is not None:
        return _pareto(cfg)
    if (cfg.recipe is None) == (cfg.official_config is None):
        raise UserError("give exactly one of --recipe RECIPE.yaml and --official_config FILE.pt")
    for name in ("batch_size", "steps", "warmup", "sample_batch_size", "sample_batches", "profile_steps"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0")
    try:  # before the model is built; 0 is an error, not "the recipe's"
        check_sampling({name: cfg[name] for name in ("num_iter", "cfg", "temperature", "head_steps", "cache")
                        if cfg[name] is not None}, "--")
        for n in cfg.num_iter_sweep or []:
            check_sampling({"num_iter": n}, "--num_iter_sweep: ")
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.backbone_args and cfg.backbone is None:
        raise UserError("--backbone_args needs --backbone (the class they are for)")
    device = resolve_device(cfg.device)
    build_parts = _official_parts if cfg.official_config else _recipe_parts
    model, ordering, token_dim, num_classes, info, precision, diffusion_steps, recipe_cfgs = build_parts(cfg, device)
    sc, tc = recipe_cfgs if recipe_cfgs else (None, None)
    bench = _settings(cfg, sc, tc, precision, device)
    _prepare(model, cfg, bench, device)
    _check_speed_options(model, bench)
    memory = PeakMemory(device)
    tr = model  # its config: the model settings
    result = {
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": str(bench["amp_dtype"] or torch.float32).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {
            **info, "params": sum(p.numel() for p in model.parameters()), "seq_len": ordering.seq_len,
            "backbone": type(model.backbone).__name__,
            "token_dim": token_dim, "encoder": [tr.config.encoder_dim, tr.config.encoder_depth],
            "decoder": [tr.config.decoder_dim, tr.config.decoder_depth], "batch_size": cfg.batch_size,
            "steps": cfg.steps, "sample_batch_size": cfg.sample_batch_size, "num_sampling_steps": diffusion_steps,
            **{k: v for k, v in bench.items() if k != "amp_dtype"},
            "grad_checkpointing": tr.config.grad_checkpointing, "attention": tr.config.attention,
        },
        "memory_kind": memory.kind,
    }
    profiles = [] if cfg.profile else None  # --profile: one operator table per phase
    gen = torch.Generator(device).manual_seed(cfg.seed)
    if cfg.batch_size > 0 and cfg.steps > 0:
        result["train"] = _bench_training(model, ordering, token_dim, num_classes, cfg, bench, memory, device, gen,
                                          profiles)
    if cfg.sample_batch_size > 0 and cfg.sample_batches > 0:
        result["sample"] = _bench_sampling(model, ordering, token_dim, num_classes, cfg, bench, memory, device, gen,
                                           profiles)
        for n in cfg.num_iter_sweep or []:  # images/s against steps (Fig. 6); warm already
            step = _bench_sampling(model, ordering, token_dim, num_classes, cfg, {**bench, "num_iter": n}, memory,
                                   device, gen, None, warm=True)
            result.setdefault("sample_sweep", []).append({"num_iter": n, **step})
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if cfg.json:
        from sandbox.run.files import atomic_write_bytes

        atomic_write_bytes(Path(cfg.json), text.encode())
    if cfg.profile:
        write_profiles(cfg.profile, profiles)


def _other_backbone(cfg: Namespace, model, ordering, token_dim: int):
    """``--backbone`` for an official configuration: that class at the official model settings, random weights."""
    from sandbox.config import registry

    found = {**registry.plugins("backbone"), **{c.__module__ + "." + c.__name__: c
                                               for c in registry.plugins("backbone").values()}}
    if cfg.backbone not in found:
        raise UserError(f"--backbone {cfg.backbone!r} is not a registered backbone; `sandbox plugins` lists them")
    backbone = found[cfg.backbone](model.config, ordering.seq_len, token_dim, ordering.num_groups,
                                   **(cfg.backbone_args or {}))
    if (backbone.cond_width, backbone.out_dim) != (model.condition.width, model.head.cond_dim):
        raise UserError(f"backbone {cfg.backbone} reads {backbone.cond_width}-wide conditions and gives "
                        f"{backbone.out_dim}-wide ones; the official model's condition and head need "
                        f"{model.condition.width} and {model.head.cond_dim}")
    backbone.check_ordering(ordering)
    backbone.set_groups(ordering.groups())
    return backbone


def _settings(cfg: Namespace, sc, tc, precision: str, device) -> dict:
    """What is benchmarked: the command's options over the recipe's (or the official defaults)."""
    from sandbox.run.device import autocast_dtype

    precision = cfg.precision or precision
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    use_compile = cfg.compile if cfg.compile is not None else bool(tc and tc.compile)
    given = {name: cfg[name] for name in ("num_iter", "cfg", "temperature", "head_steps", "cache")
             if cfg[name] is not None}
    # the recipe's sample: settings, else the official defaults (num_iter 64, no guidance, linear schedule)
    sampling = {**({"num_iter": 64, "cfg": 1.0, "temperature": 1.0, "head_steps": None, "cache": "off"} if sc is None
                   else {"num_iter": sc.num_iter, "cfg": sc.cfg, "temperature": sc.temperature,
                         "head_steps": sc.head_steps, "cache": sc.cache}), **given}
    return {
        **sampling,
        "cfg_schedule": sc.cfg_schedule if sc else "linear",  # the official fixtures' runs: linear
        "precision": precision, "amp_dtype": autocast_dtype(precision, device),
        "compile": use_compile,
        "compile_sampling": cfg.compile_sampling if cfg.compile_sampling is not None else use_compile,
        "fast_paths": cfg.fast_paths,
        "grad_clip": tc.grad_clip if tc else 3.0,  # the recipe's; the official max norm for an official config
    }


def _prepare(model, cfg: Namespace, bench: dict, device) -> None:
    """The speed paths, the attention kernel and ``torch.compile`` as the run would use them, on ``device``."""
    from sandbox import fast

    fast.apply(model, bench["fast_paths"], cfg.attention or model.config.attention)
    model.to(device)
    if bench["compile"]:
        from sandbox.fast.compile import compile_blocks

        compile_blocks(model, sampling=bench["compile_sampling"])
    elif bench["compile_sampling"]:
        from sandbox.fast.compile import compile_sampling

        compile_sampling(model)


def _check_speed_options(model, bench: dict) -> None:
    """A head-step schedule the head can follow and a cache the backbone can: one error line before timing."""
    from sandbox.core.sampling import check_head_steps
    from sandbox.fast.step_cache import check_cache

    check_head_steps(model.head, bench["head_steps"])
    check_cache(bench["cache"], model.backbone)


def _amp(bench: dict, device):
    import torch

    dtype = bench["amp_dtype"]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _example(model, batch: int, device):
    """``batch`` rows of the condition's example data (seeded), on ``device``: what a bench of a model that does not
    read class labels conditions on."""
    import torch

    from sandbox.core.sampling import to_device

    data = model.condition.example(batch, torch.Generator().manual_seed(0))
    return to_device(data, device)


def _bench_training(model, ordering, token_dim: int, num_classes: int, cfg: Namespace, bench: dict, memory,
                    device, gen, profiles) -> dict:
    """Training steps on random token sequences (what a tokenizer or a latent cache hands the core)."""
    import torch

    from sandbox.run.optim import make_adamw

    model.train()
    opt = make_adamw(model, 0.02, 1e-4, (0.9, 0.95))  # the trainer's optimizer
    seq = torch.randn(cfg.batch_size, ordering.seq_len, token_dim, device=device, generator=gen)  # (B, L, C)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), device=device, generator=gen)
    if model.condition.field != "label":  # a caption, a condition image: the condition's own example data
        labels = _example(model, cfg.batch_size, device)

    def loss():
        split = model.backbone.training_split(ordering, seq, gen)
        with _amp(bench, device):
            return model(seq, split, labels, gen)

    out = time_training(loss, model, opt, cfg.batch_size, cfg.warmup, cfg.steps, memory, device, profiles,
                        cfg.profile_steps, grad_clip=bench["grad_clip"])
    model.zero_grad(set_to_none=True)
    return out


def _bench_sampling(model, ordering, token_dim: int, num_classes: int, cfg: Namespace, bench: dict, memory,
                    device, gen, profiles, warm: bool = False) -> dict:
    """Sampling calls of ``sample_batch_size`` images, stopping at tokens (no tokenizer decode)."""
    from sandbox.core.sampling import sample_tokens, take_rows
    from sandbox.eval.samples import balanced_labels
    from sandbox.fast.sampling import speed_kwargs

    model.eval()
    labels = balanced_labels(cfg.sample_batch_size, num_classes, device)
    if model.condition.field != "label":
        labels = _example(model, cfg.sample_batch_size, device)
    kwargs = dict(cfg=bench["cfg"], cfg_schedule=bench["cfg_schedule"], temperature=bench["temperature"],
                  autocast_dtype=bench["amp_dtype"], **speed_kwargs(bench["head_steps"], bench["cache"]))

    def sample(n: int, num_iter: int):
        sample_tokens(model, ordering, token_dim, take_rows(labels, slice(0, n)), generator=gen, num_iter=num_iter,
                      **kwargs)

    # an untimed first call for one-time work: compiling, cached step embeddings, the allocator
    warmup = not warm and (cfg.warmup > 0 or bench["compile_sampling"] or bench["compile"])
    return time_sampling(lambda: sample(cfg.sample_batch_size, bench["num_iter"]), cfg.sample_batch_size,
                         cfg.sample_batches, (lambda: sample(2, 2)) if warmup else None, memory, device, profiles)


def _pareto(cfg: Namespace) -> None:
    """``--pareto RUN``: the quality-speed map (sandbox/eval/pareto.py), printed as JSON."""
    from sandbox.eval.pareto import run_pareto

    if cfg.recipe is not None or cfg.official_config is not None:
        raise UserError("--pareto RUN maps a trained run; it takes no --recipe or --official_config")
    result = run_pareto(cfg.pareto, cfg.pareto_grid, cfg.pareto_seeds, cfg.pareto_images, cfg.pareto_timing_images,
                        cfg.pareto_name, cfg.device)
    text = json.dumps(result, indent=2)
    print(text)
    if cfg.json:
        from sandbox.run.files import atomic_write_bytes

        atomic_write_bytes(Path(cfg.json), text.encode())
