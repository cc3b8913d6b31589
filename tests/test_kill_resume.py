"""Kill and resume: the whole `mfiba` process group (CLI, Dask cluster, workers) SIGKILLed at
a seeded random point of a stage, then rerun; the results equal an uninterrupted run's,
every finished item is kept, and nothing on disk is left half-written or unreadable.

Feature extraction and evaluation have theirs beside their flows
(test_features_flow.py::test_features_flow_resumes_after_sigkill,
test_pipeline_flow.py::test_evaluate_killed_midway_resumes_to_identical_results); here are
codec training and precoding.

The kill point: a target number of finished items (checkpointed training steps, precode
parts) drawn with `random.Random(KILL_SEED)` from 1 to a margin before the end (so the run
is still going when the kill lands), plus a drawn delay so the kill lands between two items;
the number done at the kill is asserted to be in [1, total), and every assertion message
names the draw. Set MFIBA_KILL_SEED to try other points.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))
KILL_SEED = int(os.environ.get("MFIBA_KILL_SEED", "1729"))


def _cli(args, env, timeout=900) -> tuple[dict, str]:
    p = subprocess.run([MFIBA, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return json.loads(p.stdout[p.stdout.index("{"):]), p.stderr


def _kill_when(args, env, progress, target: int, total: int, delay_s: float, draw: str,
               timeout_s: float = 600) -> int:
    """Start `mfiba args` in its own session, wait until progress() >= target, sleep delay_s,
    SIGKILL the whole process group; returns progress() after the kill (asserted in
    [1, total))."""
    proc = subprocess.Popen([MFIBA, *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and progress() < target and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(delay_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Dask cluster and workers
        proc.wait()
    done = progress()
    assert proc.returncode == -signal.SIGKILL, f"{draw}: the run ended before the kill (rc {proc.returncode})"
    assert 1 <= done < total, f"{draw}: {done} of {total} done at the kill"
    return done


def _no_partial_files(folder: Path, draw: str) -> None:
    """Every visible file under folder is whole (json parses, parquet and .pt load); hidden
    ones are only locks and the temp files of interrupted atomic writes (never read)."""
    import torch

    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.name.startswith("."):
            # A stage's lock file (storage/locks.py; the rerun must not be blocked by it) or
            # the temp file of an atomic write the kill interrupted.
            assert p.name.endswith((".tmp", ".lock", ".lock.json")), f"{draw}: unexpected hidden file {p}"
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pd.read_parquet(io.BytesIO(p.read_bytes()))
        elif p.suffix == ".pt":
            torch.load(p, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- codec training

STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
SIZES = {"0": 16, "1": 8, "2": 4, "3": 2, "pool": 1}  # a 64-px input
# ~30 steps/s on one CPU thread: about 10 s of training, so a kill lands mid-run.
ITERATIONS, CHECKPOINT_EVERY, LOG_EVERY = 160, 8, 3  # rows not aligned with checkpoints on purpose
LAMBDAS = [0.0067, 0.013]
FAMILY = "bmshj2018-hyperprior-features"


def _codec_overrides(tmp_path: Path, work: str) -> dict:
    tiny = {"name": "bmshj2018-hyperprior", "N": 16, "M": 24, "phis": LAMBDAS, "trained_on": "features",
            "options": {"train": {"log_every": LOG_EVERY, "eval_patches": 2}}}
    return {"data.root": str(tmp_path / "data"), "data.image_size": 64, "data.train_count": 2,
            "data.calib_count": 0, "data.test_count": 0, "run_dir": str(tmp_path / f"run-{work}"),
            "features.store": str(tmp_path / "f.zarr"), "codecs.main": tiny, "codecs.others": {},
            "train_codec.iterations": ITERATIONS, "train_codec.batch_size": 2, "train_codec.patch_size": 64,
            "train_codec.checkpoint_every": CHECKPOINT_EVERY, "train_codec.work_dir": str(tmp_path / work),
            "tune.rate_points": [0, 1]}  # indices into codecs.main.phis, checked for every command


def _codec_args(tmp_path: Path, work: str) -> list[str]:
    args = ["train-codec", "--preset", "demo", "--workers", "1", "--device", "cpu"]
    for k, v in _codec_overrides(tmp_path, work).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def _fake_feature_store(tmp_path: Path) -> None:
    """The train split's features, random (the codec does not care what the features mean)."""
    from mfiba.config import load_config
    from storage.feature_store import FeatureStore
    from tasks.datasets.sources import image_refs

    cfg = load_config("demo", _codec_overrides(tmp_path, "unused"), stages=["train-codec"])
    store = FeatureStore(cfg.features.store, mode="w")
    for ref in image_refs(cfg, ["train"])["train"]:
        g = np.random.default_rng(ref.image_id)
        store.write_image(ref.image_id, {s: (g.standard_normal((64, n, n)) * (1 + i) + i).astype(np.float32)
                                         for i, (s, n) in enumerate(SIZES.items())},
                          {"split": "train", "file_name": ref.file_name, "input_size": [64, 64],
                           "model_input_size": [64, 64], "strides": STRIDES})


