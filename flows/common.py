"""Orchestration helpers shared by the stage flows: task runners and progress reporting."""
from __future__ import annotations

import importlib.util
import logging
import time

from mfiba.config import Config


def dask_task_runner(cfg: Config, device: str):
    """A DaskTaskRunner for the configuration: an external scheduler when one is named,
    else a LocalCluster of process workers. With a GPU, local workers declare the GPU
    resource so that GPU-tagged work lands only on them."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask.scheduler_address:
        return DaskTaskRunner(address=cfg.dask.scheduler_address)
    # silence_logs: the nannies' shutdown chatter ("still alive after 4 s, killing") is not news.
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

    def __init__(self, logger, label: str, total: int, artifact_key: str | None = None):
        from prefect.artifacts import create_progress_artifact

        self.logger, self.label, self.total, self.done = logger, label, total, 0
        self.started = time.time()
        self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key, description=label) if total else None

    def advance(self, n: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += n
        elapsed = time.time() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / max(1, self.total)
        self.logger.info(f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {rate:.2f}/s, ETA {eta:.0f} s")
        if self.artifact_id:
            update_progress_artifact(self.artifact_id, progress=pct)
