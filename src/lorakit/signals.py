"""SIGTERM handled like Ctrl-C: what schedulers, `docker stop` and `kill` send is a request to stop, and a
run asked to stop saves a checkpoint first (the loop's KeyboardInterrupt path), then exits 143."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so every path that saves on Ctrl-C saves on it too."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_handled_by(handler) -> Iterator[None]:
    """Within the block SIGTERM goes to `handler`; the previous handler is restored after. Outside the main
    thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated in the main thread."""
    return _sigterm_handled_by(_raise_terminated)


def sigterm_ignored():
    """Within the block, further SIGTERMs are ignored: the save they asked for is under way (schedulers and
    torchrun may each send one). Ctrl-C still aborts it, on purpose."""
    return _sigterm_handled_by(signal.SIG_IGN)
