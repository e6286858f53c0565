"""Atomic file writes: write to a temporary file (or folder: `replace_folder`) beside the target,
fsync, then rename.

A crash or a full disk mid-write leaves the previous file intact (POSIX rename is atomic within
one filesystem). Standard library only, so every level of the package may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def replace_folder(folder: str, write, swap: bool = True) -> None:
    """`folder` replaced as a whole: write(tmp) fills `folder + ".tmp"` beside it, which then takes
    its place, so a crash mid-way leaves the previous folder as it was. In a write shared by several
    processes (a sharded model's export) every one calls it and one swaps: the others pass
    swap=False and only write."""
    import shutil

    tmp, old = folder + ".tmp", folder + ".old"
    if swap:
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
    write(tmp)
    if not swap:
        return
    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
