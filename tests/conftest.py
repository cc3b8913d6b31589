"""Shared fixtures. Local state first: Prefect fixes PREFECT_HOME when it is imported."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mfiba.runtime import setup_local_state

REPO = Path(__file__).resolve().parents[1]
STATE = setup_local_state(REPO)
COCO_SAMPLE = REPO.parent / "shared" / "data" / "coco2017-val-sample"


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    if not (COCO_SAMPLE / "annotations" / "instances.json").exists():
        pytest.skip(f"COCO sample not found at {COCO_SAMPLE}: ../shared is absent")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def prefect_server():
    """One local Prefect server for the session's flow tests (CLI subprocesses reuse it
    through PREFECT_API_URL instead of each starting their own)."""
    from mfiba.runtime import LocalPrefectServer

    with LocalPrefectServer(REPO) as server:
        yield server


@pytest.fixture
def cli_env(prefect_server) -> dict:
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_server.api_url
    return env
