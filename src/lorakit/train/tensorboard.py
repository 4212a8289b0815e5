"""TensorBoard logging (train.tensorboard: true) as a plain fit() hook."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

# Metric-row keys written as scalars, under TensorBoard tag names.
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
           "eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}


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
        for key, tag in SCALARS.items():
            value = info.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, global_step=info["step"])
        if event == "eval":
            self.writer.flush()  # evaluations are rare and worth seeing at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
