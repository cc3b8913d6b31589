"""Output locks (storage/locks.py, flows/common.py): a second run on the same run folder or
feature store refuses at once, naming the holder, or waits for it; nested holds in one
process nest; a SIGKILLed holder leaves no stale lock; the stage entries take the lock."""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mfiba.config import load_config
from storage.locks import (LockTarget, OutputLockedError, held_here, holder_file, output_lock, read_holder,
                           wait_seconds)

REPO = Path(__file__).resolve().parents[1]

# A separate process that holds a location (exactly as a stage does) until it is killed or
# its hold time runs out; it prints "locked" once it holds it.
_HOLDER = """
import sys, time
from storage.locks import LockTarget, output_lock
location, beside, stage, hold_s = sys.argv[1], sys.argv[2] == "1", sys.argv[3], float(sys.argv[4])
with output_lock(LockTarget(location, beside=beside), stage):
    print("locked", flush=True)
    time.sleep(hold_s)
"""


def spawn_holder(location, stage="precode", beside=False, hold_s=60.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MFIBA_LOCK_WAIT_S"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(location), "1" if beside else "0", stage,
                             str(hold_s)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"holder did not take the lock: {line!r} {proc.stderr.read()}")
    return proc


@pytest.fixture
def holders():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(autouse=True)
def no_wait_env(monkeypatch):
    monkeypatch.delenv("MFIBA_LOCK_WAIT_S", raising=False)


def test_refusal_names_the_folder_the_holder_stage_and_pid(tmp_path, holders):
    run = tmp_path / "run"
    holders.append(proc := spawn_holder(run, stage="precode"))
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError) as err:
        with output_lock(LockTarget(str(run)), "fit"):
            pytest.fail("took a lock another process holds")
    assert time.monotonic() - t0 < 2  # default: refuse at once, no waiting
    msg = str(err.value)
    assert msg.startswith(f"run folder {run} is in use by `mfiba precode` (pid {proc.pid} on ")
    assert " UTC)" in msg and msg.endswith("wait for it to finish or use another run_dir")
    info = read_holder(run / ".mfiba.lock")
    assert info["pid"] == proc.pid and info["stage"] == "precode"
    assert not held_here(LockTarget(str(run)))


def test_store_lock_lives_beside_the_store(tmp_path, holders):
    store = tmp_path / "features.zarr"
    target = LockTarget(str(store), label="feature store", hint="use another features.store", beside=True)
    assert target.lock_file() == tmp_path / "features.zarr.lock"  # not a member of the zarr store
    holders.append(spawn_holder(store, stage="features", beside=True))
    with pytest.raises(OutputLockedError, match=r"^feature store .*features\.zarr is in use by `mfiba features`.*"
                                                r"use another features\.store$"):
        with output_lock(target, "features"):
            pass


def test_waits_for_the_holder_to_finish(tmp_path, holders):
    run = tmp_path / "run"
    holders.append(proc := spawn_holder(run, stage="precode", hold_s=1.0))
    t0 = time.monotonic()
    with output_lock(LockTarget(str(run)), "fit", timeout_s=20) as lock_file:
        waited = time.monotonic() - t0
        assert read_holder(lock_file)["pid"] == os.getpid()  # the record is now ours
        assert read_holder(lock_file)["stage"] == "fit"
    assert 0.2 < waited < 10
    assert proc.wait(timeout=10) == 0
    assert not holder_file(lock_file).exists()  # released: the record goes with the hold


def test_wait_from_the_environment_then_refusal(tmp_path, holders, monkeypatch):
    run = tmp_path / "run"
    holders.append(spawn_holder(run, stage="evaluate"))
    monkeypatch.setenv("MFIBA_LOCK_WAIT_S", "0.5")
    assert wait_seconds() == 0.5 and wait_seconds(0) == 0
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match=r"still in use by `mfiba evaluate` .* after waiting 0\.5 s"):
        with output_lock(LockTarget(str(run)), "fit"):
            pass
    assert 0.4 < time.monotonic() - t0 < 5
    monkeypatch.setenv("MFIBA_LOCK_WAIT_S", "soon")
    with pytest.raises(ValueError, match="MFIBA_LOCK_WAIT_S"):
        wait_seconds()


def test_cli_refuses_a_held_run_folder_before_starting_a_prefect_server(tmp_path, holders, monkeypatch, capsys):
    import mfiba.runtime
    from mfiba import cli

    class NoServer:
        def __enter__(self):
            raise AssertionError("the Prefect server started before the lock was checked")

    monkeypatch.setattr(mfiba.runtime, "LocalPrefectServer", NoServer)
    run = tmp_path / "run"
    holders.append(spawn_holder(run, stage="precode"))
    assert cli.main(["fit", "--preset", "demo", "--set", f"run_dir={run}"]) == 2
    assert f"run folder {run} is in use by `mfiba precode`" in capsys.readouterr().err


