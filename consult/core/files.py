"""Files written so that a reader (or another node, over a shared file system) sees the whole old
file or the whole new one, never a part, and never two writers' halves.

Every write goes to a temporary name in the target's own directory that no other process can
pick (random, created with O_EXCL), is fsynced, then renamed over the target (`os.replace`) or
linked to it when an existing file must not be replaced; the directory is fsynced after, so the
new name survives a power cut. The same directory matters: a rename is atomic only within one
file system, and on NFS only within one directory's server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A hidden name next to `path` that no other writer, on this node or another, will choose."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, replace: bool = True) -> None:
    """`data` into `path` in one step: replaces an existing file (`replace`), or refuses one
    with FileExistsError."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new name in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
