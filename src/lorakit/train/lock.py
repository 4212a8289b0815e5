"""A PID lockfile on a run's output directory, so two runs never write checkpoints into the same place.

The lock itself is an advisory `flock` on `<out>/.lorakit.lock`: the kernel drops it when its process dies,
however it dies, so a lock left by a killed run is stale by construction. The file's text (the holder's PID)
is for people and error messages. Where `fcntl` does not exist, the PID alone decides: a lock naming a
running process is refused, one naming a dead process is taken over.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

LOCK_FILE = ".lorakit.lock"

# realpath of the output directory -> (pid that took the lock, open file descriptor). The pid is kept
# because a forked child inherits this dict but not the right to write.
_held: dict[str, tuple[int, int]] = {}


def _key(out_dir: Path) -> str:
    return os.path.realpath(out_dir)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def holds_lock(out_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock on `out_dir`."""
    held = _held.get(_key(Path(out_dir)))
    return held is not None and held[0] == os.getpid()


def lock_holder(out_dir: str | os.PathLike) -> int | None:
    """The PID of the run that holds `out_dir`'s lock, or None, read without touching the lock (taking it even
    for a moment would make a run starting then fail). On Linux the kernel's table of locks (/proc/locks) says
    whether the PID in the file still holds its flock; elsewhere a living PID is taken as the holder."""
    path = Path(out_dir) / LOCK_FILE
    try:
        text, inode = path.read_text(encoding="ascii", errors="replace").strip(), path.stat().st_ino
    except OSError:
        return None
    pid = int(text) if text.isdigit() else None
    if pid is None or not _alive(pid):
        return None  # a released lock is emptied; a killed run's PID is dead
    try:
        table = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return pid
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4] == str(pid) and fields[5].endswith(f":{inode}"):
            return pid
    return None


def acquire_lock(out_dir: str | os.PathLike) -> None:
    """Lock `out_dir` for this process, or raise CheckpointError naming the PID of the run that holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if holds_lock(out_dir):
        raise CheckpointError(f"{out_dir}: this process already holds the lock on this output directory")
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous = _read_pid(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                busy = False
            except BlockingIOError:
                busy = True
        else:
            busy = previous is not None and previous != os.getpid() and _alive(previous)
        if busy:
            error = CheckpointError(
                f"{out_dir} is in use by another run (pid {previous if previous is not None else 'unknown'}, "
                f"lock file {path})"
            )
            error.hint = "wait for that run to end (or stop it), or choose another output directory"
            raise error
        if previous is not None and previous != os.getpid():
            warnings.warn(f"{path}: taking over a stale lock left by pid {previous}, which no longer holds it "
                          "(the run ended without releasing it)", stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _held[_key(out_dir)] = (os.getpid(), fd)


def release_lock(out_dir: str | os.PathLike) -> None:
    """Release the lock taken by acquire_lock (a no-op if this process does not hold it)."""
    key = _key(Path(out_dir))
    held = _held.get(key)
    if held is None or held[0] != os.getpid():
        return
    del _held[key]
    fd = held[1]
    try:
        # Empty the file rather than delete it: unlinking a flock'ed file lets a waiting opener lock the
        # old inode while a third process creates and locks a new one, and both believe they hold it.
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock
