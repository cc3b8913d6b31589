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


def test_status_and_config_check_every_stage_and_report_missing_weights_in_one_line():
    p = _run("status", "--set", "task_model.checkpoint=assets/nope.pt")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("mfiba: demo-multitask: checkpoint") and "nope.pt' not found" in p.stderr
    # a rate point that evaluate would refuse is refused where the whole configuration is shown
    for command in ("status", "config"):
        p = _run(command, "--set", "tune.rate_points=[1,2,12]")
        assert p.returncode == 2 and "tune.rate_points[2] = 12: an index into codecs.main.phis" in p.stderr


def test_trigger_without_a_server_and_a_closed_pipe_end_without_traceback():
    import os

    from deployments.serve import STATE_FILE

    if not STATE_FILE.exists():  # (a served server here would take the run)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        p = subprocess.run([MFIBA, "trigger", "pipeline/demo"], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 2 and p.stderr.startswith("mfiba: no served Prefect server") and "Traceback" not in p.stderr
    # `mfiba config | head`: the reader is gone before mfiba writes (it takes a second to start)
    p = subprocess.Popen([MFIBA, "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    stderr = p.communicate(timeout=120)[1]
    assert p.returncode == 1 and stderr == ""
