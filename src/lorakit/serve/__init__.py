"""An OpenAI-compatible HTTP server (FastAPI) over lorakit.infer's engine. Needs `pip install 'lorakit[serve]'`.

Importing this package is cheap and needs neither FastAPI nor uvicorn; `create_app` and `ServeLimits`
load them on first use, and `require_server_dependencies()` says clearly what to install when they are missing.
"""

from __future__ import annotations

import importlib.util

from ..errors import LorakitError

__all__ = ["MissingDependencyError", "ServeLimits", "create_app", "require_server_dependencies"]


class MissingDependencyError(LorakitError):
    """An optional dependency of the server is not installed."""


def require_server_dependencies() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"lorakit serve needs {' and '.join(missing)}, which "
                                     f"{'is' if len(missing) == 1 else 'are'} not installed; "
                                     "run: pip install 'lorakit[serve]'")


def __getattr__(name: str):
    if name in ("ServeLimits", "create_app"):
        require_server_dependencies()
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
