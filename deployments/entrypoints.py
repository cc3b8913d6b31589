"""Entry flows of the deployments: each takes a preset name and `--set`-style overrides, so a
deployment's parameters stay small and readable in the UI, and the configuration is resolved
(and validated) when the run starts, from the presets in the checkout the worker runs."""
from __future__ import annotations

from prefect import flow

from mfiba.config import load_config


def _config(preset: str, overrides: list[str] | None, smoke: bool = False):
    return load_config(preset, list(overrides or []), smoke=smoke)


@flow(name="deployed-pipeline", flow_run_name="pipeline-{preset}")
def pipeline(preset: str = "demo", overrides: list[str] | None = None, smoke: bool = False) -> dict:
    from flows.pipeline import run_pipeline

    return run_pipeline(_config(preset, overrides, smoke))["evaluate"]


@flow(name="deployed-features", flow_run_name="features-{preset}")
def features(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    """Incremental: images already in the store are skipped, new ones extracted."""
    from flows.features import run_features

    return run_features(_config(preset, overrides))


@flow(name="deployed-precode", flow_run_name="precode-{preset}")
def precode(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    from flows.precode import run_precode

    return run_precode(_config(preset, overrides))


@flow(name="deployed-fit", flow_run_name="fit-{preset}")
def fit(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    from flows.fit import run_fit

    return run_fit(_config(preset, overrides))


@flow(name="deployed-tune", flow_run_name="tune-{preset}")
def tune(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    from flows.tune import run_tune

    return run_tune(_config(preset, overrides))


@flow(name="deployed-evaluate", flow_run_name="evaluate-{preset}")
def evaluate(preset: str = "demo", overrides: list[str] | None = None) -> dict:
    """Re-evaluation: cached items are reused; a new codec checkpoint or fit changes the
    items' keys, so exactly what depends on it is recomputed."""
    from flows.evaluate import run_evaluate

    return run_evaluate(_config(preset, overrides))
