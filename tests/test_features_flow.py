"""The feature-dataset stage end to end through the CLI, Prefect and a Dask LocalCluster:
store written, a rerun recomputes nothing, a SIGKILLed run resumes to a complete store."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage.feature_store import FeatureStore
from storage.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))


def _args(tmp_path, train=4, calib=2, test=2, workers=1):
    return ["features", "--preset", "demo", "--workers", str(workers),
            "--set", f"data.root={tmp_path / 'data'}", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"data.train_count={train}", "--set", f"data.calib_count={calib}",
            "--set", f"data.test_count={test}", "--set", "features.batch_size=2",
            "--splits", "train", "calib", "test", "--store", str(tmp_path / "features.zarr")]


def _run(args, env):
    p = subprocess.run([MFIBA, *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_features_flow_builds_store_then_reuses_it(tmp_path, cli_env):
    summary, _ = _run(_args(tmp_path), cli_env)
    assert summary["extracted"] == 8 and summary["reused"] == 0 and summary["skipped"] == 0
    store = FeatureStore(str(tmp_path / "features.zarr"), mode="r")
    ids = store.image_ids()
    assert len(ids) == 8
    feats = store.read_image(ids[0])
    assert {k: v.shape for k, v in feats.items()} == {
        "0": (64, 64, 64), "1": (64, 32, 32), "2": (64, 16, 16), "3": (64, 8, 8), "pool": (64, 4, 4)}
    assert all(v.dtype == np.float16 for v in feats.values())
    attrs = store.read_attrs(ids[0])
    assert attrs["input_size"] == [256, 256] and attrs["strides"]["pool"] == 64
    assert store.meta["weights"].startswith("sha256:")
    ds = store.open_xarray(ids[0])
    assert ds["0"].dims == ("c", "y0", "x0")
    manifest = read_manifest(tmp_path / "run", "features")
    assert manifest.items_done == 8 and manifest.input_hashes["weights"] == store.meta["weights"]

    again, log = _run(_args(tmp_path), cli_env)
    assert again["extracted"] == 0 and again["reused"] == 8
    assert "8 already in the store, 0 to extract" in log


@pytest.mark.slow  # a bad-input test that builds a store first (about 50 s): make test-slow
def test_features_flow_refuses_a_store_built_with_other_weights(tmp_path, cli_env):
    _run(_args(tmp_path, 2, 0, 0), cli_env)
    p = subprocess.run([MFIBA, *_args(tmp_path, 2, 0, 0), "--set", "task_model.checkpoint=null",
                        "--allow-random-weights"], env=cli_env, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert "built with different" in p.stderr and "--overwrite" in p.stderr


@pytest.mark.slow  # a fault test (about 70 s): make test-slow, with the other kill-and-resume tests
def test_features_flow_resumes_after_sigkill(tmp_path, cli_env):
    args = _args(tmp_path, train=40, calib=0, test=0)
    # Render the data first so the kill lands during extraction.
    subprocess.run([MFIBA, "data", *args[1:args.index("--splits")]], env=cli_env, check=True,
                   capture_output=True, cwd=REPO)
    proc = subprocess.Popen([MFIBA, *args], env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    store_path = tmp_path / "features.zarr"
    deadline = time.time() + 300
    while time.time() < deadline:
        # The root zarr.json, not the folder: the flow creates the folder a moment before it
        # (a read-only open in between finds no group).
        if (store_path / "zarr.json").exists() and len(FeatureStore(str(store_path), mode="r").image_ids()) >= 4:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Dask cluster and workers
    proc.wait()
    done_before = len(FeatureStore(str(store_path), mode="r").image_ids())
    assert 4 <= done_before < 40, done_before
    summary, _ = _run(args, cli_env)
    assert summary["reused"] >= done_before and summary["complete_in_store"] == 40
    store = FeatureStore(str(store_path), mode="r")
    assert store.incomplete_ids() == []
    for iid in store.image_ids():
        assert all(np.isfinite(v).all() for v in store.read_image(iid).values())


def test_features_on_the_coco_sample_with_random_torchvision_weights(tmp_path, cli_env, coco_sample):
    env = dict(cli_env, TORCH_HOME=str(tmp_path / "torch"))
    summary, _ = _run(["features", "--preset", "coco-sample", "--allow-random-weights", "--device", "cpu",
                       "--set", "data.test_count=2", "--set", f"run_dir={tmp_path / 'run'}",
                       "--store", str(tmp_path / "coco.zarr")], env)
    assert summary["extracted"] == 2
    store = FeatureStore(str(tmp_path / "coco.zarr"), mode="r")
    assert store.meta["weights"] == "random-init"
    for iid in store.image_ids():
        attrs = store.read_attrs(iid)
        feats = store.read_image(iid)
        h, w = attrs["batch_shape"]
        for scale, stride in attrs["strides"].items():
            # torchvision: '0'..'3' are ceil(size / stride) of the 32-padded batch; 'pool' halves '3'.
            expected = (-(-h // stride), -(-w // stride)) if scale != "pool" else tuple(
                -(-x // 2) for x in feats["3"].shape[1:])
            assert feats[scale].shape == (256, *expected), (scale, feats[scale].shape)
