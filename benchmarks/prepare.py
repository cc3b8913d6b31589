"""`make bench`'s setup: what benchmarks.bench reads, built once by the project's own stages.

- the demo's feature store, with the train split beside calib and test;
- the demo's precoding and fit (the allocation section reads the fit);
- the paper's codec in the MFIP section: demo-elic's ELIC retrained on the train split's
  features, on bench-elic's short schedule (550 steps), alone: `--only elic`, the other
  families keep their committed checkpoints.

What `mfiba status` reports done for these settings is not rebuilt. The stages run as
`mfiba` commands under one local Prefect server. The ELIC training (one torch thread on one
Dask worker) runs beside the precoding and the fit, which get the other core (`--workers 1`).
The two write different folders (runs/bench/train-codec, runs/demo) and only read the
feature store, so neither waits for the other's locks, and the results are those of running
the stages one after the other. A failure in one lets the other finish what it is doing,
then the setup exits non-zero naming the command.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench import ELIC_PRESETS

REPO = Path(__file__).resolve().parents[1]
ELIC_PRESET = ELIC_PRESETS["elic"]  # the one `make bench` trains
ELIC_LOG = REPO / "runs" / "bench" / "train-elic.log"


def _mfiba(*args: str, log: Path | None = None) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("mfiba"))
    out = open(log, "w") if log else None  # closed with the process (the child holds it)
    try:
        return subprocess.Popen([exe, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def _wait(proc: subprocess.Popen, what: str, log: Path | None = None, every_s: float = 60.0) -> str | None:
    """None when `proc` succeeded, else what failed (with the log's last lines). A command
    writing to `log` shows its latest step line every `every_s` meanwhile."""
    shown = time.time()
    while log is not None and proc.poll() is None:
        time.sleep(1.0)
        if time.time() - shown >= every_s:
            shown = time.time()
            steps = [line for line in log.read_text(errors="replace").splitlines() if "] step " in line]
            if steps:
                print(f"bench setup: {steps[-1].split(' - ')[-1]}", flush=True)
    if proc.wait() == 0:
        return None
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() else ""
    return f"`mfiba {what}` exited with {proc.returncode}" + (f"; the end of {log}:\n{tail}" if tail else "")


def prepare() -> int:
    from flows.status import stage_status
    from mfiba.config import load_config
    from mfiba.runtime import LocalPrefectServer

    demo = load_config("demo")
    elic = load_config(ELIC_PRESET)
    elic_codec = elic.resolve_path(elic.codecs.others["elic"].checkpoint)
    need_elic = not elic_codec.exists()
    splits = [*demo.features.splits, *(["train"] if need_elic else [])]
    # The stages' own bookkeeping (`mfiba status`) decides, not which files exist: a store, a
    # precoding or a fit made with other weights, data or settings is rebuilt (its stage
    # recomputes only what changed).
    state = {row["stage"]: row for row in stage_status(load_config("demo", {"features.splits": splits}))}
    need_features = state["features"]["state"] != "done"
    need_fit = any(state[stage]["state"] != "done" for stage in ("precode", "fit"))
    for stage in ("features", "precode", "fit"):
        print(f"bench setup: {stage} {state[stage]['state']} ({state[stage]['detail']})", flush=True)
    if not (need_elic or need_features or need_fit):
        print("bench setup: feature store, fit and ELIC already built")
        return 0
    started = time.time()
    failures: list[str] = []
    running: list[subprocess.Popen] = []
    with LocalPrefectServer():  # one server for every command below (they inherit its URL)
        try:
            if need_features:
                step = ["features", "--preset", "demo", "--splits", *splits]
                print(f"bench setup: mfiba {' '.join(step)}", flush=True)
                running.append(_mfiba(*step))
                failure = _wait(running[-1], " ".join(step))
                if failure:
                    print(f"bench setup: {failure}", file=sys.stderr)
                    return 1
            training = None
            if need_elic:
                ELIC_LOG.parent.mkdir(parents=True, exist_ok=True)
                print(f"bench setup: training {ELIC_PRESET}'s ELIC beside the precoding (3 to 4 min on this "
                      f"machine's CPU; log: {ELIC_LOG.relative_to(REPO)})", flush=True)
                training = _mfiba("train-codec", "--preset", ELIC_PRESET, "--only", "elic", log=ELIC_LOG)
                running.append(training)
            if need_fit:
                for step in (["precode", "--preset", "demo", *(["--workers", "1"] if training else [])],
                             ["fit", "--preset", "demo"]):
                    print(f"bench setup: mfiba {' '.join(step)}", flush=True)
                    running.append(_mfiba(*step))
                    failure = _wait(running[-1], " ".join(step))
                    if failure:
                        failures.append(failure)
                        break
            if training:
                failure = _wait(training, f"train-codec --preset {ELIC_PRESET} --only elic", ELIC_LOG)
                if failure:
                    failures.append(failure)
        finally:
            # Interrupted (Ctrl-C, SIGTERM): the commands unwind on SIGTERM, stopping their
            # clusters; a killed training resumes from its last checkpoint on the next run.
            for proc in running:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=120)
    for failure in failures:
        print(f"bench setup: {failure}", file=sys.stderr)
    print(f"bench setup: {'failed' if failures else 'done'} in {time.time() - started:.0f} s", flush=True)
    return 1 if failures else 0


def main() -> int:
    import signal

    from mfiba.runtime import setup_local_state

    # SIGTERM unwinds like Ctrl-C: the commands and the Prefect server are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    setup_local_state()  # before anything imports prefect
    return prepare()


if __name__ == "__main__":
    raise SystemExit(main())
