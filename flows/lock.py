"""One writer per project: `ptq run` and `ptq stage` hold an exclusive lock on the project for as
long as they write to it.

The lock is an OS file lock (flock) on .cache/ptq/project.lock: the kernel releases it when the
holder exits, however it exits (SIGKILL included), so a killed run never leaves a stale lock.
The file's text names the holder (pid and command) for the message a second run prints; it is
not trusted for anything else. A second run waits for the lock (printing who holds it, once) or,
with `wait=False`, fails at once with ProjectLocked, before it has read or written anything.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["LOCK_PATH", "ProjectLocked", "project_lock", "lock_holder"]

LOCK_PATH = Path(".cache") / "ptq" / "project.lock"


class ProjectLocked(RuntimeError):
    """Another ptq process holds the project's lock."""


def lock_holder(root: Path) -> str:
    """The holder as its lock file describes it ('unknown' when unreadable)."""
    try:
        return (root / LOCK_PATH).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def project_lock(root: Path, *, wait: bool = True, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the project's write lock inside the block. wait=False: raise ProjectLocked if taken."""
    path = root / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:  # a+: never truncates what the holder wrote
        if not _try_lock(f):
            holder = lock_holder(root)
            if not wait:
                raise ProjectLocked(f"{root}: another ptq process is writing to this project ({holder}); "
                                    f"wait for it to finish, or run without --no-wait to queue behind it")
            print(f"waiting for the project lock {path} (held by {holder}) ...", file=sys.stderr, flush=True)
            while not _try_lock(f):
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # released by close (and by the kernel if this process dies first)
