"""What keeps a run folder safe while a run trains in it: one training process per folder (a lock file that a
dead process does not leave stuck), and Ctrl-C / SIGTERM turned into "finish this step, write a checkpoint,
then stop".

The lock is ``out_dir/.lock``, held with ``flock``: the kernel releases it when its process ends, however it
ends (even ``kill -9``), so a stale file never blocks the next run; the file names the pid and host of its
holder for the error message. Within one process the lock is re-entrant (the command takes it before writing
the run's config, the loop takes it again).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from ..errors import RequestError

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # resolved out_dir -> [file descriptor, depth, created out_dir]


class RunFolderBusy(RequestError):
    """Another live process trains in the same run folder."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a step; ``checkpoint`` holds that step (resume from it)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# ---------------------------------------------------------------------------------------------------------
# The lock file


def launch_rank() -> int:
    """This process's rank as ``torchrun`` / ``accelerate launch`` set it (0 for a single process), known before
    the accelerator exists: only rank 0 holds the run folder's lock."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def run_folder_lock(out_dir, enabled: bool = True):
    """Hold ``out_dir/.lock`` for the body; RunFolderBusy when a live process holds it. On release the lock
    file is deleted, and ``out_dir`` too when this call created it and it is left empty (a refused run leaves
    nothing behind)."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _held:  # this process holds it already
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = _acquire(out_dir / LOCK_FILE)
    _held[key] = [fd, 1, created]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(out_dir / LOCK_FILE)  # before the unlock: a waiter then re-checks the path (see _acquire)
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding an exclusive flock on the file that ``path`` names now."""
    import fcntl  # POSIX; the package trains on Linux and macOS

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(f"{path.parent} is in use by another training process ({holder}; lock file {path}); "
                                "wait for it to end or choose another --out (nothing was written)") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder may have deleted the file between our open and our flock: then we hold a lock on a file that
        # no longer has this name, and must try again on the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


# ---------------------------------------------------------------------------------------------------------
# Signals


class StopRequest:
    """Set by SIGINT / SIGTERM while :func:`stop_signals` is active; the loop reads it after every step."""

    def __init__(self):
        self.signum: int | None = None


_active: list[StopRequest] = []  # the requests of the stop_signals blocks now open (innermost last)


def stop_requested() -> int | None:
    """The signal number that asked the innermost training run to stop, or None."""
    return _active[-1].signum if _active else None


@contextlib.contextmanager
def stop_signals():
    """Yield a StopRequest that the first SIGINT or SIGTERM sets (the step in progress and a checkpoint being
    written then finish); a second one stops at once (KeyboardInterrupt). Outside the main thread signals
    cannot be caught, and the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    _active.append(request)
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum, frame):
        if request.signum is not None:  # asked twice: stop now; the previous checkpoint is intact
            raise KeyboardInterrupt
        request.signum = signum

    for s in signums:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        _active.remove(request)
        for s, h in previous.items():
            signal.signal(s, h)
