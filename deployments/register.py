"""The deployments, their schedules and the local work pool, registered on a Prefect server.

One deployment per stage and one for the whole pipeline, for the demo preset (the coco-paper
ones are registered paused: they need COCO, the weights and GPUs). Schedules: a nightly
incremental feature-store update and a nightly re-evaluation (new codec checkpoints or fits
change only what depends on them).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "mfiba-local"

# (entry flow in deployments/entrypoints.py, deployment name, parameters, cron schedule or None, paused)
DEPLOYMENTS = [
    ("pipeline", "demo", {"preset": "demo"}, None, False),
    ("pipeline", "demo-full", {"preset": "demo-full"}, None, False),
    ("pipeline", "coco-paper", {"preset": "coco-paper"}, None, True),
    ("features", "demo-nightly", {"preset": "demo"}, "0 2 * * *", False),
    ("precode", "demo", {"preset": "demo"}, None, False),
    ("fit", "demo", {"preset": "demo"}, None, False),
    ("tune", "demo", {"preset": "demo"}, None, False),
    ("evaluate", "demo-nightly", {"preset": "demo"}, "0 4 * * *", False),
]


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """A process work pool: the worker runs each flow run in a subprocess of this checkout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   description="mfiba: flow runs as processes of this checkout"))
        except ObjectAlreadyExists:
            pass


def register(work_pool: str = WORK_POOL, repo: Path = REPO) -> list[str]:
    """Create or update every deployment; returns their 'flow/deployment' names."""
    from prefect import flow
    from prefect.schedules import Cron

    ensure_work_pool(work_pool)
    names = []
    for entry, name, params, cron, paused in DEPLOYMENTS:
        # Not deployments/flows.py: Prefect puts the entrypoint's folder on sys.path (and Dask's
        # spawned workers inherit it), where a module named `flows` would shadow the package.
        deployable = flow.from_source(source=str(repo), entrypoint=f"deployments/entrypoints.py:{entry}")
        with contextlib.redirect_stdout(io.StringIO()):  # deploy() prints a table per deployment
            deployable.deploy(
                name=name, work_pool_name=work_pool, parameters=params,
                schedules=[Cron(cron, timezone="UTC")] if cron else None, paused=paused,
                job_variables={"working_dir": str(repo)}, build=False, push=False, print_next_steps=False,
                tags=["mfiba", params["preset"]])
        names.append(f"{deployable.name}/{name}")
    return names
