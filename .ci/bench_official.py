"""Time the official MAR implementation with the protocol of ``sandbox bench``; prints the same JSON fields.

The official code (github.com/LTH14/mar: ``models/mar.py``, ``models/diffloss.py``, ``diffusion/``) is not part
of this repository; point ``--official_dir`` at a copy. Its ``.cuda()`` calls may stay (on the CPU they are
mapped to the chosen device) or be removed (on CUDA the default device is set, so its new tensors land there).

    python .ci/bench_official.py --official_dir DIR --official_config ../shared/fixtures/official_mar_latent.pt \
        --batch_size 64 --num_iter 16 --num_sampling_steps 50 --cfg 3.0          # the README's CPU comparison
    python .ci/bench_official.py --official_dir DIR --official_config mar_base --device cuda --precision bf16 \
        --batch_size 256                                                          # MAR-B on a GPU

Protocol (as ``sandbox/cli/bench.py``): AdamW (betas 0.9, 0.95; no weight decay on biases and 1-D
parameters, as the official ``add_weight_decay``), gradient clipping at 3.0, ``--warmup`` untimed steps, then
``--steps`` timed ones on fixed random inputs; sampling: one small untimed call, then ``--sample_batches`` calls
of ``--sample_batch_size`` class-balanced images with the linear CFG schedule. bf16 is autocast around the
forward (the official ``main_mar`` uses ``torch.cuda.amp.autocast()``, float16 by default; bf16 matches the
sandbox's setting).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sandbox.cli.bench import PeakMemory, time_sampling, time_training, write_profiles  # noqa: E402  (the protocol)
from sandbox.lab.official import PRESETS  # noqa: E402  (the released sizes' constructor arguments)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official_dir", required=True, help="A copy of the official repository (models/, diffusion/).")
    ap.add_argument("--official_config", required=True, help="A fixture .pt with a `config` dict, or mar_base/large/huge.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sample_batch_size", type=int, default=64)
    ap.add_argument("--sample_batches", type=int, default=1)
    ap.add_argument("--num_iter", type=int, default=16)
    ap.add_argument("--num_sampling_steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--norm_eps", type=float, default=1e-6, help="LayerNorm eps (1e-6: the released factories).")
    ap.add_argument("--profile", default=None, help="Write torch.profiler operator tables here (as sandbox bench).")
    ap.add_argument("--profile_steps", type=int, default=3)
    return ap


def main() -> None:
    a = parser().parse_args()

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_default_device(device)  # tensors the official code creates without .cuda() land on the GPU
    torch.Tensor.cuda = lambda t, *args, **kw: t.to(device)  # and those it moves with .cuda() land on `device`
    sys.path.insert(0, os.path.abspath(a.official_dir))
    from models.mar import MAR  # the official class

    if a.official_config in PRESETS:
        conf = dict(PRESETS[a.official_config])
    else:
        conf = dict(torch.load(a.official_config, map_location="cpu", weights_only=False)["config"])
    conf["num_sampling_steps"] = str(a.num_sampling_steps)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    model = MAR(norm_layer=partial(torch.nn.LayerNorm, eps=a.norm_eps), **conf).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16" else nullcontext()
    side = model.seq_h * model.patch_size
    res = {"impl": "official", "device": str(device) if not cuda else f"{device} ({torch.cuda.get_device_name(device)})",
           "dtype": "bfloat16" if a.precision == "bf16" else "float32", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
           "config": {"official": a.official_config, "batch_size": a.batch_size, "num_iter": a.num_iter,
                      "num_sampling_steps": a.num_sampling_steps, "cfg": a.cfg}}

    memory = PeakMemory(device)
    profiles = [] if a.profile else None  # --profile: one operator table per phase
    if a.batch_size and a.steps:
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
        other = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02}, {"params": other, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95))
        x = torch.randn(a.batch_size, model.vae_embed_dim, side, side, device=device)
        y = torch.randint(0, conf.get("class_num", 1000), (a.batch_size,), device=device)

        def loss():
            with amp:
                return model(x, y)

        res["train"] = time_training(loss, model, opt, a.batch_size, a.warmup, a.steps, memory, device, profiles,
                                     a.profile_steps, "official training")
        del opt
        model.zero_grad(set_to_none=True)

    if a.sample_batch_size and a.sample_batches:
        model.eval()
        labels = torch.arange(a.sample_batch_size, device=device) % conf.get("class_num", 1000)
        kw = dict(num_iter=a.num_iter, cfg=a.cfg, cfg_schedule="linear", temperature=a.temperature)

        def sample(n: int, num_iter: int):
            with torch.no_grad(), amp:
                model.sample_tokens(n, labels=labels[:n], **{**kw, "num_iter": num_iter})

        res["sample"] = time_sampling(lambda: sample(a.sample_batch_size, a.num_iter), a.sample_batch_size,
                                      a.sample_batches, (lambda: sample(2, 2)) if a.warmup > 0 else None, memory,
                                      device, profiles, "official sampling")
    print(json.dumps(res, indent=2))
    if a.profile:
        write_profiles(a.profile, profiles)


if __name__ == "__main__":
    main()