def test_nested_holds_in_one_process_nest(tmp_path, holders):
    """The pipeline holds the run folder while its stage subflows (same process, maybe
    another thread) take it again: no deadlock, no self-refusal, one release at the end."""
    target = LockTarget(str(tmp_path / "run"))
    with output_lock(target, "run") as lock_file:
        with output_lock(target, "fit"):
            assert read_holder(lock_file)["stage"] == "run"  # the outer holder stays on record
        errors = []

        def subflow():
            try:
                with output_lock(target, "evaluate"):
                    pass
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=subflow)
        t.start()
        t.join(10)
        assert not t.is_alive() and not errors
        assert held_here(target) and holder_file(lock_file).exists()
        # still held: another process is refused
        probe = subprocess.run([sys.executable, "-c", _HOLDER, target.location, "0", "x", "0"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "is in use by `mfiba run`" in probe.stderr
    assert not held_here(target) and not holder_file(lock_file).exists()
    probe = subprocess.run([sys.executable, "-c", _HOLDER, target.location, "0", "x", "0"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == "locked", probe.stderr


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path, holders):
    run = tmp_path / "run"
    holders.append(proc := spawn_holder(run, stage="precode"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert read_holder(run / ".mfiba.lock")["pid"] == proc.pid  # its record stays behind...
    t0 = time.monotonic()
    with output_lock(LockTarget(str(run)), "precode") as lock_file:  # ...but the lock does not
        assert time.monotonic() - t0 < 1
        assert read_holder(lock_file)["pid"] == os.getpid()


def test_remote_urls_are_not_locked(caplog):
    with caplog.at_level(logging.DEBUG, logger="storage.locks"):
        with output_lock(LockTarget("memory://somewhere/features.zarr", beside=True), "features") as lock_file:
            assert lock_file is None
    assert "not locked" in caplog.text


# -- the stages ----------------------------------------------------------------------------------
def _cfg(tmp_path):
    return load_config("demo", [f"run_dir={tmp_path / 'run'}", f"features.store={tmp_path / 'store.zarr'}"])


def test_a_stage_refuses_a_busy_run_folder(tmp_path, holders, monkeypatch):
    import flows.fit

    cfg = _cfg(tmp_path)
    calls = []
    monkeypatch.setattr(flows.fit, "fit_flow", lambda config, preset: calls.append(
        held_here(LockTarget(config["run_dir"]))) or {"ok": True})
    holders.append(proc := spawn_holder(tmp_path / "run", stage="precode"))
    with pytest.raises(OutputLockedError, match=rf"run folder .*run is in use by `mfiba precode` \(pid {proc.pid} "):
        flows.fit.run_fit(cfg)
    assert calls == []  # refused before the flow started
    proc.kill()
    proc.wait()
    assert flows.fit.run_fit(cfg) == {"ok": True}
    assert calls == [True]  # the flow ran under the lock
    assert not held_here(LockTarget(str(tmp_path / "run")))


def test_features_stage_also_locks_the_store(tmp_path, holders, monkeypatch):
    import flows.features
    from flows.common import output_targets

    cfg = _cfg(tmp_path)
    assert [t.lock_file() for t in output_targets(cfg, "features")] == [
        tmp_path / "run" / ".mfiba.lock", tmp_path / "store.zarr.lock"]
    monkeypatch.setattr(flows.features, "resolve_device", lambda d: pytest.fail("the stage started"))
    holders.append(spawn_holder(tmp_path / "store.zarr", stage="features", beside=True))
    with pytest.raises(OutputLockedError, match=r"feature store .*store\.zarr is in use by `mfiba features`"):
        flows.features.run_features(cfg)
    assert not held_here(LockTarget(str(tmp_path / "run")))  # what it had taken is released


def test_pipeline_stages_nest_under_the_pipeline_hold(tmp_path, holders, monkeypatch):
    import flows.fit
    import flows.pipeline

    cfg = _cfg(tmp_path)
    monkeypatch.setattr(flows.fit, "fit_flow", lambda config, preset: {"fit": "done"})
    monkeypatch.setattr(flows.pipeline, "pipeline_flow",
                        lambda config, preset: {"fit": flows.fit.run_fit(cfg), "held": held_here(LockTarget(
                            str(tmp_path / "run")))})
    assert flows.pipeline.run_pipeline(cfg) == {"fit": {"fit": "done"}, "held": True}
    from flows.common import output_targets

    assert [t.lock_file() for t in output_targets(cfg, "run")] == [tmp_path / "run" / ".mfiba.lock"]
    assert [t.label for t in output_targets(cfg, "train-codec")] == ["run folder", "work folder"]
    assert [t.label for t in output_targets(cfg, "train-task-model")] == ["work folder"]


def test_cli_reports_the_refusal(tmp_path, holders, monkeypatch, capsys):
    import mfiba.runtime
    from mfiba.cli import main

    class NoServer:  # the refusal comes before any flow talks to a server
        ui_url = "http://127.0.0.1:0"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(mfiba.runtime, "LocalPrefectServer", NoServer)
    proc = spawn_holder(tmp_path / "run", stage="precode")
    holders.append(proc)
    rc = main(["fit", "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"mfiba: run folder {tmp_path / 'run'} is in use by `mfiba precode` (pid {proc.pid} on " in err
