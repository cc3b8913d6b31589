"""The precode stage through the CLI, Prefect and a Dask LocalCluster with 2 workers: tidy
table per (image, quality), a rerun recomputes nothing, another codec setting is refused,
and a Dask worker killed mid-run leaves tables identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage.results import PartTable

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))
TIMING = ["seconds_codec", "seconds_heads"]


def _args(tmp_path, stage, calib=2, qualities=2, extra=()):
    phis = [20, 60, 40, 80]  # AVIF qualities of the demo's main codec
    chosen = sorted(phis[:qualities])
    return [stage, "--preset", "demo", "--workers", "2",
            "--set", f"data.root={tmp_path.parent / 'data'}", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "data.train_count=0", "--set", f"data.calib_count={calib}", "--set", "data.test_count=0",
            "--set", f"codecs.main.phis={json.dumps(chosen)}", "--set", "precode.batch_size=1",
            "--set", "tune.rate_points=[0, 1]",  # the demo's [1..5] point past these phis (refused at load)
            "--set", "precode.tasks=[]",  # every task of the demo model (the demo preset: bbox only)
            "--set", f"features.store={tmp_path.parent / 'features.zarr'}", *extra]


def _run(args, env, timeout=900):
    p = subprocess.run([MFIBA, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout[p.stdout.index("{"):]), p.stderr


def _features(tmp_path, env, calib):
    _run(["features", *_args(tmp_path, "x", calib)[1:], "--splits", "calib"], env)


def _table(summary: dict) -> pd.DataFrame:
    return PartTable.load(str(Path(summary["table"]).parent)).drop(columns=TIMING)


def test_precode_writes_tidy_table_and_reruns_nothing(tmp_path, cli_env):
    work = tmp_path / "a"
    work.mkdir()
    _features(work, cli_env, 2)
    summary, _ = _run(_args(work, "precode"), cli_env)
    assert summary["items"] == 4 and summary["computed"] == 4 and summary["reused"] == 0
    table = _table(summary)
    assert len(table) == 2 * 2 * 5  # images x qualities x scales
    for col in ["image_id", "scale", "quality", "phi", "bits", "estimated_bits", "scale_pixels", "input_pixels",
                "loss_bbox", "loss75_bbox", "oracle_bbox", "loss_segm", "loss_keypoints", "reference_empty"]:
        assert col in table, col
    assert (table.bits > 0).all() and (table.estimated_bits > 0).all()
    assert table.loss_bbox.between(0, 1).all()
    # Lower quality costs fewer bits per scale.
    per_q = table.groupby("quality").bits.sum()
    assert per_q.iloc[0] < per_q.iloc[-1]
    weights = pd.read_parquet(summary["weights"])
    sums = weights.groupby(["image_id", "task", "source"]).weight.sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)

    again, log = _run(_args(work, "precode"), cli_env)
    assert again["computed"] == 0 and again["reused"] == 4
    assert "4 already in" in log and "0 to compute" in log
    pd.testing.assert_frame_equal(table, _table(again))

    # Other codec settings go to their own table: nothing is mixed, nothing is thrown away.
    other, _ = _run(_args(work, "precode", qualities=3), cli_env)
    assert other["table"] != summary["table"] and other["items"] == 6 and other["computed"] == 6
    pd.testing.assert_frame_equal(table, _table(summary))


@pytest.mark.slow
def test_precode_survives_a_killed_worker_with_identical_tables(tmp_path, cli_env):
    import psutil

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    _features(clean, cli_env, 4)
    reference, _ = _run(_args(clean, "precode", calib=4, qualities=4), cli_env)

    proc = subprocess.Popen([MFIBA, *_args(killed, "precode", calib=4, qualities=4)], env=cli_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((killed / "run").glob("precode/*/parts/*.parquet"))) < 3:
        time.sleep(0.2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    assert workers, "no Dask worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)  # one worker dies mid-run; the nanny restarts it
    out, err = proc.communicate(timeout=900)
    # Whatever the interrupted run managed, a rerun completes the table.
    summary, _ = _run(_args(killed, "precode", calib=4, qualities=4), cli_env)
    assert summary["items"] == reference["items"] == 16
    pd.testing.assert_frame_equal(_table(reference), _table(summary))
