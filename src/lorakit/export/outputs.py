"""What an export may replace: with --overwrite, only what a lorakit export of the same kind wrote there.

- a merged model directory (merge, export --format hf): every file in it is listed in its MARKER file
  (lorakit_merge.json), which every merge writes last; an empty directory is fine too.
- a GGUF file (export --format gguf, lora-gguf): the file starts with GGUF's magic bytes.
- an Ollama directory (export --format ollama): nothing but a Modelfile and GGUF files.

Anything else is refused, naming a few of the files that would be lost, before any work starts; the writers
check again just before their atomic replace, since files may appear during a long merge.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import ExportError

MARKER = "lorakit_merge.json"
GGUF_MAGIC = b"GGUF"
KINDS = {
    "hf": f"a directory written by lorakit merge or export --format hf (its {MARKER} lists every file in it)",
    "gguf": "a GGUF file",
    "ollama": "a directory written by lorakit export --format ollama (a Modelfile and .gguf files only)",
}


def check_out(out: str | Path, kind: str, *, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse `out` if it exists, unless `overwrite` and it holds only what an export of `kind` writes; `inputs`
    (the base model, the adapter) may be neither `out` nor inside it."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    for given in inputs:
        path = Path(given)
        if path.exists() and (out.resolve() == path.resolve() or out.resolve() in path.resolve().parents):
            raise ExportError(f"--out {out} is (or holds) the input {given}; write the export somewhere else")
    if not overwrite:
        raise ExportError(f"{out} already exists; choose another --out, or pass --overwrite to replace it "
                          f"(which replaces only {KINDS[kind]})")
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; give the real path")
    foreign = _foreign(out, kind)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        unmarked = f" (it has no {MARKER}: lorakit did not write it)" if kind == "hf" and _recorded(out) is None else ""
        raise ExportError(f"--overwrite replaces only {KINDS[kind]}; {out} holds {shown}, which would be lost"
                          f"{unmarked}. Choose a new --out (one that does not exist yet), or move those files away")


def write_marker(directory: Path, **merged: object) -> None:
    """MARKER in `directory` (last: it lists every file already there) saying what was merged."""
    files = sorted(path.name for path in directory.iterdir())
    record = {"written_by": f"lorakit {__version__}", **merged, "files": files}
    (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _foreign(out: Path, kind: str) -> list[str]:
    """What in `out` an export of `kind` did not write (names, with why where it is not obvious)."""
    if kind == "gguf":
        if out.is_dir():
            return [f"{out.name}/ (a directory)"]
        return [] if _is_gguf(out) else [f"{out.name} (not a GGUF file)"]
    if not out.is_dir():
        return [f"{out.name} (a file, not a directory)"]
    entries = sorted(out.iterdir())
    if kind == "ollama":
        return [_label(p) for p in entries if not (p.is_file() and not p.is_symlink() and (
            p.name == "Modelfile" or (p.suffix == ".gguf" and _is_gguf(p))))]
    recorded = _recorded(out) or set()  # none: lorakit did not write it, so nothing in it is replaceable
    return [_label(p) for p in entries if p.name not in recorded or not p.is_file() or p.is_symlink()]


def _recorded(directory: Path) -> set[str] | None:
    """The files MARKER lists (itself included), or None without a readable MARKER."""
    try:
        files = json.loads((directory / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {*files, MARKER}


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _label(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name
