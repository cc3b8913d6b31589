"""The `mfiba` command: stages listed, wrong configuration refused before any work."""
import subprocess
import sys
from pathlib import Path

MFIBA = str(Path(sys.executable).with_name("mfiba"))


def _run(*args):
    return subprocess.run([MFIBA, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_stages():
    out = _run("--help").stdout
    for stage in ("features", "train-task-model", "train-codec", "codec-report", "config", "data", "precode", "fit",
                  "tune", "evaluate", "run"):
        assert stage in out


def test_wrong_value_is_refused_with_field_and_allowed_values():
    p = _run("features", "--set", "dask.n_workers=0")
    assert p.returncode == 2
    assert "dask.n_workers" in p.stderr and "greater than or equal to 1" in p.stderr
    assert "Prefect UI" not in p.stderr  # refused before any server or work started


def test_images_need_one_split():
    p = _run("features", "--images", "1", "2")
    assert p.returncode == 2 and "--images needs exactly one split" in p.stderr


def test_config_prints_the_resolved_preset():
    p = _run("config", "--preset", "coco-paper", "--set", "data.test_count=10")
    assert p.returncode == 0 and '"test_count": 10' in p.stdout and '"train_count": 40000' in p.stdout
