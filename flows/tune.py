"""`mfiba tune`: the calibration-split searches, never on test images.

- SABA: channel-group sensitivities on calibration images -> per-scale SABA weights;
- the lambda' grid: for each uniform anchor rate point, the lambda' whose mean predicted
  bits on the calibration images match it (so every method's curve covers the same range);
- finetuned MFIBA: the paper's line search on a per-scale weight correction, keeping steps
  of +-0.01 while the BD-rate against the uniform anchor on the calibration split improves;
- a calibration RD table for uniform, MFIBA, finetuned MFIBA, static, SABA and the oracle.

Rate points run as Dask tasks (one per method x rate point), each coding the calibration
subset at the method's phis and scoring it with COCOeval. The result is a versioned artefact
(`<run_dir>/tune/v-<hash>/tune.json`, with `current.json` pointing at it); a rerun with the
same inputs recomputes nothing.
"""
from __future__ import annotations

import hashlib
import io
import json

import dask
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import dask_task_runner, gpu_annotation, holds_output_locks, worker_device
from flows.features import _checkpoint
from flows.fit import load_current_fit
from flows.precode import precode_table_url
from mfiba.config import Config, ConfigError
from storage.manifest import StageManifest, code_version, write_manifest
from storage.results import write_frame
from storage.urls import atomic_write_text, read_bytes
from tasks.codecs.base import build_codec_from_spec
from tasks.datasets.sources import open_split
from tasks.device import resolve_device
from tasks.finetune import line_search
from tasks.methods import (RateModels, allocate_phis, lambda_grid, method_weights, predicted_bits,
                           rate_models_from_fit, uniform_phis)
from tasks.precoding import coded_scales
from tasks.rd import RDSettings, curve_bd_rate, lossless_items, rate_point_items, saba_items
from tasks.saba import saba_scale_weights


@task(name="rate-point", retries=2, retry_delay_seconds=2, task_run_name="{label}")
def rate_point_task(settings: RDSettings, image_ids: list[int], phis_per_image: list[dict], label: str) -> dict:
    return rate_point_items(settings, image_ids, phis_per_image)


@task(name="lossless-point", retries=2, retry_delay_seconds=2, task_run_name="lossless-ceiling")
def lossless_task(settings: RDSettings, image_ids: list[int]) -> dict:
    return lossless_items(settings, image_ids)


@task(name="saba-sensitivity", retries=2, retry_delay_seconds=2, task_run_name="saba-image-{image_id}")
def saba_task(settings: RDSettings, image_id: int, phi: float) -> dict:
    return saba_items(settings, image_id, phi)


def _version(parts: list[str]) -> str:
    return "v-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@flow(name="tune", flow_run_name="tune-{preset}")
