"""`make serve` / `mfiba serve`: the local Prefect server (127.0.0.1, embedded SQLite, the same
one the CLI starts for a single run), the `mfiba-local` process work pool with one worker,
and every deployment registered. Runs until interrupted; stopping it stops what it started.
The server's address is written to `.state/serve.json` for `mfiba trigger`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deployments.register import REPO, WORK_POOL, register

STATE_FILE = REPO / ".state" / "serve.json"


def serve(work_pool: str = WORK_POOL, ready_file: Path = STATE_FILE) -> int:
    from mfiba.runtime import LocalPrefectServer

    with LocalPrefectServer(REPO) as server:
        names = register(work_pool)
        worker_log = Path(os.environ["PREFECT_HOME"]) / "worker.log"
        with open(worker_log, "ab") as log:
            worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start",
                                       "--pool", work_pool, "--type", "process"],
                                      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                      start_new_session=True, cwd=REPO)
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(json.dumps({"api_url": server.api_url, "ui_url": server.ui_url, "pid": os.getpid(),
                                          "work_pool": work_pool, "deployments": names}, indent=2))
        print(f"Prefect UI: {server.ui_url}\nAPI: {server.api_url} (export PREFECT_API_URL={server.api_url})\n"
              f"work pool {work_pool!r} with one process worker (log {worker_log})\ndeployments:\n  "
              + "\n  ".join(names) + "\ntrigger one: mfiba trigger pipeline/demo   stop: Ctrl-C", flush=True)
        try:
            while worker.poll() is None:
                time.sleep(1.0)
            print(f"mfiba serve: the worker exited ({worker.returncode}); see {worker_log}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
            ready_file.unlink(missing_ok=True)


class NoServedServerError(RuntimeError):
    """`trigger` found neither PREFECT_API_URL nor a server started by `serve`."""


def trigger(deployment: str, parameters: dict | None = None, timeout_s: float = 3600, state_file: Path = STATE_FILE
            ) -> dict:
    """Start a run of `flow/deployment` on the served server and wait for it to finish."""
    from prefect.deployments import run_deployment

    if not os.environ.get("PREFECT_API_URL"):
        if not state_file.exists():
            raise NoServedServerError(f"no served Prefect server ({state_file} missing): start `make serve` first, "
                                      "or set PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = json.loads(state_file.read_text())["api_url"]
    name = deployment if "/" not in deployment or deployment.startswith("deployed-") else f"deployed-{deployment}"
    run = run_deployment(name=name, parameters=parameters or {}, timeout=timeout_s)
    return {"flow_run": str(run.id), "name": run.name, "state": run.state.type.value if run.state else None,
            "ui": f"{os.environ['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{run.id}"}
