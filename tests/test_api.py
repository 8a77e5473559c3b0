"""The Python API (docs/python-api.md): the page's example runs verbatim, and what it promises holds."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def test_the_documented_example_runs_verbatim(tiny_run, tmp_path):
    """The page's python block, copied as it stands, in a fresh process run where `runs/quickstart` is a run."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python-api.md").read_text(), flags=re.S)
    assert blocks, "docs/python-api.md has no python example"
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_run, tmp_path / "runs" / "quickstart")
    (tmp_path / "example.py").write_text(blocks[0])
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sevens.png").stat().st_size > 0
    assert "torch.Size([8, 3, 8, 8])" in done.stdout  # the tiny run's 8 px digits


def test_generate_is_seeded_and_takes_the_recipes_settings(tiny_run):
    import sandbox

    run = sandbox.load_run(tiny_run, device="cpu")
    a = sandbox.generate(run, labels=[1, 1, 0], seed=3)
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1.5
    assert torch.equal(a, sandbox.generate(run, labels=[1, 1, 0], seed=3))
    assert not torch.equal(a, sandbox.generate(run, labels=[1, 1, 0], seed=4))
    assert sandbox.generate(run, num_images=4).shape[0] == 4
    with pytest.raises(sandbox.UserError, match=r"labels must lie in 0\.\.9"):
        sandbox.generate(run, labels=[12])


def test_build_reads_a_recipe_file_as_train_does(tiny_recipe):
    import sandbox
    from sandbox.fast.query_rows import QueryRowsBackbone

    exp = sandbox.build(tiny_recipe)
    assert exp.dataset is not None and exp.model.backbone.seq_len == 16
    assert not isinstance(exp.model.backbone, QueryRowsBackbone)  # plain until the speed paths are applied
    sandbox.fast.apply(exp.model)
    assert isinstance(exp.model.backbone, QueryRowsBackbone)
