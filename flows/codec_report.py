"""`mfiba codec-report`: every configured codec at its rate points on stored test features.

Each image is coded to a bitstream file and decoded from that file alone; the table gives
real and estimated rate in the three units, their gap, encode/decode time per image, feature
MSE per scale and each scale's share of the bits, with 'pool' coded and derived.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import holds_output_locks
from mfiba.config import Config
from storage.feature_store import FeatureStore
from tasks.codecs.base import build_codec_from_spec
from tasks.codecs.measure import measure_codec, retrained_vs_rgb, summarise


@task(name="measure-codec", task_run_name="measure-{label}-pool-{pool_mode}")
def measure_task(cfg_dict: dict, label: str, pool_mode: str, image_ids: list[int]):
    cfg = Config(**cfg_dict)
    spec = cfg.codecs.main if label == "main" else cfg.codecs.others[label]
    codec = build_codec_from_spec(spec, label, cfg.resolve_path)
    store = FeatureStore(cfg.store_url(), mode="r")
    out = cfg.resolve_path(cfg.run_dir) / "codec-report" / "streams" / f"{label}-{pool_mode}"
    table = measure_codec(codec, store, image_ids, spec.phis, out, derived=("pool",) if pool_mode == "derived" else ())
    table.insert(0, "label", label)
    table.insert(1, "pool", pool_mode)
    table.insert(2, "trained_on", spec.trained_on)
    return table


@flow(name="codec-report", flow_run_name="codec-report-{preset}")
def codec_report_flow(config: dict, preset: str = "demo", images: int = 8) -> str:
    import pandas as pd

    cfg = Config(**config)
    logger = get_run_logger()
    try:
        store = FeatureStore(cfg.store_url(), mode="r")
    except Exception as e:
        raise RuntimeError(f"cannot open the feature store {cfg.store_url()} ({e}): run `mfiba features` first") from e
    ids = []
    for i in store.image_ids():  # stop reading attributes once enough test images are found
        if store.read_attrs(i)["split"] == "test":
            ids.append(i)
            if len(ids) == images:
                break
    if not ids:
        raise RuntimeError(f"no test-split features in {store.url}: run `mfiba features` first")
    labels = ["main", *cfg.codecs.others]
    tables = [measure_task(config, label, pool, ids) for label in labels for pool in ("coded", "derived")]
    table = pd.concat(tables, ignore_index=True)
    summary = pd.concat([summarise(t).assign(label=t.label.iloc[0], pool=t["pool"].iloc[0],
                                             trained_on=t.trained_on.iloc[0]) for t in tables], ignore_index=True)
    out = cfg.resolve_path(cfg.run_dir) / "codec-report"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "per_image_scale.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    bd = retrained_vs_rgb(summary)
    bd.to_csv(out / "bdrate_feature_mse.csv", index=False, float_format="%.3f")
    if not bd.empty:
        logger.info("retrained on features vs trained on RGB, BD-rate on feature PSNR:\n" + bd.to_string(index=False))
    md = "```\n" + summary.round(4).to_string(index=False) + "\n```"
    create_markdown_artifact(md, key="codec-report", description=f"codecs on {len(ids)} test images")
    logger.info(f"codec report: {out / 'summary.csv'} ({len(ids)} test images)")
    return str(out / "summary.csv")


@holds_output_locks("codec-report")
def run_codec_report(cfg: Config, images: int = 8) -> str:
    return codec_report_flow(cfg.model_dump(mode="json"), cfg.preset, images)
