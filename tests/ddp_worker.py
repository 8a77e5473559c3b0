"""One rank of the 2-process run in test_distributed.py (started by torchrun; gloo on the CPU).

Trains the recipe through the training core, saves this rank's final parameters, then samples
through the CLI (`sandbox sample`) and through ``generate_distributed`` on every rank, the
evaluation set through ``eval_samples``, a sweep and a held-out likelihood through the CLI. Last, a
second run in which only rank 1 receives SIGTERM (at its 3rd step): both ranks must stop at the
same step, rank 0 alone saving the checkpoint (a rank that stopped alone would deadlock the other).
Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py RECIPE.yaml OUT_DIR
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch

import sandbox.run.trainer
from sandbox.cli import main
from sandbox.config import registry
from sandbox.config.recipe import recipe_parser
from sandbox.eval.samples import eval_samples, generate_distributed
from sandbox.run import distributed
from sandbox.run.loading import load_run
from sandbox.run.trainer import train

EVAL_SETTINGS = {"num_images": 5, "seed": 3, "chunk_size": 2, "num_iter": 2, "cfg": 2.0, "cfg_schedule": "linear",
                 "temperature": 1.0, "step": 2, "ema": True}


def run(recipe: str, out: Path) -> None:
    registry.discover()
    with distributed.session("cpu") as me:
        cfg = recipe_parser().parse_args(["--config", recipe])
        summary = train(cfg, out / "ddp", progress=False)
        torch.save(summary["model"].state_dict(), out / f"params_rank{me.rank}.pt")
        code = main(["sample", "--run_dir", str(out / "ddp"), "--num_images", "6", "--batch_size", "2",
                     "--num_iter", "2", "--cfg", "2.0", "--out", str(out / "ddp_samples.npz"), "--progress", "false"])
        assert code == 0, code
        loaded = load_run(out / "ddp")
        exp, model = loaded.exp, loaded.model
        images = generate_distributed(exp, torch.arange(5), batch_size=2, seed=7, dst=None, model=model, num_iter=2)
        torch.save(images, out / f"images_rank{me.rank}.pt")
        # the evaluation set (what `sandbox eval` scores): split over the ranks, gathered and written by rank 0
        got, labels, path, reused = eval_samples(exp, model, EVAL_SETTINGS, out / "ddp_eval")
        assert not reused and (got is None) == (me.rank != 0), (me.rank, got is None)
        # a sweep and a held-out likelihood on 2 ranks: each point's images and the NLL's chunks split over them
        few = ["--run_dir", str(out / "ddp"), "--num_images", "5", "--batch_size", "2", "--num_iter", "2"]
        assert main(["sweep", *few, "--grid", "{cfg: [1.0, 2.0]}", "--name", "ddp"]) == 0
        assert main(["eval", *few, "--nll", "--nll_images", "5", "--head_args", "{nll_timesteps: 3}",
                     "--json", str(out / "ddp_nll.json")]) == 0

        # the preemption signal reaches rank 1 only
        loss, calls = sandbox.run.trainer.training_loss, []

        def signalled_loss(*args, **kwargs):
            calls.append(1)
            if me.rank == 1 and len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss(*args, **kwargs)

        sandbox.run.trainer.training_loss = signalled_loss
        cfg = recipe_parser().parse_args(["--config", recipe, "--train.steps", "50"])
        summary = train(cfg, out / "stopped", progress=False)
        (out / f"stopped_rank{me.rank}.json").write_text(json.dumps({k: summary[k] for k in ("step", "stopped", "signal")}))


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
