"""Folders (and files) written all at once: into `<dest>.tmp-<pid>`, renamed to `dest` only when complete.

A Python error or Ctrl-C removes the temporary folder on the way out; a SIGKILL cannot, so the
next writer of the same destination removes temporaries whose process is gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it becomes `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        yield tmp
        if replace and dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:  # runs on errors and on KeyboardInterrupt alike
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(dest: Path, text: str) -> None:
    """A crash or Ctrl-C leaves the old file or the new one, never half of one."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp(dest: Path) -> None:
    """Remove `dest.tmp-<pid>` folders left by processes that no longer exist."""
    for stale in dest.parent.glob(f"{dest.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
