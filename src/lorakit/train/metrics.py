"""Training metrics: `metrics.jsonl` (one JSON object per line, flushed as written) and the loss plot.

Train rows: step, epoch, loss, lr, grad_norm, tokens, tokens_per_s (plus skipped=true on a skipped update).
Eval rows: step, eval_loss, eval_perplexity, eval_tokens. Non-finite floats are written as null, so every
line stays strict JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..atomic import write_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete row of a metrics file (a torn last line from a killed run is ignored)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLog:
    """Append-only writer of `<out>/metrics.jsonl`."""

    def __init__(self, out_dir: str | os.PathLike, *, keep_until_step: int | None = None):
        """Open for appending. `keep_until_step` (on resume) first drops rows past that step: the steps a killed
        run logged after its last checkpoint are about to be run again and logged anew."""
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            self.path.write_text("", encoding="utf-8")  # a fresh run starts a fresh log
        else:
            kept = [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= keep_until_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._handle.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def rows(self) -> list[dict]:
        return read_metrics(self.path)


class NullMetricsLog:
    """What processes other than rank 0 write to: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def rows(self) -> list[dict]:
        return []


def plot_losses(rows: list[dict], target: str | os.PathLike) -> bool:
    """Train and validation loss against step as a PNG, if matplotlib is installed; False when it is not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    panels = [("loss", series("loss"), series("eval_loss"))]
    if any("reward" in r for r in rows):  # grpo: the reward is the curve to watch (its loss hovers near 0)
        panels.append(("mean reward", series("reward"), series("eval_reward")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, train, val) in zip(axes[0], panels):
        if train:
            ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), marker="o", label="validation" + (" (greedy)" if name == "mean reward" else ""))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.legend()
    fig.tight_layout()
    write_atomic(target, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
