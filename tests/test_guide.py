"""docs/writing-plugins.md cannot rot: it quotes the example files verbatim, and its example runs as shown."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
from conftest import REPO

from sandbox.cli import main
from sandbox.config import registry
from sandbox.testing import check_head

GUIDE = REPO / "docs" / "writing-plugins.md"
EXAMPLES = REPO / "docs" / "examples"
QUOTE = re.compile(r"<!-- begin (\S+) -->\n```\w*\n(.*?)```\n<!-- end \1 -->", re.S)
TRAIN = "sandbox train --config docs/examples/gmm_digits.yaml"


def test_guide_quotes_every_example_file_verbatim():
    quoted = dict(QUOTE.findall(GUIDE.read_text()))
    assert sorted(quoted) == sorted(p.relative_to(REPO).as_posix() for p in EXAMPLES.iterdir() if p.is_file())
    for path, text in quoted.items():
        assert text == (REPO / path).read_text(), f"the guide's quote of {path} differs from the file; copy it over"


def test_guide_example_keeps_the_head_contract():
    with registry.isolated():
        gmm = registry.load_file(EXAMPLES / "gmm_head.py")
        check_head(gmm.GMMHead)
        check_head(gmm.GMMHead, num_components=1, width=8, token_dim=3, cond_dim=4)  # as the guide shows


def test_guide_example_trains_and_samples_in_a_fresh_process(tmp_path, monkeypatch):
    assert TRAIN in GUIDE.read_text()
    monkeypatch.chdir(REPO)
    run = tmp_path / "gmm_digits"
    short = ["--run_dir", run, "--train.steps", 3, "--train.batch_size", 16, "--sample.num_iter", 4,
             "--sample.grid_classes", 2, "--sample.grid_per_class", 1]
    with registry.isolated():
        assert main(TRAIN.split()[1:] + [str(a) for a in short]) == 0
    assert (run / "samples" / "final.png").is_file()

    # another process in another directory: the run names its plugin file, and the user gives it (--plugin)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "gmm.npz"
    proc = subprocess.run([sys.executable, "-m", "sandbox", "sample", "--run_dir", str(run), "--num_images", "4",
                           "--plugin", str(EXAMPLES / "gmm_head.py"),
                           "--num_iter", "2", "--progress", "false", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = np.load(out)["images"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
