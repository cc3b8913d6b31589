"""The whole method through the CLI on a tiny demo: features -> precode -> fit -> tune ->
evaluate, each a Prefect flow on a 2-worker LocalCluster; every rerun recomputes nothing."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mfiba.config import load_config

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))


def _args(tmp_path, stage, *extra):
    return [stage, "--preset", "demo", "--workers", "2",
            "--set", f"data.root={tmp_path / 'data'}", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"features.store={tmp_path / 'features.zarr'}",
            "--set", "data.train_count=0", "--set", "data.calib_count=4", "--set", "data.test_count=4",
            "--set", "codecs.main.phis=[10, 20, 30, 45, 60]", "--set", "precode.batch_size=2",
            "--set", "tune.images=4", "--set", "tune.rate_points=[0, 1, 2, 3, 4]", "--set", "tune.max_evaluations=2",
            "--set", "tune.saba_images=1", "--set", "evaluate.images=4", "--set", "evaluate.anchors=[]",
            "--set", "evaluate.natural_image_anchor=null", "--set", "evaluate.pool_modes=[coded]",
            "--set", "evaluate.bootstrap=10",
            "--set", "evaluate.methods=[uniform, mfiba, mfiba-finetuned, static, saba, oracle]", *extra]


def _run(tmp_path, stage, env, *extra):
    p = subprocess.run([MFIBA, *_args(tmp_path, stage, *extra)], env=env, capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    out = p.stdout
    return json.loads(out[out.index("{"):]) if "{" in out else out, p.stderr


def _states(status: str) -> dict[str, str]:
    """`mfiba status` output -> {stage: state}."""
    return {line.split()[0]: line.split()[1] for line in status.splitlines() if line.strip()}


def test_demo_pipeline_end_to_end_and_reruns_nothing(tmp_path, cli_env):
    _run(tmp_path, "features", cli_env, "--splits", "calib", "test")
    pre, _ = _run(tmp_path, "precode", cli_env)
    assert pre["items"] == 4 * 5 and pre["computed"] == 20

    fit, _ = _run(tmp_path, "fit", cli_env)
    fit_json = json.loads(Path(fit["folder"], "fit.json").read_text())
    assert set(fit_json["rate_phi"]) == {"0", "1", "2", "3", "pool"}
    _, log = _run(tmp_path, "fit", cli_env)
    assert "up to date; nothing recomputed" in log

    tune, _ = _run(tmp_path, "tune", cli_env)
    assert set(tune["saba_weights"]) == {"0", "1", "2", "3", "pool"}
    assert abs(sum(tune["saba_weights"].values()) - 1) < 1e-9 and len(tune["lambda_grid"]) == 5
    assert tune["line_search"]["evaluations"] <= 2
    _, log = _run(tmp_path, "tune", cli_env)
    assert "up to date; nothing recomputed" in log

    ev, _ = _run(tmp_path, "evaluate", cli_env)
    points = pd.read_csv(ev["rd_points"])
    methods = {"uniform", "mfiba", "mfiba-finetuned", "static", "saba", "oracle"}
    assert set(points.method) == methods and (points.groupby("method").size() == 5).all()
    assert points.complete.all() and (points.bpp_input > 0).all() and points.AP_bbox.between(0, 100).all()
    # Streams on disk are what the rates count: every coded image has its file.
    streams = list((tmp_path / "run" / "evaluate" / "streams").glob("*.mfbs"))
    assert len(streams) == ev["coded_images"] == 4 * 5 * len(methods)
    bd = pd.read_csv(ev["bdrate"])
    assert set(bd.method) == methods - {"uniform"}
    # Both tables name the codec alike (its name, not the config's 'main' label).
    assert set(points.codec) == set(bd.codec) == {load_config("demo").codecs.main.name}
    assert Path(ev["report"]).read_text().count("|") > 20
    again, log = _run(tmp_path, "evaluate", cli_env)
    assert again["reused"] == again["coded_images"] and "0 to compute" in log

    status, _ = _run(tmp_path, "status", cli_env)
    states = _states(status)
    assert states == {"features": "done", "precode": "done", "fit": "done", "tune": "done", "evaluate": "done"}
    # Another fit setting makes the fit and what follows it stale, nothing before it.
    status, _ = _run(tmp_path, "status", cli_env, "--set", "fit.importance_floor=0.02")
    states = _states(status)
    assert states["precode"] == "done" and states["fit"] == "stale" and states["evaluate"] == "stale"
    # Fitting that setting points current.json (what tune and evaluate read) at its fit: for
    # this configuration the fit is stale until `fit` selects its own again, recomputing nothing.
    _run(tmp_path, "fit", cli_env, "--set", "fit.importance_floor=0.02")
    status, _ = _run(tmp_path, "status", cli_env)
    states = _states(status)
    assert states["fit"] == "stale" and "current.json points at" in status
    _, log = _run(tmp_path, "fit", cli_env)
    assert "up to date; nothing recomputed" in log

    # A lost part of a stage's outputs: status reports it, a rerun of that stage alone
    # restores it (one item computed) and everything after it stays valid.
    part = next(Path(pre["table"]).parent.glob("parts/*.parquet"))
    part.unlink()
    status, _ = _run(tmp_path, "status", cli_env)
    assert "precode   partial     19/20" in status
    again, _ = _run(tmp_path, "precode", cli_env)
    assert again["computed"] == 1 and again["reused"] == 19
    status, _ = _run(tmp_path, "status", cli_env)
    states = _states(status)
    assert states == {"features": "done", "precode": "done", "fit": "done", "tune": "done", "evaluate": "done"}


@pytest.mark.slow
def test_evaluate_killed_midway_resumes_to_identical_results(tmp_path, cli_env):
    import os
    import signal
    import time

    def evaluate_args(run):
        return [MFIBA, *_args(tmp_path, "evaluate", "--set", f"run_dir={run}", "--set", "evaluate.methods=[uniform, mfiba]")]

    _run(tmp_path, "features", cli_env, "--splits", "calib", "test")
    for run in ("clean", "killed"):  # the stages before evaluate, in both run folders
        _run(tmp_path, "precode", cli_env, "--set", f"run_dir={tmp_path / run}")
        _run(tmp_path, "fit", cli_env, "--set", f"run_dir={tmp_path / run}")
    clean = subprocess.run(evaluate_args(tmp_path / "clean"), env=cli_env, capture_output=True, text=True,
                           timeout=900, cwd=REPO)
    assert clean.returncode == 0, clean.stderr[-3000:]
    proc = subprocess.Popen(evaluate_args(tmp_path / "killed"), env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((tmp_path / "killed").glob("evaluate/detections-*/parts/*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its cluster and workers, mid-run
    proc.wait()
    again = subprocess.run(evaluate_args(tmp_path / "killed"), env=cli_env, capture_output=True, text=True,
                           timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert summary["reused"] > 0
    a = pd.read_csv(tmp_path / "clean" / "rd_points.csv").drop(columns=["image_bits", "image_input_pixels"],
                                                                errors="ignore")
    b = pd.read_csv(tmp_path / "killed" / "rd_points.csv").drop(columns=["image_bits", "image_input_pixels"],
                                                                 errors="ignore")
    pd.testing.assert_frame_equal(a, b)
