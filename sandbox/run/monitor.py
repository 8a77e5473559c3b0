"""Watching a run: the loss-curve PNG written at the end of training, and optional TensorBoard logging.

The curve is drawn with matplotlib's object API (``Figure`` + the Agg canvas, no pyplot), so it never
touches a global backend or opens a window. TensorBoard is an optional extra
(``pip install "mar-sandbox[tensorboard]"``); asking for it without the package is a clear error before
any work starts.
"""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np

from sandbox.errors import UserError
from sandbox.run.files import atomic_write_bytes
from sandbox.run.rundir import damaged_lines, load_metrics


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (``sandbox.run.rundir.load_metrics``): a torn last line (a run killed
    mid-write) is skipped, damaged records are skipped or stripped of what is not a number, with one warning."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        records, damaged, _ = load_metrics(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    if damaged:
        print(f"warning: {path}: {damaged_lines(damaged)} skipped or stripped of values that are not numbers",
              file=sys.stderr, flush=True)
    return records


def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with the bias correction of Adam/TensorBoard (the first points are not
    pulled towards 0)."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def plot_metrics(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path | None:
    """Draw loss (log scale, raw and smoothed), learning rate and grad norm against the step into a PNG.

    Returns the path, or None when the log has no records yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    if not records:
        return None
    step = np.array([r["step"] for r in records], dtype=float)

    def column(key):
        return np.array([float(r.get(key, math.nan)) for r in records])

    loss, lr, grad = column("loss"), column("lr"), column("grad_norm")
    fig = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_grad = fig.subplots(3, 1, sharex=True, height_ratios=(3, 1, 1))
    ok = np.isfinite(loss)
    ax_loss.plot(step[ok], loss[ok], color="tab:blue", alpha=0.3, lw=1, label="loss")
    if ok.sum() > 1:
        span = max(2, int(ok.sum()) // 20)  # smooth over ~5% of the points
        ax_loss.plot(step[ok], _smooth(loss[ok], span), color="tab:blue", lw=2, label=f"EMA over {span} points")
    if ok.any() and (loss[ok] > 0).all():
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_lr.plot(step, lr, color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(True, alpha=0.3)
    ax_grad.plot(step, grad, color="tab:green")
    ax_grad.set_ylabel("grad norm")
    ax_grad.set_xlabel("step")
    ax_grad.grid(True, alpha=0.3)
    if title:
        ax_loss.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out_path = Path(out_path)
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path


class TensorBoardLogger:
    """Scalars (loss, lr, grad norm, throughput) and sample grids to ``log_dir`` for TensorBoard.

    The writer opens on first use, so a run that fails before logging leaves no event file.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("train.tensorboard is on but TensorBoard is not installed: "
                            "pip install 'mar-sandbox[tensorboard]' (or set --train.tensorboard false)") from e
        self._cls, self.log_dir, self._writer = SummaryWriter, Path(log_dir), None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._cls(log_dir=str(self.log_dir))
        return self._writer

    def scalars(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """``grid`` (H,W,3) uint8."""
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
