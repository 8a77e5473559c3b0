#!/usr/bin/env python3
"""The MAR paper's Fig. 6 on digits (issue 21, item 5): sampling speed against the number of steps, for MAR and for
causal AR with and without its KV cache at the same model size (recipes/ablations/diffloss_*.yaml), plus each
backbone's training speed -- `sandbox bench` runs, drawn into docs/ablations_speed.png and tabled in
docs/ablations.md between its speed markers.

    python .ci/measure_speed.py                               # from the repository root; ~15 minutes on 2 CPU cores
    SANDBOX_ABLATIONS_TINY=1 python .ci/measure_speed.py --workdir /tmp/abl   # tiny: does it all run?

The digits tokenizers must exist in WORKDIR/runs (.ci/measure_ablations.py trains them; so does this script,
reporting a finished one complete). Random weights: speed does not depend on training. Each curve is one process:
an untimed warm-up call, then one timed call of --sample_batch_size images per step count. On a GPU the same
comparison at MAR-L size needs no data or tokenizer:

    sandbox bench --official_config mar_large --device cuda --batch_size 0 --num_iter_sweep [16,32,64,128,256]
    sandbox bench --official_config mar_large --device cuda --batch_size 0 --num_iter_sweep [16,32,64,128,256] \\
        --backbone CausalBackbone
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_ablations as ma  # the sibling script: its subprocess runner, tokenizers and page writer

BEGIN, END = "<!-- speed table: begin (.ci/measure_speed.py writes it) -->", "<!-- speed table: end -->"
SWEEP = [2, 8] if ma.TINY else [8, 16, 32, 64]  # 64 = L: one token per step
CURVES = (  # (label, file stem, recipe, extra bench arguments)
    ("MAR (bidirectional)", "mar", "diffloss_mar.yaml", []),
    ("causal AR, KV cache", "causal_cache", "diffloss_raster_causal.yaml", []),
    ("causal AR, no cache", "causal_nocache", "diffloss_raster_causal.yaml",
     ["--backbone", "CausalBackbone", "--backbone_args", "{use_cache: false}"]),
)


def bench(recipe: str, extra: list[str], json_path: Path, work: Path, sample_batch: int) -> dict:
    """One `sandbox bench` of a recipe: training steps, then sampling at every step count of SWEEP."""
    size = ["--batch_size", "4", "--steps", "1", "--warmup", "0", "--num_sampling_steps", "2"] if ma.TINY else \
        ["--batch_size", "64", "--steps", "10", "--warmup", "2"]
    ma.sandbox(["bench", "--recipe", str(ma.RECIPES / recipe), *size, "--sample_batch_size", str(sample_batch),
                "--num_iter_sweep", json.dumps(SWEEP), "--json", str(json_path), *extra], work)
    return json.loads(json_path.read_text())


def plot(results: dict, path: Path) -> None:
    """Images/s against sampling steps, one line per curve (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for (label, stem, _, _), marker in zip(CURVES, "osx"):
        sweep = results[stem]["sample_sweep"]
        ax.plot([s["num_iter"] for s in sweep], [s["images_per_s"] for s in sweep], marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(SWEEP, [str(s) for s in SWEEP])
    ax.set_xlabel("sampling steps (64 = one token per step)")
    ax.set_ylabel("images / s")
    first = results[CURVES[0][1]]
    ax.set_title(f"digits, 64 tokens, {first['device']}, {first['threads']} thread(s)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def speed_table(results: dict, meta: dict, image: str) -> str:
    """The speed table (markdown): training images/s and sampling images/s at each step count."""
    lines = [f"Measured at commit `{meta['commit']}` on {meta['machine']}, {meta['date']}"
             f"{' -- TINY (the numbers mean nothing)' if ma.TINY else ''}; random weights, cfg 3, "
             f"{meta['sample_batch']} images per call, the Diffusion Loss cells' model. ![speed]({image})", "",
             f"| backbone | params | train img/s (batch {meta['train_batch']}) | "
             + " | ".join(f"sample img/s, {n} steps" for n in SWEEP) + " |", "|---|---|---|" + "---|" * len(SWEEP)]
    for label, stem, _, _ in CURVES:
        r = results[stem]
        cells = [str(s["images_per_s"]) for s in r["sample_sweep"]]
        lines.append(f"| {label} | {r['config']['params'] / 1e6:.2f}M | {r['train']['images_per_s']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=ma.REPO, help="Where runs/ is (default: the repository root).")
    p.add_argument("--out", type=Path, default=None, help="The page (default docs/ablations.md; TINY: "
                                                          "WORKDIR/ablations.md); the plot and JSONs go beside it.")
    p.add_argument("--sample_batch_size", type=int, default=2 if ma.TINY else 64, help="Images per sampling call.")
    args = p.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "ablations.md" if ma.TINY else ma.REPO / "docs" / "ablations.md")
    ma.train_tokenizers(work)
    jsons = out.parent / "bench"
    jsons.mkdir(parents=True, exist_ok=True)
    results = {stem: bench(recipe, extra, jsons / f"ablations_speed_{stem}.json", work, args.sample_batch_size)
               for _, stem, recipe, extra in CURVES}
    image = out.parent / "ablations_speed.png"
    plot(results, image)
    meta = {"commit": ma.git_commit(), "machine": ma.machine(), "date": ma.time.strftime("%Y-%m-%d"),
            "sample_batch": args.sample_batch_size, "train_batch": results["mar"]["config"]["batch_size"]}
    ma.write_doc(out, speed_table(results, meta, image.name), BEGIN, END)
    print(f"wrote {out} and {image}")


if __name__ == "__main__":
    main()
