"""`mfiba evaluate`: the online path on test images, every method at every rate point.

Per test image (Dask tasks): MFIP weights from the image's own precoding (and, labelled
oracle, from its annotations); per (method, rate point) the allocation gives one phi per
scale; each image is coded to a real bitstream file; a separate step decodes that file
alone and runs the heads. Then COCOeval per method and rate point, BD-rate against the
uniform anchor (and the natural-image codec when configured) with a paired bootstrap
interval, RD plots with the lossless ceiling, and a report.

A rate point of an allocating method is one lambda' shared by all test images (the paper's RD
curves), chosen so that the mean predicted bits match the uniform anchor's rate points; the
per-image budget mode is `evaluate.rate_mode=budget`. Cached per (image, method, rate point,
pool mode); resumable.
"""
from __future__ import annotations

import json
import os
import time

import dask
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import Progress, dask_task_runner, gpu_annotation, holds_output_locks, worker_device
from flows.features import _checkpoint, skipped_images, weights_identity
from flows.fit import load_current_fit
from flows.tune import load_current_tune
from mfiba.config import Config, ConfigError
from storage.feature_store import FeatureStore
from storage.manifest import StageManifest, code_version, write_manifest
from storage.results import PartTable, write_frame
from storage.urls import atomic_write_text
from tasks.codecs.base import build_codec_from_spec
from tasks.datasets.sources import image_refs, open_split
from tasks.device import resolve_device
from tasks.evaluation import report
from tasks.evaluation.online import (EvalSettings, decode_items, encode_items, item_key, lossless_detections,
                                     online_weights, weights_key)
from tasks.methods import (TUNED, RateModels, allocate_phis, lambda_grid, method_weights, predicted_bits,
                           rate_models_from_fit, uniform_phis)
from tasks.models.registry import build_task_model
from tasks.precoding import coded_scales


# A few images per task: Prefect's per-task bookkeeping is not small against 2 s of work;
# each image is still its own table part (resumable per image).
WEIGHTS_IMAGES_PER_TASK = 4


@task(name="online-weights", retries=2, retry_delay_seconds=2, task_run_name="mfip-images-{first}-to-{last}")
def weights_task(settings: EvalSettings, image_ids: list[int], pool_modes: tuple[str, ...], first: int, last: int):
    return [online_weights(settings, i, pool_modes) for i in image_ids]


@task(name="encode", retries=2, retry_delay_seconds=2, task_run_name="encode-image-{image_id}")
def encode_task(settings: EvalSettings, image_id: int, entries: list[dict]):
    return encode_items(settings, image_id, entries)


@task(name="decode-and-detect", retries=2, retry_delay_seconds=2, task_run_name="decode-image-{image_id}")
def decode_task(settings: EvalSettings, image_id: int, entries: list[dict]):
    return decode_items(settings, image_id, entries)


@task(name="lossless-ceiling", retries=2, retry_delay_seconds=2)
def ceiling_task(settings: EvalSettings, image_ids: list[int]):
    return lossless_detections(settings, image_ids)


def _label(method: str, task: str, tasks: list[str]) -> str:
    return method if method == "uniform" or len(tasks) == 1 else f"{method}[{task}]"


def _models_for_mode(base: RateModels, scales, tune: dict) -> RateModels:
    """The fitted models restricted to the coded scales of a pool mode, with the tuned weights.
    Static, SABA and finetuned weights come from the calibration of the configured pool mode;
    for the other mode 'pool' is dropped and the rest renormalised (stated in the report)."""
    def restrict(d: dict) -> dict:
        kept = {s: float(d[s]) for s in scales if s in d}
        total = sum(kept.values())
        return {s: v / total for s, v in kept.items()} if total > 0 else kept

    index = [base.scales.index(s) for s in scales]
    pick = (lambda t: t if len(t) == 1 else tuple(t[i] for i in index))
    return RateModels(tuple(scales), pick(base.alpha), pick(base.beta), {s: base.rate_phi[s] for s in scales},
                      static_weights=restrict(base.static_weights),
                      weight_correction={s: float(tune["weight_correction"].get(s, 0.0)) for s in scales},
                      saba_weights=restrict(tune["saba_weights"]), divisors=base.divisors,
                      rate_phi_points={s: base.rate_phi_points[s] for s in scales if s in base.rate_phi_points},
                      rate_phi_mode=base.rate_phi_mode)