def _rate_points(fam: Path) -> list[Path]:
    return [fam / f"rp{i}-lambda{lam:g}" for i, lam in enumerate(LAMBDAS)]


def _steps_checkpointed(fam: Path) -> int:
    """Training steps saved in the rate points' last.pt files (the finished items)."""
    from tasks.codecs.training import read_state

    total = 0
    for rp in _rate_points(fam):
        try:
            state = read_state(rp)
        except Exception:  # noqa: BLE001 - a half-written last.pt would fail the test later
            state = None
        total += state["step"] if state else 0
    return total


def _history(rp: Path) -> list[dict]:
    from tasks.codecs.training import read_state

    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in read_state(rp)["history"]]


def test_codec_training_resumes_bit_exactly_and_leaves_the_callers_rng_alone(tmp_path):
    """In process, fast: a rate point that dies at step 5 (last checkpoint: step 4, one step
    after a history row) and is resumed, with the global torch generator disturbed in
    between, ends with the weights and history of an uninterrupted run: last.pt carries the
    training noise's generator and the steps since the last history row. The caller's
    generator is left as it was."""
    import torch
    from compressai.models import ScaleHyperprior

    from storage.feature_store import FeatureStore
    from tasks.codecs.training import MosaicDataset, make_loader, read_state, train_rate_point

    url = str(tmp_path / "f.zarr")
    store = FeatureStore(url, mode="w")
    for iid in (7, 8):
        g = np.random.default_rng(iid)
        store.write_image(iid, {s: g.standard_normal((64, n, n)).astype(np.float32) for s, n in SIZES.items()},
                          {"split": "train", "file_name": f"{iid:012d}.png", "input_size": [64, 64],
                           "model_input_size": [64, 64], "strides": STRIDES})
    loader = make_loader(MosaicDataset(url, [7, 8], patch_size=64), 2, seed=0)

    def dies_at_step_6(start_step):
        for n, batch in enumerate(loader(start_step)):
            if n == 5:
                raise RuntimeError("killed")
            yield batch

    def run(folder, batches=loader, log=lambda m: None):
        torch.manual_seed(0)  # the same initial weights
        model = ScaleHyperprior(16, 24)
        before = torch.get_rng_state()
        try:
            return train_rate_point(model, batches, 0.013, 6, 1e-4, 1e-3, tmp_path / folder, checkpoint_every=2,
                                    log_every=3, seed=3, log=log)
        finally:
            assert torch.equal(torch.get_rng_state(), before)

    run("clean")
    with pytest.raises(RuntimeError, match="killed"):
        run("resumed", dies_at_step_6)
    assert read_state(tmp_path / "resumed")["step"] == 4
    torch.rand(1000)  # whatever the process drew meanwhile does not matter
    msgs = []
    assert run("resumed", log=msgs.append)["step"] == 6 and "resuming at step 4/6" in " ".join(msgs)
    clean, resumed = read_state(tmp_path / "clean"), read_state(tmp_path / "resumed")
    assert [r["step"] for r in resumed["history"]] == [1, 3, 6]
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in clean["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in resumed["history"]]
    assert all(torch.equal(v, resumed["model"][k]) for k, v in clean["model"].items())


@pytest.mark.slow
def test_train_codec_killed_midway_resumes_to_identical_weights(tmp_path, cli_env):
    """`mfiba train-codec` (one family, two rate points) SIGKILLed after a seeded number of
    checkpointed steps: the interrupted state is readable, the rerun resumes from the last
    checkpoints (a finished rate point is not retrained) and ends with the weights, history
    and codec file of an uninterrupted run, bit for bit (CPU, one thread)."""
    import torch

    from tasks.codecs.learned import load_codec
    from tasks.codecs.training import read_state

    _fake_feature_store(tmp_path)
    clean, _ = _cli(_codec_args(tmp_path, "clean"), cli_env)

    total = ITERATIONS * len(LAMBDAS)
    rng = random.Random(KILL_SEED)
    target, delay = rng.randint(1, total * 3 // 4), rng.uniform(0.0, 0.3)
    draw = f"kill seed {KILL_SEED}: after {target}/{total} checkpointed steps + {delay:.2f} s"
    fam = tmp_path / "killed" / FAMILY
    done = _kill_when(_codec_args(tmp_path, "killed"), cli_env, lambda: _steps_checkpointed(fam), target, total,
                      delay, draw)
    _no_partial_files(tmp_path / "killed", draw)
    states = [read_state(rp) for rp in _rate_points(fam)]
    at_kill = [s["step"] if s else 0 for s in states]
    assert sum(at_kill) == done, draw
    for s in states:
        if s is not None:  # history.json and last.pt agree; history rows strictly increasing
            steps = [r["step"] for r in s["history"]]
            assert steps == sorted(set(steps)) and all(k <= s["step"] for k in steps), draw
    assert not (fam / "codec.pt").exists() and not json.loads((fam / "family.json").read_text())["complete"], draw

    again, log = _cli(_codec_args(tmp_path, "killed"), cli_env)
    r, c = again[FAMILY], clean[FAMILY]
    assert r["complete"] and not r["reused"] and r["steps"] == total, draw
    resumed = [k for k in at_kill if 0 < k < ITERATIONS]
    assert all(f"resuming at step {k}/{ITERATIONS}" in log for k in resumed), (draw, at_kill, log[-3000:])
    if at_kill[0] == ITERATIONS:  # a finished rate point is kept as it is
        assert f"[bmshj2018-hyperprior rp0-lambda{LAMBDAS[0]:g}] step 1/" not in log, draw
    for rp_clean, rp_killed in zip(_rate_points(tmp_path / "clean" / FAMILY), _rate_points(fam)):
        state = read_state(rp_killed)
        assert state["step"] == ITERATIONS, draw
        # No duplicate or missing rows: the same rows as the uninterrupted run (timings aside).
        assert _history(rp_killed) == _history(rp_clean), draw
        assert [row["step"] for row in state["history"]] == sorted({1, *range(LOG_EVERY, ITERATIONS, LOG_EVERY),
                                                                    ITERATIONS}), draw
        ref = read_state(rp_clean)["model"]
        assert all(torch.equal(ref[k], v) for k, v in state["model"].items()), (draw, "weights differ")
    codec, reference = load_codec(r["codec"]), load_codec(c["codec"])
    assert codec.checkpoint_sha256 == reference.checkpoint_sha256, draw
    assert (r["bpp"], r["mse"]) == (c["bpp"], c["mse"]), draw
    _no_partial_files(tmp_path / "killed", draw)
    assert read_manifest(tmp_path / "run-killed", "train-codec").items_done == 1, draw


# --------------------------------------------------------------------------- precoding

TIMING = ["seconds_codec", "seconds_heads"]
CALIB, QUALITIES = 4, [20, 40, 60, 80]  # AVIF qualities of the demo's main codec


def _precode_args(work: Path, stage: str = "precode") -> list[str]:
    return [stage, "--preset", "demo", "--workers", "2",
            "--set", f"data.root={work.parent / 'data'}", "--set", f"run_dir={work / 'run'}",
            "--set", "data.train_count=0", "--set", f"data.calib_count={CALIB}", "--set", "data.test_count=0",
            "--set", f"codecs.main.phis={json.dumps(QUALITIES)}", "--set", "precode.batch_size=1",
            "--set", "precode.tasks=[]", "--set", f"features.store={work.parent / 'features.zarr'}"]


def _parts(work: Path) -> list[Path]:
    return sorted(p for p in (work / "run").glob("precode/*/parts/*.parquet") if not p.name.startswith("."))


@pytest.mark.slow
def test_precode_killed_midway_resumes_to_identical_table(tmp_path, cli_env):
    """`mfiba precode` (4 images x 4 qualities, one part each) SIGKILLed as a whole after a
    seeded number of finished parts: every part on disk is readable and kept (the rerun
    reuses exactly those), and the rerun's table and MFIP weights equal an uninterrupted
    run's (timing columns aside)."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    _cli(["features", *_precode_args(clean, "x")[1:], "--splits", "calib"], cli_env)
    reference, _ = _cli(_precode_args(clean), cli_env)

    total = CALIB * len(QUALITIES)
    rng = random.Random(KILL_SEED)
    target, delay = rng.randint(1, total - 4), rng.uniform(0.0, 0.5)
    draw = f"kill seed {KILL_SEED}: after {target}/{total} parts + {delay:.2f} s"
    done = _kill_when(_precode_args(killed), cli_env, lambda: len(_parts(killed)), target, total, delay, draw)
    _no_partial_files(killed / "run", draw)
    before = {p.name: p.read_bytes() for p in _parts(killed)}
    assert len(before) == done

    summary, log = _cli(_precode_args(killed), cli_env)
    assert summary["items"] == total and summary["reused"] == done and summary["computed"] == total - done, draw
    assert f"{done} already in" in log, draw
    # The finished parts were kept as they were, not recomputed.
    assert all((Path(summary["table"]).parent / "parts" / name).read_bytes() == data for name, data in before.items())
    _no_partial_files(killed / "run", draw)
    a = pd.read_parquet(reference["table"]).drop(columns=TIMING)
    b = pd.read_parquet(summary["table"]).drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b, obj=draw)
    pd.testing.assert_frame_equal(pd.read_parquet(reference["weights"]), pd.read_parquet(summary["weights"]), obj=draw)
    assert read_manifest(killed / "run", "precode").items_done == total, draw