def tune_flow(config: dict, preset: str = "demo") -> dict:
    cfg = Config(**config)
    logger = get_run_logger()
    device = resolve_device(cfg.device)
    tc = cfg.tune
    phis = cfg.codecs.main.phis
    bad = [q for q in tc.rate_points + [tc.saba_quality] if not 0 <= q < len(phis)]
    if bad:
        raise ConfigError(f"tune.rate_points / tune.saba_quality: index(es) {bad} outside codecs.main.phis "
                          f"(0..{len(phis) - 1})")
    fit = load_current_fit(cfg, tc.metric)
    table_url = precode_table_url(cfg)
    weights = pd.read_parquet(io.BytesIO(read_bytes(f"{table_url}/weights.parquet")))
    w = weights[(weights.task == tc.task) & (weights.split == cfg.fit.split)]
    image_ids = [int(i) for i in sorted(w.image_id.unique())[:tc.images]]
    if len(image_ids) < 4:
        raise RuntimeError(f"tune needs at least 4 precoded calibration images, found {len(image_ids)}: "
                           "run `mfiba precode` first")
    scales = coded_scales(cfg.codecs.pool_mode)
    models = rate_models_from_fit(fit, tc.task, scales, cfg.allocation.loss_rate_model, cfg.allocation.divisors,
                                        cfg.allocation.rate_phi_mode)
    version = _version([fit["version"], cfg.digest("tune", "allocation"), json.dumps(image_ids),
                        read_bytes(f"{table_url}/identity.json").decode()])
    out = f"{cfg.resolve_path(cfg.run_dir)}/tune/{version}"
    try:
        summary = json.loads(read_bytes(f"{out}/tune.json"))
        logger.info(f"tune {version} is up to date; nothing recomputed ({out}/tune.json)")
        atomic_write_text(f"{cfg.resolve_path(cfg.run_dir)}/tune/current.json", json.dumps({"version": version}))
        return summary
    except FileNotFoundError:
        pass

    codec = build_codec_from_spec(cfg.codecs.main, "main", cfg.resolve_path)
    levels = None if getattr(codec, "variable_rate", False) or not hasattr(codec, "lambdas") else list(codec.lambdas)
    # The rate-phi model is fitted on the precoded phis: allocation stays inside them.
    phi_range = (min(phis), max(phis))
    split_ds = open_split(cfg, cfg.fit.split)
    settings = RDSettings(cfg.store_url(), cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights,
                          json.dumps(cfg.codecs.main.model_dump(mode="json"), sort_keys=True),
                          (str(split_ds.image_dir), str(split_ds.instances_json),
                           str(split_ds.keypoints_json) if split_ds.keypoints_json else None),
                          (tc.task,), cfg.codecs.pool_mode, worker_device(cfg, device), cfg.dask.threads_per_worker)
    metric = f"{tc.metric}_{tc.task}"
    mfip = {i: dict(zip(g.scale, g.weight)) for i, g in w[w.source == "loss"].groupby("image_id")}
    oracle = {i: dict(zip(g.scale, g.weight)) for i, g in w[w.source == "oracle"].groupby("image_id")}
    pixels = _scale_pixels(table_url, image_ids, scales)

    def curve(label: str, phis_per_point: list[list[dict]]) -> list[dict]:
        with dask.annotate(**gpu_annotation(cfg, device)):
            futures = [rate_point_task.submit(settings, image_ids, p, f"{label}-point-{k}")
                       for k, p in enumerate(phis_per_point)]
        return [f.result() for f in futures]

    with dask.annotate(**gpu_annotation(cfg, device)):
        ceiling = lossless_task.submit(settings, image_ids)
    anchor = curve("uniform", [[uniform_phis(scales, phis[q])] * len(image_ids) for q in tc.rate_points])
    logger.info("uniform anchor on calibration: " + ", ".join(f"{p['bpp_input']:.4f} bpp -> {p[metric]:.2f}"
                                                               for p in anchor))
    # SABA sensitivities (a few calibration images, one quality).
    saba_ids = image_ids[:tc.saba_images]
    with dask.annotate(**gpu_annotation(cfg, device)):
        sens = [saba_task.submit(settings, i, phis[tc.saba_quality]) for i in saba_ids]
    saba_w, group_mean = saba_scale_weights([{s: np.array(v) for s, v in f.result().items()} for f in sens])
    models = RateModels(**{**models.__dict__, "saba_weights": saba_w})

    # lambda' per rate point: the allocation's mean predicted bits match the uniform setting's.
    targets = [float(np.mean([predicted_bits(models, uniform_phis(scales, phis[q]), pixels[i]) for i in image_ids]))
               for q in tc.rate_points]
    mfip_vectors = [method_weights("mfiba", models, mfip[i], image=i) for i in image_ids]
    lambdas = lambda_grid(mfip_vectors, models, [pixels[i] for i in image_ids], targets, phi_range, levels)

    def allocating_curve(method: str, m: RateModels, label: str | None = None) -> list[dict]:
        per_point = []
        for lam in lambdas:
            per_point.append([allocate_phis(method_weights(method, m, mfip.get(i), oracle.get(i), image=i), m, pixels[i], lam,
                                            phi_range, levels)[0] for i in image_ids])
        return curve(label or method, per_point)

    def evaluate_correction(correction: dict[str, float]) -> float:
        m = RateModels(**{**models.__dict__, "weight_correction": correction})
        label = "finetune-" + "_".join(f"{correction[s]:+.2f}" for s in scales)
        return curve_bd_rate(anchor, allocating_curve("mfiba-finetuned", m, label), metric).bd_rate_percent

    search = line_search(evaluate_correction, scales, tc.step, tc.max_evaluations, log=logger.info)
    models = RateModels(**{**models.__dict__, "weight_correction": search.correction})
    curves = {"uniform": anchor}
    for method in ("mfiba", "mfiba-finetuned", "static", "saba", "oracle"):
        curves[method] = allocating_curve(method, models)
    rows = [{"method": m, "point": k, "lambda_prime": (lambdas[k] if m != "uniform" else None),
             "phi": (phis[tc.rate_points[k]] if m == "uniform" else None), **p}
            for m, pts in curves.items() for k, p in enumerate(pts)]
    rd = pd.DataFrame(rows)
    bd_rows = []
    for m, pts in curves.items():
        if m == "uniform":
            continue
        for metric_name in (f"AP_{tc.task}", f"AP75_{tc.task}"):
            for interp in ("pchip", "akima", "cubic"):
                r = curve_bd_rate(anchor, pts, metric_name, interp)
                bd_rows.append({"method": m, "metric": metric_name, "interpolation": interp,
                                "bd_rate_percent": r.bd_rate_percent, "non_monotonic": r.non_monotonic,
                                "reason": r.reason})
    bd = pd.DataFrame(bd_rows)
    write_frame(f"{out}/calibration_rd.parquet", rd)
    write_frame(f"{out}/calibration_bdrate.parquet", bd)
    write_frame(f"{out}/line_search.parquet", pd.DataFrame(search.history))
    write_frame(f"{out}/saba_groups.parquet", pd.DataFrame(
        [{"scale": s, "group": g, "sensitivity": float(v)} for s, arr in group_mean.items() for g, v in enumerate(arr)]))
    summary = {
        "version": version, "folder": out, "task": tc.task, "metric": metric, "calibration_images": image_ids,
        "lambda_grid": lambdas, "weight_correction": search.correction, "saba_weights": saba_w,
        "static_weights": models.static_weights, "line_search": {"start_bd_rate": search.start_bd_rate,
                                                                  "best_bd_rate": search.bd_rate,
                                                                  "evaluations": search.evaluations},
        "lossless": ceiling.result(), "bd_rate_pchip": {r.method: r.bd_rate_percent for r in bd.itertuples()
                                                        if r.metric == metric and r.interpolation == "pchip"},
        "fit_version": fit["version"], "code_version": code_version(),
    }
    atomic_write_text(f"{out}/tune.json", json.dumps(summary, indent=2, default=float))
    atomic_write_text(f"{cfg.resolve_path(cfg.run_dir)}/tune/current.json", json.dumps({"version": version}))
    write_manifest(cfg.resolve_path(cfg.run_dir), StageManifest(
        stage="tune", config_digest=cfg.digest("tune", "allocation", "codecs"),
        input_hashes={"fit": fit["version"]}, items_done=len(image_ids), extra={"version": version}))
    md = (f"**tune {version}** on {len(image_ids)} calibration images, {metric}\n\n"
          f"line search: BD-rate {search.start_bd_rate:.2f}% (MFIBA) -> {search.bd_rate:.2f}% (finetuned), "
          f"correction {search.correction}\n\nSABA weights {saba_w}\n\n```\n"
          + bd[bd.interpolation == "pchip"].to_string(index=False) + "\n```")
    create_markdown_artifact(md, key="tune-report", description="calibration-split searches")
    logger.info(md)
    return summary


def _scale_pixels(table_url: str, image_ids, scales) -> dict[int, np.ndarray]:
    from storage.results import PartTable

    table = PartTable.load(table_url)
    table = table[table.image_id.isin(image_ids) & (table.quality == 0)]
    return {int(i): np.array([int(g.set_index("scale").loc[s, "scale_pixels"]) for s in scales])
            for i, g in table.groupby("image_id")}


def load_current_tune(cfg: Config) -> dict:
    base = f"{cfg.resolve_path(cfg.run_dir)}/tune"
    try:
        version = json.loads(read_bytes(f"{base}/current.json"))["version"]
        return json.loads(read_bytes(f"{base}/{version}/tune.json"))
    except FileNotFoundError as e:
        raise RuntimeError(f"no tuning results under {base}: run `mfiba tune` first") from e


@holds_output_locks("tune")
def run_tune(cfg: Config) -> dict:
    return tune_flow.with_options(task_runner=dask_task_runner(cfg, resolve_device(cfg.device)))(
        cfg.model_dump(mode="json"), cfg.preset)
