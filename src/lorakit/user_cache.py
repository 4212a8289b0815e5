"""Where lorakit keeps what it can make again but would rather not: $LORAKIT_CACHE, else ~/.cache/lorakit
($XDG_CACHE_HOME/lorakit). Dequantized GGUF bases and torch.compile's caches live under it."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(part: str) -> Path:
    """The directory `part` of lorakit's cache (not created)."""
    root = os.environ.get("LORAKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
    return Path(root) / part
