"""Turning an adapter name (and optional relative path) from an HTTP request into a directory inside the
operator's --adapter-dir, or refusing.

Request-chosen paths are a traversal surface (vLLM's LoRA resolver joined names onto its root; Ollama's
"Probllama" wrote outside its store), so: the name matches an allowlist; the path is relative, made of
allowlisted components with no "." or ".."; the joined path is resolved (following symlinks) and must stay
inside the resolved root, and so must the two files read from it. Only safetensors weights are accepted:
no pickle on any load path. Messages name the relative path only, never the server's filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import AdapterError
from ..lora import read_adapter_config
from .errors import APIError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise APIError(400, "adapter name: use 1 to 64 letters, digits, '_' or '-', starting with a letter "
                            "or digit", param="name", code="invalid_adapter_name")
    return name


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    relative: str
    directory: Path


def resolve_adapter(root: Path, name: str, relative: str | None) -> ResolvedAdapter:
    """The adapter directory for a load request, checked to be a safetensors adapter inside `root`."""
    check_name(name)
    rel = name if relative is None else relative
    _check_relative(rel)
    base = root.resolve(strict=True)
    target = (base / rel).resolve()
    if target == base or not target.is_relative_to(base):
        raise APIError(400, f"adapter path {rel!r} leaves the adapter directory", param="path",
                       code="path_outside_adapter_dir")
    if not target.is_dir():
        raise APIError(404, f"no adapter directory {rel!r} in the adapter directory", type="not_found_error",
                       param="path", code="adapter_not_found")
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        file = target / filename
        if file.exists() and not file.resolve().is_relative_to(base):
            raise APIError(400, f"{rel}/{filename} links outside the adapter directory", param="path",
                           code="path_outside_adapter_dir")
    if not (target / WEIGHTS_FILE).is_file():
        pickled = [f for f in PICKLE_FILES if (target / f).exists()]
        why = (f"it holds only {pickled[0]} (a pickle, which can run code when loaded); convert it to "
               f"{WEIGHTS_FILE} with safetensors' save_file or PEFT's save_pretrained" if pickled
               else f"it has no {WEIGHTS_FILE}")
        raise APIError(400, f"adapter {rel!r} refused: only safetensors adapters are loaded, and {why}",
                       param="path", code="unsupported_adapter_format")
    try:
        read_adapter_config(target)
    except AdapterError as err:
        raise APIError(400, f"adapter {rel!r}: {scrub(str(err), target, base, rel)}", param="path",
                       code="invalid_adapter") from None
    return ResolvedAdapter(name=name, relative=rel, directory=target)


def _check_relative(rel: str) -> None:
    bad = APIError(400, "adapter path: give a relative path inside the adapter directory, made of letters, digits, "
                        "'.', '_' and '-' (no '..', no absolute paths)", param="path", code="invalid_adapter_path")
    if not isinstance(rel, str) or not rel or len(rel) > 512 or "\\" in rel or "\x00" in rel:
        raise bad
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise bad
    parts = rel.split("/")
    if any(not COMPONENT.match(p) or p in (".", "..") for p in parts):
        raise bad


def scrub(message: str, directory: Path, root: Path, rel: str) -> str:
    """Replace server paths in a library error message by what the client sent."""
    return message.replace(str(directory), rel).replace(str(root), "<adapter-dir>")
