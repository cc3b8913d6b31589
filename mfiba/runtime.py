"""Process-level runtime setup: project-local state and a local Prefect server.

Order matters. Prefect reads its settings (PREFECT_HOME, logging, analytics) once, when
`prefect` is first imported, and creates PREFECT_HOME at that moment. So an entry point
must call `setup_local_state()` *before* anything imports `prefect` (or a module that
does: flows/, tasks/, prefect_dask); otherwise `~/.prefect` is created and used.

Typical entry point:

    from mfiba.runtime import LocalPrefectServer, setup_local_state
    setup_local_state()                   # before importing prefect
    from flows.pipeline import pipeline   # imports prefect
    if __name__ == "__main__":            # Dask process workers need the guard
        with LocalPrefectServer():        # one shared server for this process and
            pipeline()                    # every Dask worker spawned afterwards

`LocalPrefectServer` may be entered after `import prefect`: it refreshes Prefect's
process-global settings so this process sees the new PREFECT_API_URL. Child processes
(Dask workers) read it from the environment; spawn them inside the `with` block.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"


def state_dir(repo_root: Path | None = None) -> Path:
    """`<repo>/.state`, the git-ignored folder for all local runtime state."""
    return Path(repo_root or REPO_ROOT).resolve() / ".state"


def local_state_env(state: Path) -> dict[str, str]:
    """The env defaults `setup_local_state` applies, for a given state folder."""
    return {
        # Prefect: profiles, SQLite DB (prefect.db), local result storage, telemetry markers.
        "PREFECT_HOME": str(state / "prefect"),
        # The server would send usage data to sens-o-matic.prefect.io on startup.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The client SDK analytics (Amplitude, first import/first flow milestones).
        "DO_NOT_TRACK": "1",
        # The UI shows upgrade prompts / marketing banners; nothing to fetch offline.
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # A temporary per-process server on a fresh DB can take >20 s (the default).
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "TORCH_HOME": str(state / "torch"),
        # Where torch's C++ extension loader builds the RoIAlign kernel (tasks/models/roi_align.py).
        "TORCH_EXTENSIONS_DIR": str(state / "torch_extensions"),
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "DASK_TEMPORARY_DIRECTORY": str(state / "dask"),
        # Dask's scheduler and nanny chatter (worker starts, closes) is not the user's news.
        "DASK_LOGGING__DISTRIBUTED": "warning",
        # compressai calls torch.jit.script at import; torch 2.14 warns about it in every
        # worker process. Inherited by Dask workers through the environment.
        "PYTHONWARNINGS": "ignore:`torch.jit.script` is deprecated:FutureWarning",
        **ALLOCATOR_ENV,
    }


# glibc malloc settings for every process (read from the environment at process start;
# `setup_local_state` applies them to its own process with mallopt). Torch's large buffers
# (one 160x160x64 activation of the demo synthesis is 6.5 MB) then stay on the heap between
# calls instead of coming back as fresh pages that fault in again: on this machine a VBR
# batched precoding took 27,000 to 63,000 page faults with glibc's defaults and about 400
# with these, and ran 5 to 7% faster (same results). 32 MiB is glibc's largest mmap
# threshold; the trim threshold bounds the free heap a process keeps (per arena).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_MALLOPT_PARAMS = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # glibc's M_* numbers


def apply_allocator_env() -> bool:
    """Apply this process's MALLOC_*_THRESHOLD_ variables with glibc's mallopt, as glibc
    does for a process started with them. False where there is no glibc (macOS, musl)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's, where there is one
    except (OSError, AttributeError):
        return False
    done = True
    for key, param in _MALLOPT_PARAMS.items():
        value = os.environ.get(key)
        if value and value.isdigit():
            done = bool(mallopt(param, int(value))) and done
    return done


