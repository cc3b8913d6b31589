"""`mfiba serve` (Prefect server, work pool, worker, deployments), a deployment triggered from
the CLI, and the Prefect UI in headless Chromium showing the completed run and its report
artifacts. Screenshots go to runs/test-artifacts/ (git-ignored) for the record."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = REPO / "runs" / "test-artifacts"


def _chromium(*args, timeout=120) -> str:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                           "--window-size=1400,1000", *args], capture_output=True, text=True, timeout=timeout).stdout


def _rendered(url: str, expected, tries: int = 3) -> str:
    """The page's DOM once it shows every expected string. On a loaded 2-core machine the
    UI's JavaScript sometimes has not rendered within Chromium's virtual-time budget (the
    dump is the empty app shell), so a dump that lacks them is taken again."""
    dom = ""
    for _ in range(tries):
        dom = _chromium("--dump-dom", url)
        if all(key in dom for key in expected):
            break
    return dom


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_serve_trigger_and_see_the_run_in_the_ui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # serve starts its own server
    state = REPO / ".state" / "serve.json"
    state.unlink(missing_ok=True)
    serve = subprocess.Popen([MFIBA, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not state.exists() and time.time() < deadline and serve.poll() is None:
            time.sleep(0.5)
        assert state.exists(), "mfiba serve did not come up"
        served = json.loads(state.read_text())
        assert "deployed-pipeline/demo" in served["deployments"] and served["api_url"].startswith("http://127.0.0.1:")
        tiny = [f"data.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", f"features.store={tmp_path / 'f.zarr'}",
                "data.train_count=0", "data.calib_count=4", "data.test_count=4", "codecs.main.phis=[10, 20, 30, 45, 60]",
                "tune.rate_points=[0, 1, 2, 3, 4]", "evaluate.images=4", "evaluate.bootstrap=10",
                "evaluate.pool_modes=[coded]", "features.splits=[calib, test]"]
        p = subprocess.run([MFIBA, "trigger", "pipeline/demo", *[a for s in tiny for a in ("--set", s)]], env=env,
                           capture_output=True, text=True, timeout=900, cwd=REPO)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        run = json.loads(p.stdout[p.stdout.index("{"):])
        assert run["state"] == "COMPLETED" and (tmp_path / "run" / "report.md").exists()

        SHOTS.mkdir(parents=True, exist_ok=True)
        page = _rendered(run["ui"], ("pipeline-demo", "Completed"))
        assert "pipeline-demo" in page and "Completed" in page
        _chromium(f"--screenshot={SHOTS / 'ui-pipeline-run.png'}", run["ui"])
        artifacts = served["ui_url"] + "/artifacts"
        keys = ("evaluate-report", "evaluate-bdrate", "evaluate-rd-plot", "fit-report", "precode-summary")
        listing = _rendered(artifacts, keys)
        for key in keys:
            assert key in listing, key
        _chromium(f"--screenshot={SHOTS / 'ui-artifacts.png'}", artifacts)
        assert (SHOTS / "ui-pipeline-run.png").stat().st_size > 10_000
    finally:
        os.killpg(serve.pid, signal.SIGTERM)  # stops the worker and the server it started
        serve.wait(timeout=60)
    assert not state.exists()
    left = subprocess.run(["pgrep", "-f", "prefect worker start --pool mfiba-local"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the worker outlived mfiba serve"
