"""Writing files so that a reader sees the old content or the new, never half of either, and
telling whether the process behind a temporary file or a snapshot still runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside `path` to write to; renamed onto `path` when the block succeeds
    and removed when it fails. Works for a file or a folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield str(tmp)
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # a folder cannot be renamed onto a non-empty one
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomically(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """`durable` also flushes the file to the disk before the rename (for manifests)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())


_PF_EXITING = 0x4  # Linux task flag: the process is being torn down
_SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in /proc's pending-signal masks


def process_is_alive(pid: int) -> bool:
    """True while `pid` runs; a process with a SIGKILL pending, one being torn down, and one
    waiting to be reaped (a zombie) no longer run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            pending = [
                int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))
            ]
    except OSError:
        return True  # no /proc: kill's answer stands
    state, flags = fields[0], int(fields[6])
    dying = flags & _PF_EXITING or any(mask & _SIGKILL_BIT for mask in pending)
    return state not in ("Z", "X") and not dying
