"""The exceptions lorakit raises. Library code raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose. `hint`, where set, is what the CLI prints as the way
    out (else it prints its hint for the error's kind)."""

    hint: str | None = None


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""

    def __init__(self, problems: list[str] | str, *, where: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"invalid {where}: {self.problems[0]}"
        else:
            message = f"invalid {where} ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class OutputDirError(ConfigError):
    """The run's output_dir cannot be used as it is: it holds another run or files lorakit did not write, or it
    cannot be written. The message says what is there and what to do."""

    def __init__(self, problem: str, *, hint: str):
        super().__init__(problem, where="output_dir")
        self.hint = hint


class TargetNotFoundError(LorakitError, ValueError):
    """A target module pattern matched nothing (or nothing LoRA can wrap) in the base model."""


class AdapterError(LorakitError):
    """An adapter name, file or state is unusable (unknown name, bad file, shape mismatch, merged state)."""


class DataError(LorakitError):
    """A data file or record is unusable."""


class ExportError(LorakitError):
    """A model or adapter cannot be exported in the requested format (and why), or the export's output path
    holds something an export may not replace."""


class CheckpointError(LorakitError):
    """A training checkpoint is missing, incomplete or corrupt."""


class TrainingError(LorakitError):
    """Training cannot go on (non-finite loss or gradients under the configured nan_policy).
    The message names the step; the last good checkpoint is kept."""

    def __init__(self, message: str, *, step: int | None = None):
        self.step = step
        super().__init__(message)
