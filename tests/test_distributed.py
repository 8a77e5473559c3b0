"""Multi-process training and sampling (torchrun, gloo on the CPU) against single-process runs.

One 2-rank run (``ddp_worker.py`` under torchrun) trains 2 steps of a per-rank batch of 4; the
single-process reference trains with a batch of 4 and 2 accumulation steps: the same global batch
of 8, the same images, the same random numbers. They must agree up to float reduction order.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

from sandbox.cli import main
from sandbox.config.recipe import recipe_parser
from sandbox.eval.samples import eval_samples, generate_many
from sandbox.images.io import read_image_set
from sandbox.run.loading import load_run
from sandbox.run.rundir import RunDir
from sandbox.run.trainer import train

ATOL = 1e-5


def recipe_file(path, **train):
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update({"log_every": 1, "ckpt_every": 2, "keep_checkpoints": 3, **train})
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    ddp_recipe = recipe_file(root / "ddp.yaml", steps=2, batch_size=4, grad_accum=1)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "ddp_worker.py"), str(ddp_recipe), str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the single-process reference: same global batch (4 x 2 accumulation steps), 4 steps uninterrupted
    one_recipe = recipe_file(root / "one.yaml", steps=4, batch_size=4, grad_accum=2)
    train(recipe_parser().parse_args(["--config", str(one_recipe)]), root / "one", progress=False)
    return root, one_recipe


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    root, _ = runs
    ddp, one = metrics(root / "ddp"), metrics(root / "one")
    assert [m["step"] for m in ddp] == [1, 2]
    for a, b in zip(ddp, one[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["lr"] == b["lr"]
    ddp_ckpt = RunDir(root / "ddp").load_latest()
    one_ckpt = torch.load(root / "one" / "checkpoints" / "checkpoint-2.pt", weights_only=True)
    assert ddp_ckpt["step"] == one_ckpt["step"] == 2 and ddp_ckpt["global_batch"] == 8
    assert max_diff(ddp_ckpt["model"], one_ckpt["model"]) < ATOL


def test_both_ranks_hold_identical_parameters(runs):
    root, _ = runs
    r0, r1 = (torch.load(root / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert max_diff(r0, r1) == 0.0
    first = torch.load(root / "one" / "checkpoints" / "checkpoint-2.pt", weights_only=True)["model"]
    assert max_diff(r0, first) < ATOL  # and they trained (equal to the reference, not to the init)


@pytest.fixture
def one_thread():
    """The ranks ran with one thread each; matmuls split over threads round differently, so compare like with like."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_distributed_sampling_gives_the_images_of_one_process(runs, one_thread):
    root, _ = runs
    loaded = load_run(root / "ddp")
    exp, model = loaded.exp, loaded.model
    one = generate_many(exp, torch.arange(5), batch_size=2, seed=7, model=model, num_iter=2)
    for r in (0, 1):  # bit-identical, on both ranks (gathered everywhere with dst=None)
        assert torch.equal(torch.load(root / f"images_rank{r}.pt"), one)
    # and through the CLI: `sandbox sample` on 2 ranks wrote what 1 process writes
    assert main(["sample", "--run_dir", str(root / "ddp"), "--num_images", "6", "--batch_size", "2", "--num_iter",
                 "2", "--cfg", "2.0", "--out", str(root / "one_samples.npz"), "--progress", "false"]) == 0
    a, b = np.load(root / "ddp_samples.npz"), np.load(root / "one_samples.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])


def test_distributed_eval_set_is_the_one_process_set(runs, one_thread):
    from ddp_worker import EVAL_SETTINGS

    root, _ = runs
    loaded = load_run(root / "ddp")
    exp, model = loaded.exp, loaded.model
    one, labels, path, reused = eval_samples(exp, model, EVAL_SETTINGS, root / "one_eval")
    assert not reused
    written = list((root / "ddp_eval" / "eval").glob("samples-5-*.npz"))
    assert [p.name for p in written] == [path.name]  # rank 0 alone wrote it, under the same settings key
    two = read_image_set(written[0])
    assert np.array_equal(two.read_all(), one) and np.array_equal(two.labels, labels)


def test_distributed_sweep_and_likelihood_are_the_one_process_ones(runs, one_thread, tmp_path):
    import shutil

    root, _ = runs  # before the resume test below continues the ddp run
    copy = shutil.copytree(root / "ddp", tmp_path / "copy", ignore=shutil.ignore_patterns("eval", "sweeps"))
    few = ["--run_dir", str(copy), "--num_images", "5", "--batch_size", "2", "--num_iter", "2"]
    assert main(["sweep", *few, "--grid", "{cfg: [1.0, 2.0]}", "--name", "ddp"]) == 0
    assert main(["eval", *few, "--nll", "--nll_images", "5", "--head_args", "{nll_timesteps: 3}"]) == 0

    def read(run, name):
        return json.loads((run / name).read_text())

    two, one = read(root / "ddp", "sweeps/ddp/results.json"), read(copy, "sweeps/ddp/results.json")
    assert [(r["point"], r["metrics"]) for r in two] == [(r["point"], r["metrics"]) for r in one] and len(one) == 2
    assert read(root, "ddp_nll.json")["nll_bits_per_dim"] == pytest.approx(read(copy, "eval.json")["nll_bits_per_dim"],
                                                                            rel=1e-6)


def test_resume_a_two_rank_run_on_one_rank(runs):
    root, one_recipe = runs
    # same global batch: 4 per rank x 1 rank x 2 accumulation steps; runs after the sampling test (order-safe:
    # that test reads the step-2 checkpoint, which resuming keeps as checkpoint-2.pt)
    train(recipe_parser().parse_args(["--config", str(one_recipe)]), root / "ddp", progress=False)
    resumed, one = RunDir(root / "ddp").load_latest(), RunDir(root / "one").load_latest()
    assert resumed["step"] == one["step"] == 4
    assert max_diff(resumed["model"], one["model"]) < ATOL
    assert [m["loss"] for m in metrics(root / "ddp")[2:]] == pytest.approx([m["loss"] for m in metrics(root / "one")[2:]],
                                                                           rel=1e-5, abs=1e-6)


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    root, _ = runs
    other = recipe_file(tmp_path / "other.yaml", steps=6, batch_size=4, grad_accum=1)
    proc_code = main(["train", "--config", str(other), "--run_dir", str(root / "one")])
    assert proc_code == 2


# ----------------------------------------------------------------------------------------
# sandbox bench
# ----------------------------------------------------------------------------------------
BENCH_FIELDS = {"device", "dtype", "threads", "torch", "config", "memory_kind", "train", "sample"}


def test_bench_prints_json_with_every_field(tmp_path, capsys):
    recipe = recipe_file(tmp_path / "tiny.yaml")
    code = main(["bench", "--recipe", str(recipe), "--batch_size", "8", "--steps", "2", "--warmup", "1",
                 "--sample_batch_size", "4", "--num_iter", "2", "--num_sampling_steps", "3", "--cfg", "2.0",
                 "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert BENCH_FIELDS <= result.keys() and result == json.loads((tmp_path / "b.json").read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert set(result["train"]) == {"ms_per_step", "images_per_s", "peak_memory_mb", "final_loss", "cpu_ms_per_step"}
    assert set(result["sample"]) == {"seconds", "images_per_s", "peak_memory_mb", "cpu_seconds", "warmup_seconds"}
    assert result["train"]["ms_per_step"] > 0 and result["sample"]["images_per_s"] > 0
    assert result["train"]["peak_memory_mb"] > 0 and result["memory_kind"].startswith("cpu")
    c = result["config"]
    assert (c["batch_size"], c["num_iter"], c["num_sampling_steps"], c["cfg"]) == (8, 2, 3, 2.0)
    assert c["params"] > 0 and c["attention"] == "sdpa" and c["grad_checkpointing"] is False
    assert c["compile"] is False and c["compile_sampling"] is False


def test_bench_profile_writes_an_operator_table_per_phase(tmp_path, capsys):
    recipe = recipe_file(tmp_path / "tiny.yaml")
    table = tmp_path / "profile.txt"
    code = main(["bench", "--recipe", str(recipe), "--batch_size", "4", "--steps", "1", "--warmup", "0",
                 "--sample_batch_size", "2", "--num_iter", "2", "--num_sampling_steps", "2",
                 "--profile", str(table), "--profile_steps", "2"])
    assert code == 0 and json.loads(capsys.readouterr().out)["train"]["ms_per_step"] > 0
    text = table.read_text()
    assert "== training, batch 4: 2 call(s)" in text and "== sampling, batch 2: 1 call(s)" in text
    assert "aten::addmm" in text and "Self CPU time total" in text


def test_gpu_check_script_uses_options_that_exist():
    """.ci/gpu_check runs only on a GPU machine: check here that it parses and that every option it passes
    exists (an option renamed in a command would otherwise surface only in a scarce GPU session)."""
    import importlib.util
    import re

    script = REPO / ".ci" / "gpu_check"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    spec = importlib.util.spec_from_file_location("bench_official", REPO / ".ci" / "bench_official.py")
    bench_official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_official)
    from sandbox.cli import bench, sample, train

    known = {"--nproc_per_node", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--target"}  # torchrun, pip
    for p in (bench.parser(), sample.parser(), train.parser(), bench_official.parser()):
        known |= set(p._option_string_actions)
    code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z_.-]*", code))
    assert used and used <= known, used - known


def test_bench_official_config_and_errors(tmp_path, capsys):
    from conftest import parity_fixture_dir

    fixtures = parity_fixture_dir()
    fixture = next(iter(sorted(fixtures.glob("official_mar_*.pt"))), None) if fixtures else None
    if fixture is not None:  # a fixture's `config` dict, random weights
        assert main(["bench", "--official_config", str(fixture), "--batch_size", "4", "--steps", "1", "--warmup", "0",
                     "--sample_batch_size", "2", "--num_iter", "2", "--num_sampling_steps", "2",
                     "--precision", "bf16"]) == 0  # the GPUs' autocast path, reachable on the CPU
        result = json.loads(capsys.readouterr().out)
        assert result["config"]["official"]["encoder_embed_dim"] > 0 and result["sample"]["seconds"] > 0
        assert result["dtype"] == "bfloat16" and math.isfinite(result["train"]["final_loss"])
    assert main(["bench"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["bench", "--official_config", str(tmp_path / "none.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    recipe = recipe_file(tmp_path / "tiny.yaml")
    assert main(["bench", "--recipe", str(recipe), "--attention", "xformers", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "xformers" in err[0]


def test_bench_reads_a_recipe_as_train_does(tmp_path, capsys):
    # a recipe that builds on another (base:) and swaps the head, as recipes/quickstart_flow.yaml does
    recipe_file(tmp_path / "tiny.yaml")
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(
        {"base": "tiny.yaml", "head": {"class_path": "FlowHead", "init_args": {"width": 32, "depth": 1}}}))
    args = ["bench", "--recipe", str(tmp_path / "flow.yaml"), "--batch_size", "4", "--steps", "1", "--warmup", "0",
            "--sample_batch_size", "2", "--num_iter", "2"]
    assert main([*args, "--num_sampling_steps", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    head = result["config"]["recipe"]["head"]
    assert head["class_path"].endswith("FlowHead") and head["init_args"]["num_sampling_steps"] == 3
    assert result["config"]["num_sampling_steps"] == 3 and result["config"]["encoder"] == [32, 1]  # from the base
    # the documented plugin example: a base, and a plugin file listed relative to the recipe
    gmm = ["bench", "--recipe", str(REPO / "docs" / "examples" / "gmm_digits.yaml"), "--batch_size", "2", "--steps",
           "1", "--warmup", "0", "--sample_batch_size", "2", "--num_iter", "2"]
    assert main(gmm) == 0 and json.loads(capsys.readouterr().out)["config"]["recipe"]["head"]["class_path"]
    # --num_sampling_steps for a head without that argument: one line, exit 2 (the parser checks the head)
    assert main([*gmm, "--num_sampling_steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_sampling_steps" in err[0]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(runs):
    root, _ = runs
    r0, r1 = (json.loads((root / f"stopped_rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 == {"step": 3, "stopped": True, "signal": int(signal.SIGTERM)}
    saved = RunDir(root / "stopped").load_latest()
    assert saved["step"] == 3 and saved["world_size"] == 2  # written once, by rank 0


# ----------------------------------------------------------------------------------------
# The CUDA paths, checked on the CPU: the backend and device each rank picks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, cuda, backend", [("cuda", True, "nccl"), ("auto", True, "nccl"),
                                                   ("cpu", True, "gloo"), ("auto", False, "gloo")])
def test_session_joins_with_nccl_on_gpus_and_gloo_on_cpus(monkeypatch, device, cuda, backend):
    from sandbox.run import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("gpu", i))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b, **kw: calls.setdefault("backend", b))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.setdefault("destroyed", True))
    with distributed.session(device):
        pass
    assert calls["backend"] == backend and calls["destroyed"]
    assert calls.get("gpu") == (1 if backend == "nccl" else None)  # one GPU per process: cuda:LOCAL_RANK


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    from sandbox.run import distributed

    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank=5, world_size=8, local_rank=1))
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index stays
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_global_batch_in_lr_scaling_and_data_check(tiny_recipe):
    from sandbox.config.recipe import instantiate
    from sandbox.errors import UserError
    from sandbox.run.data import ResumableBatchSampler
    from sandbox.run.optim import base_lr

    cfg = recipe_parser().parse_args(["--config", str(tiny_recipe), "--train.lr", "null", "--train.blr", "1e-4",
                                      "--train.batch_size", "64", "--train.grad_accum", "4"])
    tc = instantiate(cfg, "train")
    assert base_lr(tc, world_size=8) == pytest.approx(1e-4 * 64 * 8 * 4 / 256)  # 2048 images: the paper's 8e-4
    # rank r of a 2-rank run with 2 accumulation steps takes global micro-batch a * 2 + r of every step
    s = [iter(ResumableBatchSampler(100, 5, seed=0, rank=r, world_size=2, accum=2)) for r in (0, 1)]
    one = iter(ResumableBatchSampler(100, 5, seed=0, world_size=1, accum=4))
    for _ in range(2):
        assert [next(one) for _ in range(4)] == [next(s[0]), next(s[1]), next(s[0]), next(s[1])]
    with pytest.raises(UserError, match="2 ranks x 3 accumulation"):
        ResumableBatchSampler(20, 4, seed=0, world_size=2, accum=3)


def test_attention_backend_and_compile_are_configuration(tiny_recipe, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    from sandbox.config.build import build
    from sandbox.core.transformer import MARBackbone, MARConfig
    from sandbox.errors import UserError
    from sandbox.fast.attention import set_attention_backend, xformers_available
    from sandbox.fast.compile import compile_blocks

    tr = MARBackbone(MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1,
                               decoder_heads=2, buffer_size=2), 16, 5)
    if not xformers_available():
        with pytest.raises(UserError, match="xformers is not installed"):
            set_attention_backend(tr, "xformers")
    with pytest.raises(UserError, match="unknown attention backend"):
        set_attention_backend(tr, "flash")
    exp = build(recipe_parser().parse_args(["--config", str(tiny_recipe)]))
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "c++")  # nothing is compiled here
    compile_blocks(exp.model)  # wraps in place (compiles on the first call): names and checkpoints unchanged
    blocks = [*exp.model.backbone.encoder_blocks, *exp.model.head.net.res_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(k.startswith(("condition.", "backbone.", "head.")) and "_orig_mod" not in k
               for k in exp.model.state_dict())
    assert exp.model.head.compiled_sampling  # and the head's sampling steps


def test_compile_without_a_cpp_compiler_is_one_line(tmp_path, tiny_recipe, monkeypatch, capsys):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    run = tmp_path / "run"
    for args in (["train", "--config", str(tiny_recipe), "--train.compile", "true", "--run_dir", str(run)],
                 ["bench", "--recipe", str(tiny_recipe), "--batch_size", "0", "--compile_sampling", "true"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs a C++ compiler" in err and "Traceback" not in err
    assert not run.exists()  # refused before the run directory is written
