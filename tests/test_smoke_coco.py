"""`mfiba run --preset coco-paper --smoke`: every stage end to end at full resolution on the
COCO sample with random-init torchvision weights, labelled in the report; without the flag
and without weights the run stops at once, naming the missing file."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))


def test_coco_paper_without_weights_stops_at_once(tmp_path, cli_env):
    env = {**cli_env, "TORCH_HOME": str(tmp_path / "torch")}  # an empty cache: no COCO weights
    t0 = time.time()
    p = subprocess.run([MFIBA, "run", "--preset", "coco-paper"], env=env, capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 2 and time.time() - t0 < 60
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in p.stderr and "--allow-random-weights" in p.stderr
    assert "Prefect UI" not in p.stderr  # nothing was started


@pytest.mark.slow
@pytest.mark.coco
def test_coco_paper_smoke_runs_every_stage_at_full_resolution(tmp_path, cli_env, coco_sample):
    p = subprocess.run([MFIBA, "run", "--preset", "coco-paper", "--smoke", "--allow-random-weights",
                        "--set", f"run_dir={tmp_path / 'smoke'}", "--set", f"features.store={tmp_path / 'f.zarr'}"],
                       env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    report = Path(summary["report"]).read_text()
    assert "SMOKE TEST" in report and "RANDOM-INIT" in report
    points = pd.read_csv(summary["rd_points"])
    # Random-init heads make the calibration losses noise, so the fit may come out unusable
    # (beta <= 0) on some CPU's float sums: then MFIBA is left out and the report says why.
    methods = {"uniform"} if "left out: allocating methods, task bbox" in report else {"uniform", "mfiba"}
    assert set(points.method) == methods and len(points) == 2 * len(methods) and (points.bpp_input > 0).all()