_STATE_DIR_VARS = ("PREFECT_HOME", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR", "DASK_TEMPORARY_DIRECTORY")


def setup_local_state(repo_root: Path | None = None) -> Path:
    """Create `<repo>/.state/` and point tools at it, without overriding the user's env.

    Keeps $HOME clean and stops Prefect from phoning home. Call it before `import prefect`
    (see module docstring). Idempotent. Returns the state folder.
    """
    state = state_dir(repo_root)
    state.mkdir(parents=True, exist_ok=True)
    changed_home = "PREFECT_HOME" not in os.environ
    for key, value in local_state_env(state).items():
        os.environ.setdefault(key, value)
    for key in _STATE_DIR_VARS:
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    apply_allocator_env()
    # PYTHONWARNINGS reaches child processes only; this process needs the filter itself.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    if changed_home and "prefect" in sys.modules:
        warnings.warn(
            "setup_local_state() ran after `import prefect`: this process keeps the "
            "PREFECT_HOME it read at import (default ~/.prefect). Call it first.",
            RuntimeWarning,
            stacklevel=2,
        )
    return state


def _free_port() -> int:
    # Bind-and-release: a tiny race remains; a clash shows up as a failed start.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, start: int = 0, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


def _refresh_prefect_settings() -> None:
    """Make an already-imported Prefect re-read env vars (its global settings are cached
    at import). A `temporary_settings()` block active in the caller still wins."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def _drain_prefect_workers() -> None:
    """Flush and stop this process's log/event senders before their server goes away.

    They are singletons bound to the API URL at creation; left running they would retry
    against a dead server (noise at exit) or be reused by a later server."""
    if "prefect" not in sys.modules:
        return
    import logging

    # While draining, Prefect warns "Still processing items: 1 items remaining..." even
    # when the only item left is its own stop sentinel; the logger is named after the class.
    quiet = [logging.getLogger(name) for name in ("APILogWorker", "EventsWorker")]
    levels = [lg.level for lg in quiet]
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for lg in quiet:
            lg.setLevel(logging.ERROR)
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception as exc:  # never mask the caller's exception or block shutdown
        warnings.warn(f"Could not drain Prefect log/event workers: {exc}", RuntimeWarning)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


class LocalPrefectServer:
    """Context manager: a Prefect server on 127.0.0.1 for this process and its children.

    If PREFECT_API_URL is already set, it does nothing and uses that server. Otherwise
    it starts `prefect server start` on a free port (SQLite DB under PREFECT_HOME, log in
    `<PREFECT_HOME>/server.log`), waits for `/api/health`, then exports PREFECT_API_URL.
    On exit it stops the server and restores the environment, unless `keep=True`, which
    leaves both running (call `stop()` or `wait()` later).
    """

    def __init__(
        self,
        repo_root: Path | None = None,
        *,
        keep: bool = False,
        startup_timeout: float = 120.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.repo_root = repo_root
        self.keep = keep
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.api_url: str | None = None
        self.ui_url: str | None = None
        self.log_path: Path | None = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def started(self) -> bool:
        """True if this object launched (and still owns) a server process."""
        return self.process is not None

    def start(self) -> "LocalPrefectServer":
        setup_local_state(self.repo_root)
        user_url = os.environ.get("PREFECT_API_URL")
        if user_url:
            self.api_url = user_url.rstrip("/")
            self.ui_url = os.environ.get("PREFECT_UI_URL") or self.api_url.removesuffix("/api")
            return self

        exe = Path(sys.executable).with_name("prefect")
        if not exe.exists():
            raise RuntimeError(f"Prefect CLI not found next to the interpreter: {exe}")
        home = Path(os.environ["PREFECT_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "server.log"
        self.port = _free_port()
        base = f"http://{LOCALHOST}:{self.port}"
        api_url = f"{base}/api"
        env = dict(os.environ)
        # The CLI flags set the bind address only; the UI derives the API address it
        # tells the browser from these settings (default 127.0.0.1:4200).
        env.update(
            PREFECT_SERVER_API_HOST=LOCALHOST,
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_API_URL=api_url,
        )
        with open(self.log_path, "ab") as log:
            log_start = log.tell()
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start on {base}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [str(exe), "server", "start", "--host", LOCALHOST, "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() kills all its children
            )

        deadline = time.monotonic() + self.startup_timeout
        while not _healthy(api_url):
            failed = self.process.poll() is not None
            if failed or time.monotonic() > deadline:
                why = (
                    f"exited with code {self.process.returncode}"
                    if failed
                    else f"not healthy after {self.startup_timeout:.0f} s"
                )
                self._terminate()
                raise RuntimeError(
                    f"Local Prefect server on port {self.port} {why}. "
                    f"Log {self.log_path} ends with:\n{_tail(self.log_path, log_start)}"
                )
            time.sleep(0.5)

        self.api_url, self.ui_url = api_url, base
        # Prefect derives the UI URL (printed run links) from PREFECT_API_URL.
        self._saved_env = {"PREFECT_API_URL": os.environ.get("PREFECT_API_URL")}
        os.environ["PREFECT_API_URL"] = api_url
        _refresh_prefect_settings()
        return self

    def stop(self) -> None:
        """Stop the server this object started and restore the environment."""
        if self.process is None:
            return
        _drain_prefect_workers()
        self._terminate()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        _refresh_prefect_settings()

    def wait(self) -> int | None:
        """Block until the server exits (for `make serve`-like use); Ctrl-C stops it."""
        if self.process is None:
            return None
        try:
            return self.process.wait()
        except KeyboardInterrupt:
            self.stop()
            return None

    def _terminate(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        pgid = proc.pid  # leader of its own session/group (start_new_session)
        if not self._signal_group(pgid, signal.SIGTERM) or not self._group_gone(
            proc, pgid, self.stop_timeout
        ):
            self._signal_group(pgid, signal.SIGKILL)
            self._group_gone(proc, pgid, 5.0)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    @staticmethod
    def _group_gone(proc: subprocess.Popen, pgid: int, timeout: float) -> bool:
        """Wait until the leader is reaped and no process is left in the group."""
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # succeeds while any member (e.g. a service child) lives
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> "LocalPrefectServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        if not self.keep:
            self.stop()