@flow(name="evaluate", flow_run_name="evaluate-{preset}")
def evaluate_flow(config: dict, preset: str = "demo") -> dict:
    cfg = Config(**config)
    logger = get_run_logger()
    device = resolve_device(cfg.device)
    ec = cfg.evaluate
    unknown = [a for a in ec.anchors if a not in cfg.codecs.others]
    if unknown:
        raise ConfigError(f"evaluate.anchors: {unknown} are not labels of codecs.others ({sorted(cfg.codecs.others)})")
    fit = load_current_fit(cfg, cfg.tune.metric)
    needs_tune = bool(TUNED & set(ec.methods))
    tune = load_current_tune(cfg) if needs_tune else {"version": None, "fit_version": fit["version"],
                                                      "weight_correction": {}, "saba_weights": {}}
    if tune.get("fit_version") != fit["version"]:
        logger.warning(f"tune was computed on fit {tune.get('fit_version')}, the current fit is {fit['version']}: "
                       "rerun `mfiba tune`")
    store = FeatureStore(cfg.store_url(), mode="r")
    weights_id = weights_identity(build_task_model(cfg.task_model.name, _checkpoint(cfg),
                                                   cfg.task_model.allow_random_weights))
    refs = image_refs(cfg, ["test"])["test"]
    image_ids = [r.image_id for r in refs][:ec.images or None]
    if len(image_ids) < len(refs):
        logger.warning(f"evaluate: evaluate.images={ec.images}, {len(image_ids)} of the {len(refs)} test images: "
                       f"the report, bdrate.csv and rd_points.csv in {cfg.run_dir} will describe this subset; "
                       "an evaluate without --images writes the full report again from the cache")
    skipped = skipped_images(store, image_ids)  # unusable images: left out, listed in the report
    if skipped:
        logger.warning(f"evaluate: {len(skipped)} of {len(image_ids)} test images were skipped by the features "
                       "stage and are left out (listed in the report)")
        image_ids = [i for i in image_ids if i not in skipped]
    if not image_ids:
        raise RuntimeError("evaluate: no usable test image (every selected one was skipped: "
                           + "; ".join(f"{i}: {why}" for i, why in list(skipped.items())[:5]) + ")")
    missing = sorted(set(image_ids) - set(store.image_ids()))
    if missing:
        raise RuntimeError(f"{len(missing)} test images have no features in {store.url}: run `mfiba features` first")
    main = build_codec_from_spec(cfg.codecs.main, "main", cfg.resolve_path)
    levels = list(main.lambdas) if hasattr(main, "lambdas") and not getattr(main, "variable_rate", False) else None
    phis = cfg.codecs.main.phis
    phi_range = (min(phis), max(phis))  # where the rate-phi model was fitted
    points = cfg.tune.rate_points
    ds = open_split(cfg, "test")
    run = cfg.resolve_path(cfg.run_dir)
    out = f"{run}/evaluate"
    specs = {"main": cfg.codecs.main.model_dump(mode="json"),
             **{a: cfg.codecs.others[a].model_dump(mode="json") for a in ec.anchors}}
    codec_shas = {"main": main.checkpoint_sha256.hex(),
                  **{a: build_codec_from_spec(cfg.codecs.others[a], a, cfg.resolve_path).checkpoint_sha256.hex()
                     for a in ec.anchors}}
    model_tasks = tuple(build_task_model(cfg.task_model.name, _checkpoint(cfg),
                                         cfg.task_model.allow_random_weights).tasks)
    score_tasks = tuple(ec.score_tasks) or model_tasks
    weights_identity_doc = {"weights": weights_id, "codec": specs["main"], "codec_sha256": codec_shas["main"],
                            "tasks": list(ec.tasks), "importance": [cfg.fit.importance_mode, cfg.fit.importance_floor],
                            "oracle": "oracle" in ec.methods}
    det_identity = {"weights": weights_id, "codecs": specs, "codec_sha256": codec_shas, "data": cfg.data_identity(),
                    "score_tasks": list(score_tasks)}
    weights_table = PartTable.for_identity(f"{out}/online-weights", weights_identity_doc)
    det_table = PartTable.for_identity(f"{out}/detections", det_identity)
    settings = EvalSettings(
        cfg.store_url(), cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights,
        json.dumps(specs, sort_keys=True),
        (str(ds.image_dir), str(ds.instances_json), str(ds.keypoints_json) if ds.keypoints_json else None),
        tuple(ec.tasks), score_tasks, tuple(phis), f"{out}/streams", weights_table.url, json.dumps(weights_table.identity, sort_keys=True),
        det_table.url, json.dumps(det_table.identity, sort_keys=True), "oracle" in ec.methods, cfg.fit.importance_mode,
        cfg.fit.importance_floor, worker_device(cfg, device), cfg.dask.threads_per_worker)

    # 1. Online MFIP (and oracle) weights per test image and pool mode.
    have = weights_table.keys()
    modes = tuple(ec.pool_modes)
    todo = [i for i in image_ids if weights_key(i, modes) not in have]
    logger.info(f"evaluate: {len(image_ids)} test images, pool modes {list(modes)}; online weights: "
                f"{len(image_ids) - len(todo)} cached, {len(todo)} to compute")
    progress = Progress(logger, "online MFIP weights (images)", len(todo))
    groups = [todo[k:k + WEIGHTS_IMAGES_PER_TASK] for k in range(0, len(todo), WEIGHTS_IMAGES_PER_TASK)]
    with dask.annotate(**gpu_annotation(cfg, device)):
        futures = [weights_task.submit(settings, g, modes, g[0], g[-1]) for g in groups]
    for f, g in zip(futures, groups):
        f.result()
        progress.advance(len(g))
    weights = weights_table.read([weights_key(i, modes) for i in image_ids])

    # 2. The plan: one entry per (image, method, rate point, pool mode).
    logger.info(f"evaluate: allocating bits per scale for {len(ec.methods)} methods x {len(points)} rate points "
                f"x {len(modes)} pool modes (each allocating method's lambda' per rate point searched first)")
    plan: dict[int, list[dict]] = {i: [] for i in image_ids}
    left_out: dict[str, str] = {}
    lambdas_used, seconds_assign = [], []
    for pool_mode in ec.pool_modes:
        scales = coded_scales(pool_mode)
        pixels = _scale_pixels(store, image_ids, scales)
        for k, q in enumerate(points):
            for i in image_ids:
                plan[i].append({"method": "uniform", "point": k, "codec": "main", "pool_mode": pool_mode,
                                "phis": uniform_phis(scales, phis[q]), "rate_setting": phis[q]})
            for a in ec.anchors:
                aphis = cfg.codecs.others[a].phis
                phi = aphis[min(q, len(aphis) - 1)]
                for i in image_ids:
                    plan[i].append({"method": f"uniform-{a}", "point": k, "codec": a, "pool_mode": pool_mode,
                                    "phis": uniform_phis(scales, phi), "rate_setting": phi})
        for task_name in ec.tasks:
            try:
                base = rate_models_from_fit(fit, task_name, ("0", "1", "2", "3", "pool"),
                                            cfg.allocation.loss_rate_model, cfg.allocation.divisors,
                                            cfg.allocation.rate_phi_mode)
            except ValueError as e:
                # A smoke test's random-init heads make the calibration losses noise, so its
                # fit is unusable by chance: the allocating methods are left out, and the
                # report says so. A real run stops here (nothing coded yet).
                if not cfg.smoke:
                    raise
                left_out.setdefault(f"allocating methods, task {task_name} (smoke test)", str(e))
                continue
            models = _models_for_mode(base, scales, tune)
            w = weights[(weights.task == task_name) & (weights.pool_mode == pool_mode)]
            per_image = {(i, src): dict(zip(g.scale, g.weight)) for (i, src), g in w.groupby(["image_id", "source"])}
            targets = {i: [predicted_bits(models, uniform_phis(scales, phis[q]), pixels[i]) for q in points]
                       for i in image_ids}
            for method in [m for m in ec.methods if m != "uniform"]:
                vectors = {i: method_weights(method, models, per_image.get((i, "loss")), per_image.get((i, "oracle")),
                                             image=i) for i in image_ids}
                if ec.rate_mode == "lambda":
                    grid = lambda_grid([vectors[i] for i in image_ids], models, [pixels[i] for i in image_ids],
                                       [float(np.mean([targets[i][k] for i in image_ids])) for k in range(len(points))],
                                       phi_range, levels)
                    lam = {i: grid for i in image_ids}
                else:  # each image meets its own budget
                    lam = {i: lambda_grid([vectors[i]], models, [pixels[i]], targets[i], phi_range, levels)
                           for i in image_ids}
                label = _label(method, task_name, ec.tasks)
                lambdas_used.append({"method": label, "pool_mode": pool_mode, "lambdas": lam[image_ids[0]]})
                for i in image_ids:
                    for k in range(len(points)):
                        t0 = time.perf_counter()
                        phi_map, _ = allocate_phis(vectors[i], models, pixels[i], lam[i][k], phi_range, levels)
                        seconds_assign.append(time.perf_counter() - t0)
                        plan[i].append({"method": label, "point": k, "codec": "main", "pool_mode": pool_mode,
                                        "phis": phi_map, "rate_setting": lam[i][k], "weights_task": task_name})

    # 3. Encode to stream files, then decode from the files alone (a separate task), per image.
    n_entries = sum(len(v) for v in plan.values())
    done = det_table.keys() & {item_key(i, e) for i in image_ids for e in plan[i]}
    logger.info(f"evaluate: {n_entries} coded images planned ({n_entries // max(1, len(image_ids))} per test image), "
                f"{len(done)} already decoded and scored")
    # Only images with a stream still to code or score become tasks: a rerun from caches
    # submits none (each task would only find its items done).
    todo_images = [i for i in image_ids if any(item_key(i, e) not in done for e in plan[i])]
    progress = Progress(logger, "encode + decode + heads (images)", len(todo_images))
    with dask.annotate(**gpu_annotation(cfg, device)):
        ceiling_future = ceiling_task.submit(settings, image_ids)
        encodes, decodes = [], []
        for i in todo_images:
            encodes.append(encode_task.submit(settings, i, plan[i]))
            decodes.append(decode_task.submit(settings, i, plan[i], wait_for=[encodes[-1]]))
    for f in decodes:
        f.result()
        progress.advance(1)
    seconds_encode = [t for e in encodes for t in e.result().seconds_per_item.values()]

    # 4. Scores, BD-rates, plots, report: written to the run folder.
    current = {item_key(i, e) for i in image_ids for e in plan[i]}  # parts of older plans stay unread
    logger.info(f"evaluate: scoring {len(current)} coded images (COCOeval per method and rate point), the lossless "
                f"ceiling, BD-rates with {ec.bootstrap} bootstrap resamples, plots and the report")
    detections = det_table.read(current).sort_values(["pool_mode", "method", "point", "image_id"], ignore_index=True)
    gt = ds.to_coco(image_ids)
    pts, evals = report.score_points(detections, gt, list(score_tasks), image_ids, compact=True)
    # the plan's codec labels ('main', an `others` label) as the codecs' names, as in bdrate.csv
    codec_names = {"main": cfg.codecs.main.name, **{label: spec.name for label, spec in cfg.codecs.others.items()}}
    pts["codec"] = ["+".join(codec_names.get(c, c) for c in str(v).split("+")) for v in pts["codec"]]
    ceil = report.ceiling(ceiling_future.result(), gt, list(score_tasks), image_ids)
    anchors = ["uniform"] + ([f"uniform-{ec.natural_image_anchor}"] if ec.natural_image_anchor else [])
    bd = report.bd_table(pts, evals, list(score_tasks), anchors=anchors, n_boot=ec.bootstrap, seed=cfg.seed)
    codec_of = {m: codec_names[c] for m, c in zip(detections.method, detections.codec)}
    plots_dir = run / "plots"
    figures = {"RD " + os.path.basename(p)[3:-4].replace("_", " "): os.path.relpath(p, run)
               for p in report.rd_plots(pts, ceil, list(score_tasks), plots_dir)}
    for name, path in fit.get("figures", {}).items():
        figures[name] = os.path.relpath(path, run)
    sens = report.sensitivity_plot(str(cfg.resolve_path("assets/demo-task-model/sensitivity.csv"))
                                   if cfg.task_model.name == "demo-multitask" else "", plots_dir)
    if sens:
        figures["Fig. 1 sensitivity"] = os.path.relpath(sens, run)
    bits = report.bits_per_scale(detections)
    online = weights_table.read([weights_key(i, modes) for i in image_ids])
    timing = report.timing_table({
        f"t_pre (online precoding, per image, pool {'+'.join(modes)})":
            online.drop_duplicates("image_id").seconds_precode.tolist(),
        "t_assign (allocation, per image and rate point)": seconds_assign,
        "t_enc (encode, per coded image)": seconds_encode,
        "t_dec (decode, per coded image)": detections.seconds_decode.tolist(),
        "t_task (heads, per coded image)": detections.seconds_heads.tolist()})
    write_frame(str(run / "rd_points.parquet"), pts.drop(columns=[c for c in ("image_bits", "image_input_pixels")
                                                                   if c in pts]))
    bd_long = report.long_bdrate(bd, codec_of)
    write_frame(str(run / "bdrate.parquet"), bd_long)
    write_frame(str(run / "bits_per_scale.parquet"), bits)
    write_frame(str(run / "timing.parquet"), timing)
    provenance = {"config": cfg.model_dump(mode="json"), "code_version": code_version(), "packages": _packages(),
                  "machine": _machine(), "fit": fit["version"], "tune": tune["version"]}
    atomic_write_text(str(run / "provenance.json"), json.dumps(provenance, indent=2, default=str))
    calib = len(image_refs(cfg, [cfg.fit.split]).get(cfg.fit.split, []))
    run_info = {
        "preset": cfg.preset, "task model": f"{cfg.task_model.name} ({weights_id[:19]})",
        "splits": f"calibration {calib} images (fits, tuning, SABA), test {len(image_ids)} images (this report"
                  + (f"; {len(skipped)} more skipped, listed below" if skipped else "") + "); disjoint, checked",
        "codec": f"{cfg.codecs.main.name}, rate points phi = {[phis[q] for q in points]}",
        "methods": ", ".join(ec.methods) + (f"; anchors: {', '.join(ec.anchors)}" if ec.anchors else ""),
        "allocation": f"{ec.rate_mode} mode, divisors {cfg.allocation.divisors}, loss-rate "
                      f"{cfg.allocation.loss_rate_model}, rate-phi {cfg.allocation.rate_phi_mode}; weights from "
                      f"task(s) {ec.tasks}; static/SABA/finetuned weights calibrated with pool {cfg.codecs.pool_mode}",
        "fit": fit["version"], "tune": tune["version"] or "not needed by these methods",
        "provenance": "provenance.json (configuration, git commit, packages, machine)",
    }
    run_info.update({f"left out: {what}": why for what, why in left_out.items()})
    labels = [text for text, on in (("SMOKE TEST", cfg.smoke),
                                    ("RANDOM-INIT task model weights", weights_id == "random-init")) if on]
    if labels:
        run_info = {"WARNING": " with ".join(labels) + ": the numbers below only show that every stage runs; "
                               "they mean nothing", **run_info}
    meta = {"title": f"MFIBA evaluation: {cfg.preset}" + (" (SMOKE TEST)" if cfg.smoke else ""),
            "code_version": code_version(),
            "streams": f"every bpp from stream files under {out}/streams, each decoded on its own"}
    md = report.compose_report(report.markdown_report(pts, bd, ceil, meta), run_info, bits, timing, figures,
                               _caveats(cfg, ec), skipped, len(image_ids) + len(skipped))
    atomic_write_text(str(run / "report.md"), md)
    create_markdown_artifact(md, key="evaluate-report", description=f"MFIBA evaluation on {len(image_ids)} test images")
    rd_pngs = sorted(p for p in figures.values() if os.path.basename(p).startswith("rd_"))
    if rd_pngs:  # the RD plot on the flow run's page: an inline PNG (no file server needed)
        import base64

        png = base64.b64encode((run / rd_pngs[0]).read_bytes()).decode()
        create_markdown_artifact(f"![RD curves](data:image/png;base64,{png})", key="evaluate-rd-plot",
                                 description=f"RD curves ({rd_pngs[0]})")
    if not bd_long.empty:  # empty when only anchors ran (a smoke test whose fit came out unusable)
        create_table_artifact(bd_long[bd_long.interpolation == "pchip"].round(3).to_dict(orient="records"),
                              key="evaluate-bdrate", description="BD-rate (pchip)")
    summary = {"report": str(run / "report.md"), "rd_points": str(run / "rd_points.csv"),
               "bdrate": str(run / "bdrate.csv"), "plots": sorted(figures.values()), "images": len(image_ids),
               "coded_images": n_entries, "reused": len(done), "skipped_images": {str(i): w for i, w in skipped.items()}}
    write_manifest(run, StageManifest(stage="evaluate", config_digest=cfg.digest("evaluate", "allocation", "codecs"),
                                      input_hashes={"fit": fit["version"], "tune": str(tune["version"])},
                                      items_done=int(len(detections)), extra=summary))
    cols = [c for c in ("anchor", "pool_mode", "method", "task", "metric", "bd_pchip", "ci_low", "ci_high", "reason")
            if c in bd]
    logger.info("evaluate done: " + json.dumps(summary) + "\n" + bd[cols].to_string(index=False))
    return summary


