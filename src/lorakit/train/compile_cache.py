"""torch.compile's caches kept from one run to the next, and whether this run's layers are already in them.

torch keeps what inductor compiled (FX graphs, AOTAutograd's forward and backward) in TORCHINDUCTOR_CACHE_DIR,
by default under /tmp, which a reboot empties. lorakit points it at its own cache (user_cache("inductor")) unless
the user chose a directory. A second run of the same layer then compiles in seconds instead of a minute
(bench/compile_cache.py: 37 s cold, 6 s warm on a 40M model), so speed.compile: auto compiles far shorter runs
once a run of that layer has compiled: a marker per layer signature records it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomic
from ..user_cache import user_cache

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
MARKERS = "lorakit-compiled-layers"  # beside inductor's own entries, so clearing that directory clears these


def inductor_cache() -> Path:
    """Where inductor keeps its caches in this process once compiling: the user's TORCHINDUCTOR_CACHE_DIR (or the
    one torch set at an earlier compile), else lorakit's."""
    return Path(os.environ.get(INDUCTOR_ENV) or user_cache("inductor"))


def use_persistent_cache() -> Path:
    """Point inductor at inductor_cache() before compiling; returns it."""
    os.environ.setdefault(INDUCTOR_ENV, str(inductor_cache()))
    return Path(os.environ[INDUCTOR_ENV])


def layer_signature(layer: nn.Module) -> str:
    """What decides whether a compiled decoder layer can be reused: its code and shapes (the module tree's repr
    names every submodule, its sizes and LoRA's rank and dropout), its dtypes, the device and torch."""
    param = next(layer.parameters())
    device = param.device
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else torch.backends.cpu.get_cpu_capability())
    dtypes = sorted({str(p.dtype) for p in layer.parameters()})
    text = "\n".join([torch.__version__, device.type, machine, type(layer).__module__, repr(layer), *dtypes])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def is_warm(signature: str) -> bool:
    return (inductor_cache() / MARKERS / signature).is_file()


def mark_warm(signature: str) -> None:
    """Record that a run compiled layers of this signature into the cache (after its steps ran, so the forward
    and backward graphs are there)."""
    directory = inductor_cache() / MARKERS
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / signature, f"torch {torch.__version__}\n")
