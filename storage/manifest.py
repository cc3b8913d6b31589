"""Stage manifests: what a pipeline stage was run with, so later runs can tell fresh
results from stale ones.

A manifest lives at ``<run_dir>/manifests/<stage>.json``. A stage is fresh when its
config digest and the hashes of all its inputs equal what the manifest recorded; the
code version is recorded for provenance but does not by itself make a stage stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec

from storage.urls import atomic_write_bytes, is_local, local_path

MANIFEST_DIR = "manifests"
REPO_ROOT = Path(__file__).resolve().parents[1]
_STAGE_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """Git commit of the repo (``<sha>`` or ``<sha>-dirty``), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return f"{sha}-dirty" if status.strip() else sha
    except (OSError, subprocess.SubprocessError):
        pass  # no git binary, not a checkout, or no commit yet
    try:
        from importlib.metadata import version

        return f"mfiba-{version('mfiba')}"
    except Exception:
        return "unknown"


@dataclass
class StageManifest:
    stage: str
    config_digest: str
    input_hashes: dict[str, str] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    items_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageManifest:
        # Ignore keys a newer writer may have added rather than failing on them.
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def manifest_path(run_dir_or_url: str | os.PathLike, stage: str) -> str:
    if not _STAGE_RE.fullmatch(stage):
        raise ValueError(f"invalid stage name {stage!r}")
    return f"{str(run_dir_or_url).rstrip('/')}/{MANIFEST_DIR}/{stage}.json"


def write_manifest(run_dir_or_url: str | os.PathLike, manifest: StageManifest) -> str:
    """Write ``<dir>/manifests/<stage>.json``; sets ``manifest.updated`` to now.

    Local paths are written to a temp file in the same directory and renamed, so readers
    never see a partial file. URLs go through fsspec (object-store PUTs are atomic)."""
    manifest.updated = _now()
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(manifest_path(run_dir_or_url, manifest.stage), text.encode("utf-8"))


def read_manifest(run_dir_or_url: str | os.PathLike, stage: str) -> StageManifest | None:
    """The stage's manifest, or None if it was never written."""
    path = manifest_path(run_dir_or_url, stage)
    try:
        if is_local(path):
            text = local_path(path).read_text(encoding="utf-8")
        else:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        return None
    try:
        return StageManifest.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"corrupt manifest {path}: {e}") from e


def is_fresh(
    manifest: StageManifest | None,
    config_digest: str,
    input_hashes: dict[str, str],
) -> tuple[bool, str]:
    """(fresh, reason). Reason names what changed, or summarises the fresh manifest."""
    if manifest is None:
        return False, "no manifest: stage never completed"
    reasons = []
    if manifest.config_digest != config_digest:
        reasons.append(f"config digest changed ({manifest.config_digest[:12]} -> {config_digest[:12]})")
    old, new = manifest.input_hashes, input_hashes
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if changed:
        reasons.append("inputs changed: " + ", ".join(f"{k} ({old[k][:12]} -> {new[k][:12]})" for k in changed))
    if added:
        reasons.append(f"new inputs: {', '.join(added)}")
    if removed:
        reasons.append(f"inputs no longer used: {', '.join(removed)}")
    if reasons:
        return False, f"stage {manifest.stage!r} is stale: " + "; ".join(reasons)
    return True, (
        f"stage {manifest.stage!r} is fresh ({manifest.items_done} items, "
        f"code {manifest.code_version}, updated {manifest.updated})"
    )


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a local file or fsspec URL, read in chunks (constant memory)."""
    h = hashlib.sha256()
    p = str(path)
    opener = open(local_path(p), "rb") if is_local(p) else fsspec.open(p, "rb").open()
    with opener as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