def _caveats(cfg: Config, ec) -> list[str]:
    out = [
        "BD-rates compare curves over the rate points' range only; a curve with fewer than 4 monotone points "
        "gives no BD-rate (the reason is in the table).",
        "The paired bootstrap resamples test images; it does not cover the calibration split's own sampling "
        "(fits, tuning), which a different calibration draw would change.",
        f"'pool' {', '.join(ec.pool_modes)}: static, SABA and finetuned weights were calibrated with pool "
        f"{cfg.codecs.pool_mode}; for the other mode 'pool' is dropped from them and the rest renormalised.",
    ]
    if cfg.data.source == "synthetic":
        out.append("Synthetic data and the project's compact demo model: absolute AP and the size of the gains are "
                   "not comparable with the paper's COCO numbers; the demo shows the method and the machinery.")
    if cfg.codecs.main.trained_on == "none":
        out.append(f"The main codec is {cfg.codecs.main.name} (classical): the demo's learned codecs were trained "
                   "on CPU for 2,000 to 2,400 steps per model only and saturate at about 25 dB mosaic PSNR, so "
                   "their task loss hardly changes with rate; a trained ELIC / VBR codec (`mfiba train-codec` on "
                   "a GPU) belongs in `codecs.main` for the paper's setting.")
    return out


def _packages() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "torchvision", "compressai", "prefect", "dask", "distributed", "zarr", "xarray",
             "pycocotools", "pandas", "numpy", "bjontegaard", "imagecodecs"]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except Exception:
            out[n] = "not installed"
    return out


def _machine() -> dict:
    import platform

    import torch

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _scale_pixels(store, image_ids, scales) -> dict[int, np.ndarray]:
    out = {}
    for i in image_ids:
        shapes = {s: a.shape for s, a in store.read_image(i, scales).items()}
        out[i] = np.array([shapes[s][-2] * shapes[s][-1] for s in scales])
    return out


@holds_output_locks("evaluate")
def run_evaluate(cfg: Config) -> dict:
    return evaluate_flow.with_options(task_runner=dask_task_runner(cfg, resolve_device(cfg.device)))(
        cfg.model_dump(mode="json"), cfg.preset)
