"""mfiba.runtime: local state env vars and the local Prefect server.

The tests that start a real `prefect server start` are marked `slow` (about 20 s on a
fresh database); run them with `pytest -m slow tests/test_runtime.py`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

import pytest

from mfiba import runtime
from mfiba.runtime import LocalPrefectServer, local_state_env, setup_local_state

MANAGED = tuple(local_state_env(runtime.state_dir()).keys()) + ("PREFECT_API_URL",)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Unset every var runtime manages, so monkeypatch restores them after the test,
    and point PREFECT_HOME at tmp (no RuntimeWarning if prefect is already imported)."""
    for key in MANAGED:
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / ".state" / "prefect"
    home.mkdir(parents=True)  # prefect's import creates PREFECT_HOME without parents
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return tmp_path


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((runtime.LOCALHOST, port)) == 0


def test_setup_local_state_sets_defaults(monkeypatch, tmp_path):
    for key in MANAGED:
        monkeypatch.delenv(key, raising=False)
    # Importing prefect before setup is exactly what the warning is about.
    expect_warning = "prefect" in sys.modules
    with pytest.warns(RuntimeWarning) if expect_warning else contextlib.nullcontext():
        state = setup_local_state(tmp_path)

    assert state == tmp_path.resolve() / ".state"
    assert os.environ["PREFECT_HOME"] == str(state / "prefect")
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "90"
    assert os.environ["TORCH_HOME"] == str(state / "torch")
    assert os.environ["MPLCONFIGDIR"] == str(state / "matplotlib")
    assert os.environ["DASK_TEMPORARY_DIRECTORY"] == str(state / "dask")
    assert "PREFECT_API_URL" not in os.environ
    for key, value in runtime.ALLOCATOR_ENV.items():
        assert os.environ[key] == value
    for key in runtime._STATE_DIR_VARS:
        assert os.path.isdir(os.environ[key])


def test_setup_local_state_keeps_user_values(monkeypatch, tmp_path):
    for key in MANAGED:
        monkeypatch.delenv(key, raising=False)
    mine = {
        "PREFECT_HOME": str(tmp_path / "my-prefect"),
        "DO_NOT_TRACK": "0",
        "TORCH_HOME": str(tmp_path / "my-torch"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7",
    }
    for key, value in mine.items():
        monkeypatch.setenv(key, value)

    setup_local_state(tmp_path)

    for key, value in mine.items():
        assert os.environ[key] == value
    # The others still get their defaults.
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path.resolve() / ".state" / "matplotlib")


_FAULTS_PER_BUFFER = """
import os, resource, sys
sys.path.insert(0, {repo!r})
import torch
from mfiba.runtime import apply_allocator_env
os.environ.update({later!r})
if {later!r}:
    assert apply_allocator_env()
for _ in range(10):  # the heap grows to its working size first
    torch.empty(1 << 21).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(1 << 21).fill_(1.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux)")
def test_allocator_settings_keep_large_buffers_on_the_heap(monkeypatch):
    """An 8 MiB torch buffer allocated again and again: under distributed's trim threshold
    (what its nannies export) each one is a fresh mapping whose 2,048 pages fault in; with
    the project's settings, from the environment at start or applied later with mallopt
    (what setup_local_state does), the heap keeps it."""
    def faults(at_start: dict, later: dict) -> float:
        code = _FAULTS_PER_BUFFER.format(repo=str(runtime.REPO_ROOT), later=later)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **at_start}, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.split()[-1])

    for key in runtime.ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    dask_like = {"MALLOC_TRIM_THRESHOLD_": "65536"}
    assert faults(dask_like, {}) > 1000
    assert faults(runtime.ALLOCATOR_ENV, {}) < 50
    assert faults(dask_like, runtime.ALLOCATOR_ENV) < 50


def test_user_api_url_starts_nothing(clean_env, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")

    def no_popen(*a, **k):
        raise AssertionError("must not start a server")

    monkeypatch.setattr(runtime.subprocess, "Popen", no_popen)
    with LocalPrefectServer(clean_env) as server:
        assert not server.started
        assert server.api_url == "http://127.0.0.1:9/api"
        assert server.ui_url == "http://127.0.0.1:9"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"


@pytest.mark.slow
def test_failed_start_reports_log_tail(clean_env, monkeypatch):
    # Hold a port so `prefect server start` refuses it and exits.
    with socket.socket() as busy:
        busy.bind((runtime.LOCALHOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(runtime, "_free_port", lambda: port)
        with pytest.raises(RuntimeError, match="already in use"):
            with LocalPrefectServer(clean_env, startup_timeout=60):
                pass
    assert "PREFECT_API_URL" not in os.environ


@pytest.mark.slow
def test_local_server_runs_flow_and_stops(clean_env, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    @flow(name="runtime-smoke")
    def add_one(x: int) -> int:
        return x + 1

    async def recorded_runs() -> dict:
        async with get_client() as client:
            return {r.id: r.state_type.value for r in await client.read_flow_runs()}

    try:
        with LocalPrefectServer(clean_env) as server:
            assert server.started
            port, pid = server.port, server.process.pid
            assert server.api_url == f"http://127.0.0.1:{port}/api"
            assert server.ui_url == f"http://127.0.0.1:{port}"
            assert os.environ["PREFECT_API_URL"] == server.api_url
            # prefect was imported before the server started: settings must follow.
            assert get_current_settings().api.url == server.api_url
            assert runtime._healthy(server.api_url)

            state = add_one(1, return_state=True)
            assert state.is_completed() and state.result() == 2
            assert asyncio.run(recorded_runs()) == {state.state_details.flow_run_id: "COMPLETED"}
            assert (clean_env / ".state" / "prefect" / "prefect.db").exists()

        assert server.process is None
        assert "PREFECT_API_URL" not in os.environ
        assert get_current_settings().api.url is None
        assert not _port_open(port)
        # Nothing left in the server's process group.
        ps = subprocess.run(["ps", "-o", "pid=", "-g", str(pid)], capture_output=True, text=True)
        assert ps.stdout.strip() == ""
    finally:
        # Restore the env, then let prefect's cached global settings follow it again.
        monkeypatch.undo()
        refresh_global_settings_context()

