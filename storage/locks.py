"""Exclusive locks on output locations (a run folder, a feature store), held by the process
that coordinates a writing stage for as long as the stage runs.

Two runs that write the same place would interleave their writes (two `mfiba precode` on one
run folder, two `mfiba features` on one store). The second one now waits (``timeout_s``, or
the ``MFIBA_LOCK_WAIT_S`` environment variable) or, by default, refuses at once with a
message that says who holds the location:

    run folder runs/demo is in use by `mfiba precode` (pid 1234 on host, since 2025-01-01
    07:10:03 UTC); wait for it to finish or use another run_dir

Where the lock lives:

    <run_dir>/.mfiba.lock          a folder's lock, inside it
    <store>.lock                   a zarr store's lock, beside it (never a zarr member)
    <lock>.json                    who holds it: pid, host, stage, argv, since (UTC)

How:
- ``filelock.FileLock``, which on Linux is ``flock(2)``: the kernel drops the lock when the
  holding process dies, SIGKILL included, so a crashed run never leaves a stale lock (the
  holder json may stay behind; it is only read to word the refusal).
- One lock object per lock file per process, shared by all threads, and acquisitions nest:
  the pipeline holds the run folder while its stage subflows (same process) take it again.
  Two objects on one file in one process would each open the file, and flock treats
  separate opens as separate owners, so the nested acquisition would refuse itself.
- The lock is advisory and only the coordinating process takes it: the Dask workers a stage
  starts write under the coordinator's hold (spawned workers do not inherit its descriptor).
- Remote fsspec URLs (memory://, s3://, gs://, ...) have no portable exclusive-create or
  flock, and a lock object emulated on an object store is racy without conditional writes,
  so they are not locked (a debug line says so): the caller keeps such outputs apart.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from storage.urls import atomic_write_text, is_local, local_path

log = logging.getLogger(__name__)

WAIT_ENV = "MFIBA_LOCK_WAIT_S"
FOLDER_LOCK_NAME = ".mfiba.lock"
POLL_S = 0.1

_GUARD = threading.Lock()
_LOCKS: dict[str, object] = {}  # lock file -> its one FileLock in this process
_DEPTH: dict[str, int] = {}  # lock file -> nested acquisitions held by this process
if hasattr(os, "register_at_fork"):  # a forked child holds nothing (filelock closes its copy of the descriptor)
    os.register_at_fork(after_in_child=_DEPTH.clear)


class OutputLockedError(RuntimeError):
    """Another process holds the output location (and did not release it in time)."""


@dataclass(frozen=True)
class LockTarget:
    """What to lock: ``location`` is a local folder or store path (or a URL, not locked)."""

    location: str
    label: str = "run folder"  # how the refusal names it ("run folder", "feature store", ...)
    hint: str = "use another run_dir"  # what else the user can do
    beside: bool = False  # True: <location>.lock beside it (a zarr store); False: inside it

    def lock_file(self) -> Path:
        p = local_path(self.location).absolute()
        return p.with_name(p.name + ".lock") if self.beside else p / FOLDER_LOCK_NAME


def wait_seconds(timeout_s: float | None = None) -> float:
    """The wait: ``timeout_s`` when given, else ``$MFIBA_LOCK_WAIT_S``, else 0 (refuse at once)."""
    if timeout_s is not None:
        return max(0.0, float(timeout_s))
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={raw!r}: expected a number of seconds to wait for a busy output") from None


def holder_file(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name + ".json")


def read_holder(lock_file: Path) -> dict | None:
    try:
        return json.loads(holder_file(lock_file).read_text())
    except (OSError, ValueError):
        return None


def _display(location: str) -> str:
    p = local_path(location).absolute()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (it has not recorded who it is)"
    since = str(info.get("since", "?")).replace("T", " ").replace("+00:00", " UTC")
    pid, host = info.get("pid", "?"), info.get("host", "?")
    who = f"`mfiba {info.get('stage', '?')}` (pid {pid} on {host}, since {since})"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        # flock died with that process; whoever holds the lock now has not written its record yet.
        return f"another process (the last recorded holder, {who}, has exited)"
    return who


def _lock_object(lock_file: Path):
    from filelock import FileLock

    key = str(lock_file)
    with _GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            # thread_local=False: the hold belongs to the process, so a subflow that runs in
            # another thread of it nests instead of blocking on its own parent.
            lock = _LOCKS[key] = FileLock(key, thread_local=False)
        return lock


@contextlib.contextmanager
def output_lock(target: LockTarget, stage: str, timeout_s: float | None = None) -> Iterator[Path | None]:
    """Hold ``target`` exclusively while the block runs; yields the lock file (None: not locked).

    Refuses with :class:`OutputLockedError` when another process holds it for longer than
    the wait (see :func:`wait_seconds`). Nested use in one process (any thread) just nests."""
    if not is_local(target.location):
        log.debug("%s %s is not a local path: not locked (no portable lock on remote stores)",
                  target.label, target.location)
        yield None
        return
    from filelock import Timeout

    wait = wait_seconds(timeout_s)
    lock_file = target.lock_file()
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_object(lock_file)
    key = str(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if wait <= 0:
            raise OutputLockedError(
                f"{target.label} {_display(target.location)} is in use by {_describe_holder(read_holder(lock_file))}; "
                f"wait for it to finish or {target.hint}") from None
        log.warning("%s %s is in use by %s; waiting up to %g s for it", target.label, _display(target.location),
                    _describe_holder(read_holder(lock_file)), wait)
        try:
            lock.acquire(timeout=wait, poll_interval=POLL_S)
        except Timeout:
            raise OutputLockedError(
                f"{target.label} {_display(target.location)} is still in use by "
                f"{_describe_holder(read_holder(lock_file))} after waiting {wait:g} s; "
                f"wait for it to finish or {target.hint}") from None
    try:
        with _GUARD:
            depth = _DEPTH[key] = _DEPTH.get(key, 0) + 1
        if depth == 1:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "argv": sys.argv,
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            try:
                atomic_write_text(holder_file(lock_file), json.dumps(info, indent=2) + "\n")
            except OSError as e:  # e.g. a full disk: the lock holds all the same, only the record is missing
                log.warning("could not record the holder of %s (%s)", lock_file, e)
        yield lock_file
    finally:
        with _GUARD:
            depth = _DEPTH[key] = _DEPTH[key] - 1
            if depth == 0:
                del _DEPTH[key]
        try:
            if depth == 0:  # before unlocking: the next holder's record is never removed
                holder_file(lock_file).unlink(missing_ok=True)
        finally:
            lock.release()


@contextlib.contextmanager
def output_locks(targets: list[LockTarget], stage: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold several targets, taken in the order given (callers use one order: run folder, then
    store, then other folders) and released in reverse; a refusal releases what was taken."""
    with contextlib.ExitStack() as stack:
        seen = set()
        for t in targets:
            key = t.lock_file() if is_local(t.location) else t.location
            if key in seen:
                continue
            seen.add(key)
            stack.enter_context(output_lock(t, stage, timeout_s))
        yield


def held_here(target: LockTarget) -> bool:
    """Whether this process holds ``target`` (for tests and diagnostics)."""
    return is_local(target.location) and _DEPTH.get(str(target.lock_file()), 0) > 0

