"""Which paths the dashboard may touch: runs only under the runs root, models and data only under the allowed
roots (the runs root, the quickstart's assets and any --read-root), or a hub id. Every path a request names is
resolved (symlinks and '..' included) before it is compared, as the server's adapter directory is."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError
from ..train.output_dir import RUN_FILE

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
UI_DIR = ".lorakit-ui"  # under the runs root: what the dashboard keeps of the runs and exports it started
QUICKSTART_ASSETS = Path(__file__).resolve().parent.parent / "quickstart" / "assets"


class UnknownRun(LookupError):
    """A run name that names no run under the runs root (or could not: '..', absolute, too deep)."""


def check_run_name(name: str) -> str:
    """`name` if it could name a run (one or two segments of letters, digits, '.', '_', '-'), else UnknownRun."""
    parts = name.split("/") if isinstance(name, str) else []
    if not 1 <= len(parts) <= 2 or not all(RUN_NAME.match(p) and p not in (".", "..") for p in parts):
        raise UnknownRun(name)
    return name


class Roots:
    """The runs root (where runs are listed and started) and the roots models and data may be read from."""

    def __init__(self, runs: str | Path, read: list[str | Path] = ()):
        self.runs = Path(runs).expanduser().resolve()
        if not self.runs.is_dir():
            raise ConfigError(f"--root {runs}: not a directory", where="lorakit ui")
        self.read = [self.runs, QUICKSTART_ASSETS, *(Path(r).expanduser().resolve() for r in read)]
        self.ui = self.runs / UI_DIR

    def new_run_dir(self, name: str) -> Path:
        """The directory of a new run called `name` (one path segment under the runs root)."""
        if not isinstance(name, str) or not RUN_NAME.match(name) or name in (".", ".."):
            raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (100 at most), starting "
                              "with a letter or digit", where="run name")
        path = (self.runs / name).resolve()
        if path.parent != self.runs:
            raise ConfigError(f"run name {name!r}: must be a directory directly under {self.runs}", where="run name")
        return path

    def run_dir(self, name: str) -> Path:
        """An existing run's directory: `name` is its path relative to the runs root (a sweep's members are one
        level deeper), and it must hold lorakit's run file."""
        path = (self.runs / check_run_name(name)).resolve()
        if not path.is_relative_to(self.runs) or path == self.runs or not (path / RUN_FILE).is_file():
            raise UnknownRun(name)
        return path

    def readable(self, value: str, field: str) -> str:
        """A model or data location from a form: a hub id, or a path (relative ones from the runs root) inside an
        allowed root, returned absolute. ConfigError names the field otherwise."""
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{field}: required", where="run config")
        local = Path(value).expanduser()
        local = (local if local.is_absolute() else self.runs / local).resolve()
        if local.exists():
            if any(local.is_relative_to(root) for root in self.read):
                return str(local)
            raise ConfigError(f"{field}: {value} is outside the directories this dashboard may read "
                                f"({', '.join(map(str, self.read))}); start `lorakit ui` with --read-root DIR to "
                                "allow another", where="run config")
        if HUB_ID.match(value) and ".." not in value:
            return value  # a hub id: loaded by transformers, not a path here
        raise ConfigError(f"{field}: {value} does not exist", where="run config")
