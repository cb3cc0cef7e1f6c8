"""One run per output: a lock file beside the checkpoint, naming the process that writes the run.

``<stem>.lock`` is created atomically (``O_CREAT | O_EXCL``) and holds ``<pid> <host>``. This
process removes it when the run ends (``utils.runtime.teardown_runtime``) or when it exits, however
it exits (``atexit``: a normal end, an exception, ``SystemExit``). A process killed outright (SIGKILL,
a power cut) leaves it behind; the next run on the same host sees that its process is gone and takes
it over. A lock written on another host is never taken over: its process cannot be checked from here.
"""

import atexit
import os
import socket
from pathlib import Path

from utils.cli import UserError

HOST = socket.gethostname()
_held = set()  # the lock files this process holds


def holder(path):
    """``(pid, host)`` written in a lock file; None if it is gone or does not say."""
    try:
        pid, host = Path(path).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    return (pid, host) if pid > 0 else None


def is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


ELSEWHERE = "write elsewhere with --name or --checkpoint"


def acquire(path):
    """Hold the lock file ``path`` for this process; refuse in one line while another process holds it.

    A lock this process already holds (an earlier run in the same process, such as a stage of
    reproduce.py) is kept; one left by a process that no longer runs is taken over, with a note.
    """
    path, me = Path(path), (os.getpid(), HOST)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = holder(path)
            if owner == me:
                _held.add(path.absolute())
                return
            if owner is None:
                raise UserError(f"{path} is held by a process it does not name; if no run is writing there, "
                                f"delete it, or {ELSEWHERE}") from None
            pid, host = owner
            if host != HOST:
                raise UserError(f"{path} is held by process {pid} on {host}; if no run is writing there, delete it, "
                                f"or {ELSEWHERE}") from None
            if is_running(pid):
                raise UserError(f"another run is writing these files: process {pid} holds {path}; wait for it to "
                                f"end, or {ELSEWHERE}") from None
            if _take_over(path, owner):
                print(f"note: {path} was left by process {pid}, which no longer runs; taken over")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{me[0]} {me[1]}\n")
        _held.add(path.absolute())  # released by its absolute path: the working folder may change meanwhile
        return


def _take_over(path, owner):
    """Remove a dead process's lock; False if another process took it over first.

    The lock is first renamed aside, which only one process can do: if what was renamed is not the
    dead process's lock any more (another run took it over in between), it is put back.
    """
    aside = path.with_name(f".{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if holder(aside) == owner:
            return True
        os.link(aside, path)
    except FileExistsError:  # a third run holds it now
        pass
    finally:
        aside.unlink(missing_ok=True)
    return False


def release(path):
    """Remove the lock file ``path`` if this process holds it."""
    path = Path(path).absolute()
    if path in _held:
        _held.discard(path)
        if holder(path) == (os.getpid(), HOST):
            path.unlink(missing_ok=True)


def release_all():
    for path in list(_held):
        release(path)


atexit.register(release_all)
