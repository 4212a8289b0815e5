"""The playground's engine: `lorakit serve`'s own (serve.server.build), over the base of the chosen runs with their
adapters loaded, reached at /playground/v1/... (the OpenAI API). The page asks it once per column, base and
adapters at once, so one engine batches them with a per-row adapter each."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError
from ..train.output_dir import ADAPTER_DIR, read_run_file
from .runs import has_adapter

log = logging.getLogger("lorakit.ui")
PREFIX = "/playground"


def adapter_id(run_name: str, taken: set[str]) -> str:
    """A serve adapter name (letters, digits, '_' and '-', 64 at most) for a run, unique among `taken`."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:60] or "run"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def base_of(run_dir: Path) -> tuple[str, str]:
    """(model.name_or_path, model.dtype) a run trained on, from its run file."""
    settings = (read_run_file(run_dir) or {}).get("settings") or {}
    base = settings.get("model.name_or_path")
    if not isinstance(base, str):
        raise ConfigError(f"{run_dir.name}: its run file does not name the base model", where="playground")
    if settings.get("model.gguf_file"):
        base = str(Path(base) / settings["model.gguf_file"])
    return base, str(settings.get("model.dtype") or "auto")


class Playground:
    """At most one loaded engine (a base with adapters); loading another closes the previous one."""

    def __init__(self):
        self.engine = self.app = None
        self.loaded: dict | None = None
        self._lock = threading.Lock()

    def load(self, runs: list[tuple[str, Path]]) -> dict:
        """Load the base the runs share, each run's adapter under an id; returns the columns the page shows."""
        from ..serve.server import ServeOptions, base_model_name, build

        if not runs:
            raise ConfigError("choose at least one run with an adapter", where="playground")
        bases = {base_of(path) for _, path in runs}
        if len(bases) > 1:
            raise ConfigError(f"the runs were trained on different bases ({', '.join(sorted(b for b, _ in bases))}); "
                              "compare runs of one base at a time", where="playground")
        (base, dtype), = bases
        adapters: dict[str, str] = {}
        columns = [{"label": f"base ({base_model_name(base)})", "model": base_model_name(base)}]
        for name, path in runs:
            if not has_adapter(path):
                raise ConfigError(f"run {name} has no adapter yet (it is written at the end of training)",
                                  where="playground")
            key = adapter_id(name, set(adapters) | {columns[0]["model"]})
            adapters[key] = str(path / ADAPTER_DIR)
            columns.append({"label": name, "model": key})
        with self._lock:
            self.close()
            self.engine, self.app = build(ServeOptions(model=base, adapters=adapters, dtype=dtype), log_fn=log.info)
            self.loaded = {"base": base, "columns": columns}
        return self.loaded

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.app = self.loaded = None


class Dispatch:
    """/playground/... to the loaded serve app (404 when none is loaded), everything else to the dashboard."""

    def __init__(self, ui: ASGIApp, playground: Playground):
        self.ui, self.playground = ui, playground

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == PREFIX or path.startswith(PREFIX + "/")):
            app = self.playground.app
            if app is None:
                body = json.dumps({"error": {"message": "no model is loaded in the playground; choose runs and "
                                                        "press Load"}}).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            inner = dict(scope, path=path[len(PREFIX):] or "/", root_path=scope.get("root_path", "") + PREFIX)
            inner.pop("raw_path", None)
            await app(inner, receive, send)
            return
        await self.ui(scope, receive, send)
