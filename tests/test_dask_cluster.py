"""The stage flows on a separately started Dask scheduler and worker (what a cluster user
does with --scheduler-address), not only on the built-in LocalCluster."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from storage.feature_store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_features_on_an_external_scheduler_and_worker(tmp_path, cli_env):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=cli_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        time.sleep(3)
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--memory-limit", "4GiB", "--no-dashboard"], env=cli_env, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        p = subprocess.run([str(BIN / "mfiba"), "features", "--preset", "demo", "--scheduler-address", address,
                            "--set", f"data.root={tmp_path / 'data'}", "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", "data.train_count=2", "--set", "data.calib_count=0",
                            "--set", "data.test_count=2", "--splits", "train", "test",
                            "--store", str(tmp_path / "f.zarr")],
                           env=cli_env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        assert summary["extracted"] == 4
        assert len(FeatureStore(str(tmp_path / "f.zarr"), mode="r").image_ids()) == 4
        assert "Creating a new Dask cluster" not in p.stderr  # the external one was used
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def test_gpu_tagged_precoding_runs_only_on_the_worker_declaring_a_gpu(tmp_path, cli_env):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    common = dict(env=cli_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                  start_new_session=True)
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **common)]
    try:
        time.sleep(3)
        for name, extra in (("gpu-worker", ["--resources", "GPU=1"]), ("cpu-worker", [])):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1",
                                           "--memory-limit", "4GiB", "--no-dashboard", *extra], **common))
        args = ["--preset", "demo", "--scheduler-address", address, "--set", f"data.root={tmp_path / 'data'}",
                "--set", f"run_dir={tmp_path / 'run'}", "--set", "data.train_count=0", "--set", "data.calib_count=4",
                "--set", "data.test_count=0", "--set", f"features.store={tmp_path / 'f.zarr'}",
                "--set", "codecs.main.phis=[20, 60]", "--set", "tune.rate_points=[0, 1]",
                "--set", "precode.batch_size=1"]
        for stage, extra in (("features", ["--splits", "calib"]), ("precode", ["--set", "dask.gpu_tagging=always"])):
            p = subprocess.run([str(BIN / "mfiba"), stage, *args, *extra], env=cli_env, capture_output=True, text=True,
                               timeout=600, cwd=REPO)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        summary = json.loads(p.stdout[p.stdout.index("{"):])
        assert summary["computed"] == 8 and summary["workers"] == ["gpu-worker"]
        assert "computed on workers ['gpu-worker']" in p.stderr  # the flow's log says where the work ran
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def test_local_cluster_workers_get_the_allocator_settings(monkeypatch):
    """distributed's nannies export MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold: torch then maps and unmaps every large buffer (codec training ran
    at half speed, 45% of its CPU time in the kernel). The local runner's workers get the
    project's allocator settings instead (mfiba.runtime.ALLOCATOR_ENV)."""
    from distributed import Client, LocalCluster

    from flows.common import dask_task_runner
    from mfiba.config import load_config
    from mfiba.runtime import ALLOCATOR_ENV

    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    dask_task_runner(load_config("demo"), "cpu")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        env = client.run(lambda: {key: os.environ.get(key) for key in ALLOCATOR_ENV})
    assert list(env.values()) == [ALLOCATOR_ENV]


def test_worker_names_in_summaries_are_the_workers_names():
    """A LocalCluster names its workers 0, 1, ...: worker 0 was reported by its address."""
    from distributed import Client, LocalCluster

    from tasks.device import worker_name

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        names = {client.submit(worker_name, workers=[address], pure=False).result()
                 for address in client.scheduler_info()["workers"]}
    assert names == {"0", "1"}
    assert worker_name() == "local"


def test_local_workers_preload_the_exit_handler_that_freezes_their_heap():
    import dask
    from distributed import Client, LocalCluster

    from flows.common import WORKER_PRELOAD, dask_task_runner
    from mfiba.config import load_config

    with dask.config.set({"distributed.worker.preload": ["some.user.module"]}):
        dask_task_runner(load_config("demo"), "cpu")
        assert dask.config.get("distributed.worker.preload") == ["some.user.module", WORKER_PRELOAD]
        dask_task_runner(load_config("demo"), "cpu")  # a second flow in the process adds nothing
        assert dask.config.get("distributed.worker.preload") == ["some.user.module", WORKER_PRELOAD]
    with dask.config.set({"distributed.worker.preload": [WORKER_PRELOAD]}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert list(client.run(lambda: WORKER_PRELOAD in sys.modules).values()) == [True]


def test_the_exit_handler_freezes_the_heap_after_handlers_registered_later():
    # Prefect registers its exit handlers (the log and event drain) after a worker starts:
    # those run first, and the heap is frozen only after them.
    code = ("import atexit, gc\n"
            "from mfiba import dask_worker\n"
            "dask_worker.dask_setup(None)\n"
            "seen = []\n"
            "atexit.register(lambda: seen.append(gc.get_freeze_count()))\n"
            "atexit._run_exitfuncs()\n"
            "print(seen, gc.get_freeze_count() > 0)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["[0]", "True"]


def test_the_heartbeat_failure_at_cluster_close_is_one_warning_line(caplog):
    """distributed logs its heartbeat's closed-stream race (dask/distributed#7192) at ERROR
    with two tracebacks; the preload's filter keeps it as one WARNING line, and leaves every
    other record alone."""
    import logging

    from mfiba.dask_worker import HEARTBEAT_FAILED, HeartbeatRecord

    worker_log = logging.getLogger("distributed.worker")
    heartbeat_filter = HeartbeatRecord()
    worker_log.addFilter(heartbeat_filter)
    try:
        with caplog.at_level(logging.INFO, logger="distributed.worker"):
            try:
                raise OSError("Stream is closed")
            except OSError:
                worker_log.exception(HEARTBEAT_FAILED + ".")
                worker_log.exception("Unexpected exception during heartbeat. Closing worker.")
    finally:
        worker_log.removeFilter(heartbeat_filter)
    heartbeat, other = caplog.records
    assert heartbeat.levelname == "WARNING" and heartbeat.exc_info is None
    assert heartbeat.getMessage().startswith(HEARTBEAT_FAILED + ": OSError: Stream is closed (expected while")
    assert other.levelname == "ERROR" and other.exc_info is not None  # real errors keep their traceback
    assert "Traceback" in caplog.text.split("Unexpected exception")[1] and \
        "Traceback" not in caplog.text.split("Unexpected exception")[0]
