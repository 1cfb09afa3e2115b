"""Writing files so that a crash, a full disk or an exception never leaves a half-written one in place.

Everything is written to a temporary sibling (``.<name>.partial-<pid>-<random>``, same folder, so the final
``os.replace`` is atomic on POSIX) and moved into place only when writing succeeded. Files get the usual
permissions (``open()`` and the umask), unlike ``tempfile.mkstemp``'s private 0600.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlmd_lab.errors import MLMDError


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a new folder); move it into place only if the
    block succeeded. ``fsync=True`` flushes a file to disk first (checkpoints, logs). A folder must not exist
    yet unless ``replace_folder=True``: then the old folder is moved aside just before the new one moves in and
    deleted after (the path never holds a mix of old and new files)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir() and target.exists():
            if not replace_folder:
                raise MLMDError(f"{target} already exists: write to a new folder or delete it first")
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        if fsync and tmp.is_file():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path. ``fsync`` as in :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).expanduser()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. ``fsync`` as in :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()
