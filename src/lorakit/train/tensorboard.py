"""TensorBoard logging (train.tensorboard: true) as a plain fit() hook."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

# Metric-row keys written as scalars, under TensorBoard tag names.
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
           "eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}

# An objective's own columns (preference: rewards/chosen, logps/rejected, kl, ...; eval_ prefixed in evaluations).
OBJECTIVE_SCALARS = ("rewards/", "logps/", "kl", "nll_loss", "log_odds_chosen")


def _objective_tag(key: str) -> str | None:
    section, name = ("eval", key[len("eval_"):]) if key.startswith("eval_") else ("train", key)
    return f"{section}/{name}" if name.startswith(OBJECTIVE_SCALARS) else None


class TensorBoardHook:
    """Writes each step's and each evaluation's metrics to `log_dir` for `tensorboard --logdir`."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard: true needs the tensorboard package: pip install tensorboard "
                              "(or set train.tensorboard: false)", where="run config") from None
        self._writer_class, self.log_dir, self.writer = SummaryWriter, str(log_dir), None

    def __call__(self, event: str, info: dict) -> None:
        if event not in ("step", "eval"):
            return
        if self.writer is None:  # made at the first event: after fit has checked the output directory
            self.writer = self._writer_class(log_dir=self.log_dir)
        for key, value in info.items():
            tag = SCALARS.get(key) or _objective_tag(key)
            if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, global_step=info["step"])
        if event == "eval":
            self.writer.flush()  # evaluations are rare and worth seeing at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
