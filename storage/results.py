"""Result tables: tidy tables written one part per work item, so a stage is resumable per item.

A `PartTable` lives in a folder (local path or fsspec URL):

    <table>/identity.json         what every part was computed with (codec, weights, settings)
    <table>/parts/<key>.parquet   one finished work item, written to a temporary name and renamed
    <table>/table.parquet         all parts in one file, rebuilt by `consolidate()`

A part that exists is complete (atomic rename), so a killed worker loses only the item it
held, and a failed write (a full disk) leaves no part behind: the error names the table and
the part, the parts written before it stay, and a rerun writes only what is missing.
Opening a table whose identity differs from the caller's refuses (or, with `overwrite`,
clears the parts): results computed with another codec checkpoint or other
settings are never mixed with new ones.
"""
from __future__ import annotations

import io
import json
import re

import fsspec
import pandas as pd

from storage.urls import WriteFailedError, atomic_write_bytes, atomic_write_text, read_bytes

_KEY_RE = re.compile(r"[A-Za-z0-9_.=-]+")


class StaleTableError(RuntimeError):
    pass


def identity_digest(identity: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


class PartTable:
    def __init__(self, url: str, identity: dict, overwrite: bool = False):
        self.url = str(url).rstrip("/")
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        existing = self.read_identity(self.url)
        if existing is not None and existing != self.identity:
            changed = sorted(k for k in set(existing) | set(self.identity) if existing.get(k) != self.identity.get(k))
            if not overwrite:
                raise StaleTableError(
                    f"result table {self.url} was computed with different {changed}: rerun with --overwrite "
                    f"to recompute it, or give another run folder (run_dir)")
            self.clear()
        if existing != self.identity:
            atomic_write_text(f"{self.url}/identity.json", json.dumps(self.identity, indent=2, sort_keys=True) + "\n")

    @classmethod
    def for_identity(cls, base_url: str, identity: dict) -> "PartTable":
        """The table of this identity under `<base_url>-<digest>`: other settings get their own
        table beside it, so nothing is mixed and nothing already computed is thrown away."""
        return cls(f"{str(base_url).rstrip('/')}-{identity_digest(identity)}", identity)

    @staticmethod
    def read_identity(url: str) -> dict | None:
        try:
            return json.loads(read_bytes(f"{str(url).rstrip('/')}/identity.json"))
        except FileNotFoundError:
            return None

    # -- parts -----------------------------------------------------------------------
    def _part(self, key: str) -> str:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid part key {key!r} (letters, digits, '_', '.', '=', '-')")
        return f"{self.url}/parts/{key}.parquet"

    def keys(self) -> set[str]:
        """Keys of the finished parts (one listing, not one lookup per item)."""
        folder = f"{self.root}/parts"
        if not self.fs.exists(folder):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        # Temporary files of an interrupted write start with '.'; they are not parts.
        return {n[:-len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith(".")}

    def has(self, key: str) -> bool:
        """Whether the part `key` is finished: one lookup. A worker checks its own items with
        it; listing every part (`keys`) per task or per image grows with the table, which at
        tens of thousands of images (or on an object store) costs more than the work."""
        self._part(key)  # the key's check
        return self.fs.exists(f"{self.root}/parts/{key}.parquet")

    def write(self, key: str, frame: pd.DataFrame) -> str:
        path = self._part(key)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        try:
            return atomic_write_bytes(path, buf.getvalue())
        except OSError as e:  # the temporary file is gone: no part, and the others are untouched
            raise WriteFailedError.wrap(e, f"part {key} of {self.url}") from e

    def read(self, keys=None) -> pd.DataFrame:
        keys = sorted(self.keys() if keys is None else keys)
        frames = [pd.read_parquet(io.BytesIO(read_bytes(self._part(k)))) for k in keys]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def clear(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    # -- the whole table -------------------------------------------------------------
    def consolidate(self, sort_by: list[str] | None = None) -> pd.DataFrame:
        """All parts as one frame, also written to table.parquet (atomically)."""
        frame = self.read()
        if sort_by and not frame.empty:
            frame = frame.sort_values(sort_by, kind="stable", ignore_index=True)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        try:
            atomic_write_bytes(f"{self.url}/table.parquet", buf.getvalue())
        except OSError as e:  # the parts stay; consolidating again rebuilds it
            raise WriteFailedError.wrap(e, f"table.parquet of {self.url}") from e
        return frame

    @staticmethod
    def load(url: str) -> pd.DataFrame:
        """The consolidated table of a finished stage."""
        path = f"{str(url).rstrip('/')}/table.parquet"
        try:
            return pd.read_parquet(io.BytesIO(read_bytes(path)))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no result table at {path}: run the stage that writes it first") from e


def write_frame(path_or_url: str, frame: pd.DataFrame) -> str:
    """One small table as parquet (atomic) and, beside it, CSV for people to read."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path_or_url, buf.getvalue())
    csv = str(path_or_url).rsplit(".", 1)[0] + ".csv"
    atomic_write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
    return path_or_url
