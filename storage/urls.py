"""Local paths and fsspec URLs, and the one atomic-write routine every format uses."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec


class WriteFailedError(OSError):
    """A write to an output failed (disk full, quota, I/O error). Keeps the errno of the
    failure; the message names what was being written and where, and the original error is
    chained as its cause."""

    def __init__(self, errno_: int | None, message: str):
        super().__init__(errno_, message)

    def __str__(self) -> str:  # the message alone, not "[Errno 28] ..."
        return str(self.strerror)

    @classmethod
    def wrap(cls, error: OSError, what: str, note: str = "") -> "WriteFailedError":
        """`writing <what> failed: <reason>[; <note>]`, e.g. reason "No space left on device"."""
        return cls(error.errno, f"writing {what} failed: {error.strerror or error}" + (f"; {note}" if note else ""))


def is_local(url: str | os.PathLike) -> bool:
    url = str(url)
    return "://" not in url or url.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    url = str(url)
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def atomic_write_bytes(path_or_url: str | os.PathLike, data: bytes) -> str:
    """Write a whole file so that readers never see a partial one. Local paths: a unique
    hidden temp file in the same folder, fsync, rename (opened with "x", not mkstemp, so it
    gets the usual umask permissions rather than 0600). URLs: fsspec (object-store PUTs are
    atomic). Returns the path written."""
    path = str(path_or_url)
    if is_local(path):
        p = local_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(p)
    with fsspec.open(path, "wb", auto_mkdir=True) as f:
        f.write(data)
    return path


def read_bytes(path_or_url: str | os.PathLike) -> bytes:
    path = str(path_or_url)
    if is_local(path):
        return local_path(path).read_bytes()
    with fsspec.open(path, "rb") as f:
        return f.read()


def atomic_write_text(path_or_url: str | os.PathLike, text: str) -> str:
    return atomic_write_bytes(path_or_url, text.encode("utf-8"))


def atomic_torch_save(obj, path_or_url: str | os.PathLike) -> str:
    """torch.save through `atomic_write_bytes` (a checkpoint is never seen half-written)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path_or_url, buf.getvalue())
