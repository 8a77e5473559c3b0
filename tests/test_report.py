"""`sandbox report`: one self-contained HTML page comparing runs, read as text and seen in a headless browser.

The browser test needs Chromium (Debian: `apt-get install -y chromium`; elsewhere set $SANDBOX_CHROMIUM to a
Chromium or Chrome binary) and skips without one.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sandbox.eval.report import fmt, read_scores, read_sweeps

pytestmark = pytest.mark.usefixtures("one_thread")


ALPHA_EVAL = {"run_dir": "alpha", "step": 4, "num_images": 50, "accuracy": 0.42, "frechet_distance": 123.456,
              "real_accuracy": 0.9916, "real_frechet_floor": 44.27, "num_reference": 896}
BETA_SEEDS = [{"seed": s, "step": 4, "num_images": 50, "accuracy": a, "frechet_distance": f,
               "real_frechet_floor": 44.27} for s, a, f in ((0, 0.60, 80.0), (1, 0.62, 90.0), (2, 0.64, 100.0))]
SWEEP = [{"point": {"cfg": c, "temperature": t}, "metrics": {"accuracy": 0.1 * c + t / 10, "frechet_distance": 300 / c}}
         for c in (1.0, 3.0) for t in (0.8, 1.0)]


# ----------------------------------------------------------------------------------------
# Run directories to report on: copies of the tiny run, changed where a report must show differences
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_runs")
    alpha, beta, fresh = root / "alpha", root / "beta", root / "fresh"
    shutil.copytree(tiny_run, alpha)
    shutil.copytree(tiny_run, beta)
    (alpha / "eval.json").write_text(json.dumps(ALPHA_EVAL))  # today's flat eval.json
    recipe = yaml.safe_load((beta / "recipe.yaml").read_text())
    recipe["head"]["init_args"]["width"] = 48
    recipe["train"]["lr"] = 0.003
    (beta / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    # per-seed values only (the means and stds are the report's to compute), of an older checkpoint
    (beta / "eval.json").write_text(json.dumps({"step": 2, "num_images": 50, "seeds": BETA_SEEDS}))
    (beta / "sweeps" / "cfg_temp").mkdir(parents=True)
    (beta / "sweeps" / "cfg_temp" / "results.json").write_text(json.dumps(SWEEP))
    fresh.mkdir()  # a run that has not trained yet: a recipe and nothing else
    (fresh / "recipe.yaml").write_text((tiny_run / "recipe.yaml").read_text())
    return {"alpha": alpha, "beta": beta, "fresh": fresh}


class _Page(HTMLParser):
    """The text a reader sees (no <style>/<title>), and every tag with its attributes."""

    def __init__(self, page: str):
        super().__init__()
        self.text, self.tags, self._hidden = [], [], 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._hidden += tag in ("style", "title")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("style", "title")

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.text.append(" ".join(data.split()))

    @property
    def words(self) -> str:
        return " | ".join(self.text)


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    from sandbox.cli import main

    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", *(str(runs[k]) for k in ("alpha", "beta", "fresh")), "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------
# What the page says
# ----------------------------------------------------------------------------------------
def test_page_names_every_run_and_its_scores(report, runs):
    page = _Page(report.read_text())
    text = page.words
    for name, path in runs.items():
        assert name in page.text and str(path.resolve()) in text
    assert "trained, 4 steps" in text and "no checkpoint yet" in text
    # alpha: one evaluation; the distance with the floor beside it and their ratio
    assert "42.0%" in text and fmt(123.456) in text and "44.27" in text and f"{123.456 / 44.27:.1f}×" in text
    # beta: three seeds -> mean ± std (sample std), computed when the file holds only the per-seed values
    assert "62.0 ± 2.0%" in text and "90 ± 10" in text
    assert "not evaluated yet" in text  # fresh
    assert "Scored at another checkpoint than the run's newest: beta (step 2; the run is at 4)" in text
    assert "The scorer reads real held-out images with accuracy 99.2%" in text


def _first_table(page: str, section: str) -> list[list[str]]:
    """The cell texts of the first table in ``<section id=section>``, one list per body row."""
    html = re.search(rf'<section id="{section}">(.*?)</section>', page, re.S).group(1)
    body = re.search(r"<tbody>(.*?)</tbody>", html, re.S).group(1)
    return [[" ".join(_Page(cell).text) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_recipe_differences_are_the_keys_that_differ(report):
    table = {row[0]: row[1:] for row in _first_table(report.read_text(), "recipe")}
    assert table == {"head.width": ["32", "48", "32"], "train.lr": ["0.001", "0.003", "0.001"]}
    assert "settings every run shares" in report.read_text()


def test_sweep_table_has_a_row_per_point(report):
    assert "beta · sweep | cfg_temp" in _Page(report.read_text()).words
    rows = _first_table(report.read_text(), "sweeps")
    assert [row[:2] for row in rows] == [[str(r["point"]["cfg"]), str(r["point"]["temperature"])] for r in SWEEP]
    assert [row[3] for row in rows] == [fmt(r["metrics"]["frechet_distance"]) for r in SWEEP]
    assert re.search(r'<span class="best">100</span>', report.read_text())  # the best distance is marked


def test_page_is_self_contained(report):
    """Nothing on the page is fetched: pictures are data URIs, no script, no stylesheet link, no font file."""
    page = report.read_text()
    tags = _Page(page).tags
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    for tag, attrs in tags:
        for key in ("src", "href", "srcset", "poster", "data", "action"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, key, attrs[key][:80])
    style = "".join(re.findall(r"<style>(.*?)</style>", page, re.S))
    assert "url(" not in style and "@import" not in style
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "default-src 'none'" in page  # the browser refuses any fetch a later change might add
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert sum(s.startswith("data:image/png;base64,") for s in imgs) >= 3  # loss curves + two grids
    grid = Image.open(io.BytesIO(base64.b64decode(imgs[-1].split(",", 1)[1])))
    assert grid.format == "PNG" and grid.size[0] > 8


def test_one_run_shows_its_whole_recipe_collapsed(tiny_run, sandbox_cli, tmp_path):
    out = tmp_path / "one.html"
    assert sandbox_cli("report", tiny_run, "--out", out).returncode == 0
    page = out.read_text()
    assert "Recipe differences" not in page
    details = re.search(r"<details><summary>All (\d+) settings of the recipe</summary>(.*?)</details>", page, re.S)
    assert details and int(details.group(1)) > 20 and "head.width" in details.group(2)
    assert "None of the runs holds an animation" in page


def test_a_gif_the_run_holds_is_embedded(runs, sandbox_cli, tmp_path):
    run = tmp_path / "with_gif"
    shutil.copytree(runs["alpha"], run)
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(run / "samples" / "sampling.gif", save_all=True, append_images=frames[1:])
    assert sandbox_cli("report", run, "--out", tmp_path / "r.html").returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "data:image/gif;base64," in page and "samples/sampling.gif" in page


def test_animate_samples_one_gif_per_run(runs, sandbox_cli, tmp_path):
    out = tmp_path / "anim.html"
    proc = sandbox_cli("report", runs["alpha"], runs["fresh"], "--out", out, "--animate", "true",
                       "--animate_images", 4, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    gifs = re.findall(r"data:image/gif;base64,([A-Za-z0-9+/=]+)", page)
    assert len(gifs) == 1 and "no checkpoint to sample an animation from" in page  # fresh has none
    gif = Image.open(io.BytesIO(base64.b64decode(gifs[0])))
    assert gif.n_frames == 3  # one frame per sampling step (the tiny recipe's num_iter)


# ----------------------------------------------------------------------------------------
# The two eval.json forms and the sweep rows (the formats `eval --seeds` and `sweep` write)
# ----------------------------------------------------------------------------------------
def test_scores_read_flat_and_per_seed_files(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(ALPHA_EVAL))
    flat = read_scores(path)
    assert flat.mean["accuracy"] == 0.42 and flat.std == {} and flat.seeds == 1
    path.write_text(json.dumps({"seeds": BETA_SEEDS, "mean": {"accuracy": 0.5}, "std": {"accuracy": 0.25}}))
    seeded = read_scores(path)
    assert seeded.seeds == 3 and seeded.mean["accuracy"] == 0.5 and seeded.std["accuracy"] == 0.25  # as written
    assert seeded.mean["frechet_distance"] == pytest.approx(90.0)  # computed where the file has no mean/std
    assert seeded.std["frechet_distance"] == pytest.approx(10.0)  # sample std (n - 1)
    path.write_text("{torn")
    assert "unreadable" in read_scores(path).error
    assert read_scores(tmp_path / "missing.json") is None


def test_sweep_rows_with_and_without_seeds(tmp_path):
    folder = tmp_path / "sweeps" / "grid"
    folder.mkdir(parents=True)
    rows = [{"point": {"cfg": 1.0}, "metrics": {"accuracy": 0.9}},
            {"point": {"cfg": 2.0}, "metrics": {"accuracy": 0.95}, "std": {"accuracy": 0.01}},
            {"point": {"cfg": 3.0}, "metrics": {"accuracy": {"mean": 0.97, "std": 0.02}}},
            {"metrics": {"accuracy": 1.0}}]  # no point: not a row
    (folder / "results.json").write_text(json.dumps(rows))
    (sweep,) = read_sweeps(tmp_path)
    assert [r["metrics"]["accuracy"] for r in sweep.rows] == [0.9, 0.95, 0.97]
    assert [r["std"].get("accuracy") for r in sweep.rows] == [None, 0.01, 0.02] and sweep.error is None


# ----------------------------------------------------------------------------------------
# Seen the way a person sees it: headless Chromium, a screenshot and the page's DOM
# ----------------------------------------------------------------------------------------
def _browser() -> str | None:
    names = [os.environ.get("SANDBOX_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
             "google-chrome-stable"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    # the flags keep a headless Chromium off the network and away from the user's profile
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", *args, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_browser() is None, reason="no headless browser: install Debian's chromium "
                                                "(apt-get install -y chromium) or set SANDBOX_CHROMIUM")
def test_report_renders_in_a_headless_browser(report, runs, tmp_path):
    shot = tmp_path / "shot.png"
    proc = _chromium(report, "--window-size=1100,2400", f"--screenshot={shot}")
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1100, 2400)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 200  # text, tables, the plot and the sample grids, not a blank page
    assert (pixels < 250).any(-1).mean() > 0.03
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # each run's colour: its swatch and its loss curve
        assert (np.abs(pixels.astype(int) - colour).sum(-1) < 30).sum() > 50
    dom = _chromium(report, "--dump-dom").stdout
    text = _Page(dom).words
    for name in runs:
        assert name in text
    assert "42.0%" in text and "62.0 ± 2.0%" in text and "not evaluated yet" in text


# ----------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written
# ----------------------------------------------------------------------------------------
def expect_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_inputs_that_are_not_run_directories(sandbox_cli, runs, tmp_path):
    out = tmp_path / "r.html"
    expect_user_error(sandbox_cli("report", runs["alpha"], tmp_path / "nope", "--out", out), "run directory not found")
    (tmp_path / "plain").mkdir()
    expect_user_error(sandbox_cli("report", tmp_path / "plain", "--out", out), "not a run directory (no recipe.yaml)")
    expect_user_error(sandbox_cli("report", "--out", out), "no runs given")
    assert not out.exists()


def test_bad_out(sandbox_cli, runs, tmp_path):
    expect_user_error(sandbox_cli("report", runs["alpha"], "--out", tmp_path / "r.png"), "must name an .html file")
    (tmp_path / "file").write_text("x")
    expect_user_error(sandbox_cli("report", runs["alpha"], "--out", tmp_path / "file" / "r.html"),
                      "not a writable directory")
    (tmp_path / "d.html").mkdir()
    expect_user_error(sandbox_cli("report", runs["alpha"], "--out", tmp_path / "d.html"), "is a directory")


def test_a_failed_write_leaves_nothing(sandbox_cli, runs, tmp_path, monkeypatch):
    import errno

    import sandbox.run.files

    def full_disk(path, data):
        Path(path).write_bytes(data[:10])  # torn, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sandbox.run.files, "_write_file", full_disk)
    out = tmp_path / "new" / "r.html"
    expect_user_error(sandbox_cli("report", runs["alpha"], "--out", out), "No space left on device")
    assert not (tmp_path / "new").exists()  # no page, no temporary file, no folder made for it
