"""Orchestration helpers shared by the stage flows: task runners, progress reporting and the
locks on a stage's outputs."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time

import dask

from mfiba.config import Config
from mfiba.runtime import ALLOCATOR_ENV

WORKER_PRELOAD = "mfiba.dask_worker"  # run in every local Dask worker (see that module)


def dask_task_runner(cfg: Config, device: str):
    """A DaskTaskRunner for the configuration: an external scheduler when one is named,
    else a LocalCluster of process workers. With a GPU, local workers declare the GPU
    resource so that GPU-tagged work lands only on them."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask.scheduler_address:
        return DaskTaskRunner(address=cfg.dask.scheduler_address)
    # distributed's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers. Setting it turns
    # off glibc's dynamic mmap threshold, so every torch buffer over 128 KiB is a fresh mmap
    # and munmap: measured here, codec training spent 45% of its CPU time in the kernel and
    # ran at half speed. Workers get this process's allocator settings instead (runtime).
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{key}": os.environ.get(key, value)
                     for key, value in ALLOCATOR_ENV.items()})
    # Workers then exit without walking their heap, within the nanny's close deadline.
    preload = list(dask.config.get("distributed.worker.preload", []))
    if WORKER_PRELOAD not in preload:
        dask.config.set({"distributed.worker.preload": [*preload, WORKER_PRELOAD]})
    # silence_logs: distributed's routine INFO and WARNING lines are not news here.
    kwargs = dict(n_workers=cfg.dask.n_workers, threads_per_worker=cfg.dask.threads_per_worker,
                  memory_limit=cfg.dask.memory_limit, dashboard_address=":0", silence_logs=logging.ERROR)
    if device == "cuda":
        kwargs["resources"] = {cfg.dask.gpu_resource: 1}
        if importlib.util.find_spec("dask_cuda"):  # one worker per GPU, each pinned to its device
            kwargs.pop("n_workers")
            return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={**kwargs, "processes": True})


def gpu_tagged(cfg: Config, device: str) -> bool:
    return cfg.dask.gpu_tagging == "always" or (cfg.dask.gpu_tagging == "auto" and device == "cuda")


def gpu_annotation(cfg: Config, device: str) -> dict:
    """Dask annotations for GPU work: only workers declaring the resource take it."""
    return {"resources": {cfg.dask.gpu_resource: 1}} if gpu_tagged(cfg, device) else {}


def worker_device(cfg: Config, device: str) -> str:
    """The device a task asks for: tagged work lands on GPU workers, which pick their own."""
    return "auto" if gpu_tagged(cfg, device) else device


class Progress:
    """Counts finished items; logs and updates a Prefect progress artifact, with rate and ETA."""

    def __init__(self, logger, label: str, total: int, artifact_key: str | None = None, clock=time.time):
        from prefect.artifacts import create_progress_artifact

        self.logger, self.label, self.total, self.done, self.clock = logger, label, total, 0, clock
        self.started = clock()
        self.first: tuple[float, int] | None = None  # (time, count) at the first finished items
        self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key, description=label) if total else None

    def advance(self, n: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += n
        now = self.clock()
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        # The ETA counts from the first finished items: the time before them is start-up (a
        # cluster, model loading, a first task's compilation), which would inflate it many-fold.
        if self.first is None:
            self.first = (now, self.done)
            eta = "ETA after the next item"
        else:
            steady = (self.done - self.first[1]) / max(now - self.first[0], 1e-9)
            eta = f"ETA {(self.total - self.done) / steady:.0f} s"
        pct = 100.0 * self.done / max(1, self.total)
        self.logger.info(f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {rate:.2f}/s, {eta}")
        if self.artifact_id:
            update_progress_artifact(self.artifact_id, progress=pct)


# What each stage writes, besides its run folder. A stage's coordinating process holds these
# (storage.locks) from start to end, so two runs never write one place at the same time.
_STAGE_OUTPUTS = {
    "features": ("store",),
    "train-codec": ("train_codec.work_dir",),
    "train-task-model": ("train_task_model.work_dir",),
}
_NO_RUN_DIR = {"train-task-model"}  # writes only its work_dir (checkpoints, metrics)


def output_targets(cfg: Config, stage: str) -> list:
    """The locations `stage` writes, in the one order every stage takes them: the run
    folder, then the feature store, then other folders."""
    from storage.locks import LockTarget

    out = [] if stage in _NO_RUN_DIR else [LockTarget(str(cfg.resolve_path(cfg.run_dir)))]
    for what in _STAGE_OUTPUTS.get(stage, ()):
        if what == "store":
            out.append(LockTarget(cfg.store_url(), label="feature store", hint="use another features.store",
                                  beside=True))
        else:
            section, field = what.split(".")
            out.append(LockTarget(str(cfg.resolve_path(getattr(getattr(cfg, section), field))), label="work folder",
                                  hint=f"use another {what}"))
    return out


@contextlib.contextmanager
def hold_output_locks(cfg: Config, stage: str, timeout_s: float | None = None):
    """Hold the stage's outputs (see `output_targets`) while the block runs; refuses with
    storage.locks.OutputLockedError when another run holds one (waits `timeout_s`, else
    $MFIBA_LOCK_WAIT_S, else not at all). Nests: the pipeline holds the run folder while
    its stages take it again."""
    from storage.locks import output_locks

    with output_locks(output_targets(cfg, stage), stage, timeout_s):
        yield


def holds_output_locks(stage: str):
    """Decorator for a stage's `run_*(cfg, ...)` entry (what the CLI, the deployments and the
    pipeline call): the stage runs under `hold_output_locks(cfg, stage)`."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: Config, *args, **kwargs):
            with hold_output_locks(cfg, stage):
                return fn(cfg, *args, **kwargs)
        return run
    return wrap
