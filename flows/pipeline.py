"""`mfiba run`: the whole method as one Prefect flow, each stage a subflow with its own Dask
task runner: features -> precode -> fit -> tune (when a method needs it) -> evaluate. Every
stage is cached, so a rerun recomputes nothing and an interrupted run resumes."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import holds_output_locks
from mfiba.config import Config
from tasks.methods import TUNED


def stages(cfg: Config) -> list[str]:
    out = ["features", "precode", "fit"]
    if TUNED & set(cfg.evaluate.methods):
        out.append("tune")
    return out + ["evaluate"]


@flow(name="pipeline", flow_run_name="pipeline-{preset}")
def pipeline_flow(config: dict, preset: str = "demo") -> dict:
    from flows.evaluate import run_evaluate
    from flows.features import run_features
    from flows.fit import run_fit
    from flows.precode import run_precode
    from flows.tune import run_tune

    cfg = Config(**config)
    logger = get_run_logger()
    runners = {"features": run_features, "precode": run_precode, "fit": run_fit, "tune": run_tune,
               "evaluate": run_evaluate}
    results = {}
    for stage in stages(cfg):
        logger.info(f"pipeline {preset}: stage {stage}")
        results[stage] = runners[stage](cfg)
    logger.info(f"pipeline {preset} done: report {results['evaluate']['report']}")
    return results


@holds_output_locks("run")
def run_pipeline(cfg: Config) -> dict:
    return pipeline_flow(cfg.model_dump(mode="json"), cfg.preset)
