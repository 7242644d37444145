"""Files that appear whole or not at all, files created only if absent (lock files), and a file's SHA-256:
the one place hvpmtl syncs to disk or creates exclusively.

An atomic write goes to a temporary file in the same folder (a rename never crosses file systems), which
is flushed and fsync'ed, renamed over the target, and then the folder is fsync'ed so that the rename itself
survives a crash of the node (on NFS and Lustre too: fsync is the commit). A reader sees the old file or
the new one, never half of one, and a process that has the old one open or mapped keeps it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional


def fsync_file(f) -> None:
    """Flush an open file object to the disk."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename, a created file) durable. Best effort: some file systems
    refuse to open or sync a folder, and the data itself is synced already."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, temp_name: Optional[str] = None, mode: Optional[int] = None) -> Iterator:
    """Yield a binary file to write; on leaving without an error it replaces `path` atomically and durably,
    on an error the temporary file is removed and `path` is untouched. `temp_name`: the temporary file's
    name in the same folder (default `.<name>.tmp-<pid>`); `mode`: its permission bits (default: as created)."""
    path = Path(path)
    tmp = path.with_name(temp_name or f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            fsync_file(f)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, temp_name: Optional[str] = None,
                 mtime_ns: Optional[int] = None) -> Path:
    """Write `data` (str: UTF-8) to `path` through atomic_file; `mtime_ns` sets the new file's times."""
    path = Path(path)
    with atomic_file(path, temp_name) as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if mtime_ns is not None:
            f.flush()
            os.utime(f.fileno(), ns=(mtime_ns, mtime_ns))
    return path


def create_exclusive(path: str | os.PathLike, data: bytes | str = b"") -> bool:
    """Create `path` holding `data` (synced) only if it does not exist yet: O_CREAT|O_EXCL, atomic on local
    file systems, NFSv3+ and Lustre (what lock files rely on). False when it exists; other OSErrors (a
    read-only folder) propagate."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        fsync_file(f)
    return True


def sha256_file(path: str | os.PathLike, fsync: bool = False) -> str:
    """Hex SHA-256 of a file's bytes (streamed). `fsync`: also sync the file, for a writer that hashes what
    it just wrote while it is still in the page cache."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
    return digest


def torch_save(obj, path: str | os.PathLike, **kwargs) -> None:
    """`torch.save(obj, path, **kwargs)` through a Python file, so that a write the kernel refuses (disk full, quota,
    I/O error) is its OSError naming `path`. torch's own file writer reports it as a RuntimeError that names neither
    ("PytorchStreamWriter failed writing file data/0: file write failed"); through a Python file the kernel's
    OSError is raised by `write` and stays the context of the RuntimeError torch raises on top of it ("unexpected
    pos") while it closes the archive."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f, **kwargs)
    except Exception as e:  # noqa: BLE001 -- re-raised unless the kernel refused a write
        refused = os_error_within(e)
        if refused is None:
            raise
        raise OSError(refused.errno, refused.strerror, os.fspath(path)) from e


def os_error_within(e: BaseException) -> Optional[OSError]:
    """The OSError with an errno that `e` is, or that raised it (its cause or context chain), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
