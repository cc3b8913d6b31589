"""`mfiba fit`: the offline fits on the calibration split, as a versioned artefact.

From the precode table: the loss-rate models (Cauchy and quadratic per scale, and a pooled
weight-free Cauchy, the paper's Table 1 and Fig. 6), the rate-phi model per scale (Table 2,
Fig. 7), the encoder-side loss against the oracle, MFIP weights by object size (Fig. 5) and
the static weights. Everything lands in `<run_dir>/fit/v-<hash>/`, where the hash covers the
table's bytes, the fit settings and the precode identity; `<run_dir>/fit/current.json` names
the version the allocation stages read (`load_current_fit`). A version that exists is
reused, never recomputed.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import holds_output_locks
from flows.precode import precode_table_url
from mfiba.config import Config
from storage.manifest import StageManifest, code_version, write_manifest
from storage.results import write_frame
from storage.urls import atomic_write_text, read_bytes
from tasks.fitting import (METRICS, FitError, failed_fit_rows, fit_loss_rate, fit_rate_phi_table,
                           loss_oracle_correlation, loss_rate_points, ordered_scales, per_image_fit_quality,
                           rate_phi_points, size_bins, size_trend, static_weights, table_tasks, weights_by_size)

# Part of the version hash: bump it when the fitting method changes what a version holds,
# so an old folder is not reused for results the current code would compute differently.
FIT_METHOD = "cauchy-lsq-1"
RATE_UNIT = "bits per pixel of the scale (sum of bits / sum of scale_pixels)"
LOSS_UNIT = "mAP points: 100 x (1 - AP) against the reference"


class FitStageError(RuntimeError):
    pass


def fit_root(cfg: Config) -> str:
    return f"{cfg.resolve_path(cfg.run_dir)}/fit"


def _read_inputs(cfg: Config) -> tuple[str, bytes, bytes]:
    url = precode_table_url(cfg)
    try:
        return url, read_bytes(f"{url}/table.parquet"), read_bytes(f"{url}/identity.json")
    except FileNotFoundError as e:
        raise FitStageError(f"no finished precode table at {url} ({e.filename or e}): "
                            f"run `mfiba precode --preset {cfg.preset}` first") from e


def table_content_sha256(table_bytes: bytes) -> str:
    """SHA-256 of what the fit reads: the table's rows in a canonical order, without the
    timing columns (a part recomputed after a loss has other timings, the same data)."""
    frame = pd.read_parquet(io.BytesIO(table_bytes))
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("seconds_")])
    keys = [c for c in ("image_id", "quality", "scale") if c in frame]
    if keys:
        frame = frame.sort_values(keys, ignore_index=True)
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()


def fit_version(table_bytes: bytes, identity_bytes: bytes, cfg: Config) -> tuple[str, str]:
    """(version, table sha256): what the fit depends on is the table's content, the fit
    settings, what the table was computed with (and the fitting method's revision)."""
    table_sha = table_content_sha256(table_bytes)
    key = table_sha + cfg.digest("fit") + identity_bytes.decode("utf-8") + FIT_METHOD
    return "v-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], table_sha


def _jsonable(x):
    """NaN and inf become null (JSON has neither); numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _records(frame) -> list[dict]:
    return _jsonable(frame.to_dict(orient="records"))


def _fit_params(row) -> dict:
    keys = ("alpha", "beta") if row["model"] != "quadratic" else ("c0", "c1", "c2")
    return {**{k: row[k] for k in keys}, "cc": row["cc"], "rmse": row["rmse"], "points": int(row["points"]),
            "status": row["status"]}


def _tasks_json(fits, static) -> dict:
    out: dict = {}
    for task in fits["task"].unique():
        f = fits[fits["task"] == task]
        metrics = {}
        for metric in [m for m in METRICS if m in set(f["metric"])]:
            fm = f[f["metric"] == metric]
            per_scale: dict = {}
            for _, row in fm[~fm["scale"].isin(["all", "pooled"])].iterrows():
                per_scale.setdefault(row["scale"], {})[row["model"]] = _fit_params(row)
            pooled = fm[fm["scale"] == "pooled"]
            metrics[metric] = {
                "pooled": _fit_params(pooled.iloc[0]) if len(pooled) else None,
                "per_scale": per_scale,
                "all_scales": {row["model"]: _fit_params(row) for _, row in fm[fm["scale"] == "all"].iterrows()},
            }
        sw = static[static["task"] == task]
        out[task] = {"metrics": metrics,
                     "static_weights": {src: dict(zip(g["scale"], g["weight"])) for src, g in sw.groupby("source")},
                     "static_weights_status": {src: g["status"].iloc[0] for src, g in sw.groupby("source")}}
    return out


def _summary(version: str, folder: str, info: dict, fits, rate_phi, trend, static, src: str) -> dict:
    table1 = {}
    for (task, metric), f in fits.groupby(["task", "metric"], sort=False):
        pick = {(r["scale"], r["model"]): r for _, r in f.iterrows()}
        entry = {}
        for name, key in (("cauchy", ("all", "cauchy")), ("quadratic", ("all", "quadratic")),
                          ("pooled", ("pooled", "cauchy-pooled"))):
            r = pick.get(key)
            entry[name] = {"cc": r["cc"], "rmse": r["rmse"], "status": r["status"]} if r is not None else None
        table1[f"{task}/{metric}"] = entry
    shown = static[static["source"] == src]
    return _jsonable({
        "version": version, "folder": folder, "fit_json": f"{folder}/fit.json", "report": f"{folder}/report.md",
        "precode_table": info["precode_table"], "split": info["split"], "images": info["images"],
        "rows": info["rows"], "loss_source": src, "table1": table1,
        "rate_phi": {r["scale"]: {"cc": r["cc"], "rmse": r["rmse"], "log_cc": r["log_cc"], "status": r["status"],
                                  "note": r["note"]} for _, r in rate_phi.iterrows()},
        "size_trend_small_below_large": {r["task"]: r["small_below_large"] for _, r in trend.iterrows()
                                         if r["source"] == src} if not trend.empty else {},
        "static_weights": {t: dict(zip(g["scale"], g["weight"])) for t, g in shown.groupby("task")},
    })


def _publish(cfg: Config, version: str, summary: dict, table_sha: str, identity_bytes: bytes) -> None:
    root = fit_root(cfg)
    # The version only, not the folder's path: a run folder copied or moved elsewhere still
    # reads its own fit (older files also name the folder; readers ignore it).
    atomic_write_text(f"{root}/current.json", json.dumps({"version": version}, indent=2) + "\n")
    write_manifest(cfg.resolve_path(cfg.run_dir), StageManifest(
        stage="fit", config_digest=cfg.digest("fit"),
        input_hashes={"precode_table": table_sha, "precode_identity": hashlib.sha256(identity_bytes).hexdigest()},
        items_done=int(summary.get("images", 0)), extra=summary))


@flow(name="fit", flow_run_name="fit-{preset}")
def fit_flow(config: dict, preset: str = "demo") -> dict:
    import pandas as pd

    from tasks import fit_report
    from tasks.importance import mfip_table

    cfg = Config(**config)
    logger = get_run_logger()
    table_url, table_bytes, identity_bytes = _read_inputs(cfg)
    version, table_sha = fit_version(table_bytes, identity_bytes, cfg)
    folder = f"{fit_root(cfg)}/{version}"
    try:
        existing = json.loads(read_bytes(f"{folder}/fit.json"))
    except FileNotFoundError:
        existing = None
    if existing is not None:
        summary = {**existing["summary"], "recomputed": False}
        _publish(cfg, version, summary, table_sha, identity_bytes)
        try:
            create_markdown_artifact(read_bytes(f"{folder}/report.md").decode("utf-8"), key="fit-report",
                                     description=f"fit {version} (reused)")
        except FileNotFoundError:
            pass
        logger.info(f"fit {version} is up to date; nothing recomputed ({folder})")
        return summary

    frame = pd.read_parquet(io.BytesIO(table_bytes))
    split = cfg.fit.split
    if "split" not in frame or not (frame["split"] == split).any():
        present = sorted(frame["split"].unique()) if "split" in frame else []
        raise FitStageError(f"the precode table {table_url} has no rows of split {split!r} (splits present: "
                            f"{present}): run `mfiba precode --preset {cfg.preset} --splits {split}`")
    frame = frame[frame["split"] == split].reset_index(drop=True)
    frame["scale"] = frame["scale"].astype(str)
    tasks = table_tasks(frame)
    if not tasks:
        raise FitStageError(f"the precode table {table_url} has no loss columns (loss_bbox, ...)")
    src = cfg.fit.loss_source
    scales = ordered_scales(frame["scale"].unique())
    n_images = int(frame["image_id"].nunique())
    n_qualities = int(frame["quality"].nunique())
    logger.info(f"fit {version}: {n_images} {split} images x {n_qualities} qualities x {len(scales)} scales "
                f"({len(frame)} rows), tasks {tasks}, loss source {src!r}")

    # Weights from the table with this stage's importance settings, so that they always match
    # the version hash (weights.parquet was written with the settings precode ran under).
    weights = mfip_table(frame, tasks, mode=cfg.fit.importance_mode, floor=cfg.fit.importance_floor)
    _compare_precode_weights(table_url, weights, logger)
    static = pd.concat([static_weights(weights, source=s, split=split) for s in sorted(weights["source"].unique())],
                       ignore_index=True)

    points_all, fits_all, loglog_all, image_quality = [], [], [], []
    for task in tasks:
        sw = static[(static["task"] == task) & (static["source"] == src)]
        scale_weights = dict(zip(sw["scale"], sw["weight"]))
        for metric in METRICS:
            try:
                points = loss_rate_points(frame, task, metric, src)
            except FitError as e:
                logger.warning(f"loss-rate fit skipped: {e}")
                fits_all.append(failed_fit_rows(task, metric, src, str(e)))
                continue
            fits = fit_loss_rate(points, scale_weights, cauchy_method="lsq")
            loglog_all.append(fit_loss_rate(points, scale_weights, cauchy_method="loglog"))  # for comparison
            bad = fits[(fits["status"] != "ok") & (fits["scale"] != "all")]
            if len(bad):
                logger.warning(f"{task} {metric}: " + "; ".join(
                    f"scale {r.scale} {r.model} {r.status.split(':')[0]}" for r in bad.itertuples())
                    + " (reasons in the report)")
            points_all.append(points)
            fits_all.append(fits)
            image_quality.append(per_image_fit_quality(frame, fits, task, metric, src))
    points = pd.concat(points_all, ignore_index=True) if points_all else pd.DataFrame()
    fits = pd.concat(fits_all, ignore_index=True)
    loglog = pd.concat(loglog_all, ignore_index=True) if loglog_all else None
    image_quality = pd.concat(image_quality, ignore_index=True) if image_quality else pd.DataFrame()

    rp_points = rate_phi_points(frame)
    rate_phi = fit_rate_phi_table(rp_points)
    correlation = loss_oracle_correlation(frame, tasks)

    bins, by_size, centre, trend, size_note = _size_analysis(cfg, split, frame, weights, logger)

    out = str(folder)
    tables = {"loss_rate_points": points, "loss_rate_fits": fits, "loss_rate_fits_loglog": loglog,
              "image_fit_quality": image_quality,
              "rate_phi_points": rp_points, "rate_phi_fits": rate_phi, "loss_oracle_correlation": correlation,
              "weights": weights, "static_weights": static, "size_bins": bins, "weights_by_size": by_size,
              "size_centre": centre, "size_trend": trend}
    for name, t in tables.items():
        if t is not None:
            write_frame(f"{out}/{name}.parquet", t)
    if not points.empty:
        fit_report.plot_loss_rate(points, fits, f"{out}/fig6_loss_rate.png")
    fit_report.plot_rate_phi(rp_points, rate_phi, f"{out}/fig7_rate_phi.png")
    if not by_size.empty:
        fit_report.plot_weights_by_size(by_size, src, f"{out}/fig5_weights_by_size.png")

    info = {"version": version, "precode_table": f"{table_url}/table.parquet", "data_sha256": table_sha,
            "split": split, "images": n_images, "rows": int(len(frame)), "scales": scales,
            "qualities": n_qualities, "loss_source": src, "importance_mode": cfg.fit.importance_mode,
            "importance_floor": cfg.fit.importance_floor, "cauchy_fit": "lsq (from the log-log start)",
            "config_digest": cfg.digest("fit"),
            "code_version": code_version()}
    report = fit_report.report_markdown(info, fits, rate_phi, correlation, by_size, trend, static, image_quality,
                                        loglog)
    if size_note:
        report += f"\n_Fig. 5: {size_note}_\n"
    atomic_write_text(f"{out}/report.md", report)

    summary = _summary(version, out, info, fits, rate_phi, trend, static, src)
    doc = {**info, "precode_identity": json.loads(identity_bytes), "rate_unit": RATE_UNIT, "loss_unit": LOSS_UNIT,
           "phis": sorted(float(p) for p in frame["phi"].unique()),
           "scale_pixels": {s: float(frame.loc[frame["scale"] == s, "scale_pixels"].mean()) for s in scales},
           "input_pixels": float(frame["input_pixels"].mean()),
           "points": {"loss_rate": int(len(points)), "rate_phi": int(len(rp_points))},
           "tasks": _tasks_json(fits, static),
           "rate_phi": {r["scale"]: {k: r[k] for k in ("a", "b", "cc", "rmse", "nrmse", "points", "log_a", "log_b",
                                                       "log_cc", "log_rmse", "status", "note")}
                        for _, r in rate_phi.iterrows()},
           "loss_oracle_correlation": _records(correlation), "size_trend": _records(trend),
           "files": sorted(os.path.basename(p) for p in _listing(out)), "summary": summary}
    # fit.json last: its presence marks a complete version.
    atomic_write_text(f"{out}/fit.json", json.dumps(_jsonable(doc), indent=2, sort_keys=False) + "\n")
    summary = {**summary, "recomputed": True}
    _publish(cfg, version, summary, table_sha, identity_bytes)
    create_markdown_artifact(report, key="fit-report", description=f"fit {version} on {n_images} {split} images")
    logger.info(f"fit {version} written to {out}: " + "; ".join(
        f"{k} cauchy CC {v['cauchy']['cc']:.4f}" for k, v in summary["table1"].items()
        if v.get("cauchy") and v["cauchy"]["cc"] is not None))
    return summary


def _listing(folder: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    return [p for p in fs.ls(root, detail=False) if not p.rsplit("/", 1)[-1].startswith(".")]


def _compare_precode_weights(table_url: str, weights, logger) -> None:
    """weights.parquet is precode's copy; say so when it no longer matches (other settings)."""
    import pandas as pd

    try:
        stored = pd.read_parquet(io.BytesIO(read_bytes(f"{table_url}/weights.parquet")))
    except FileNotFoundError:
        return
    keys = ["image_id", "task", "source", "scale"]
    both = weights.merge(stored, on=keys, how="inner", suffixes=("", "_precode"))
    if len(both) and float((both["weight"] - both["weight_precode"]).abs().max()) > 1e-9:
        logger.warning(f"{table_url}/weights.parquet differs from the weights under the current fit settings "
                       "(importance_mode / importance_floor changed since precode); the fit uses the current ones")


def _size_analysis(cfg: Config, split: str, frame, weights, logger):
    import pandas as pd

    from tasks.datasets.coco import DatasetError
    from tasks.datasets.sources import open_split
    from tasks.fitting import SIZE_BINS

    empty = (pd.DataFrame(columns=["image_id", "size_bin", "objects", "median_area"]), pd.DataFrame(),
             pd.DataFrame(columns=["source", "task", "size_bin", "images", "centre"]), pd.DataFrame())
    try:
        ds = open_split(cfg, split)
        annotations = {int(i): ds.annotations(int(i)) for i in sorted(frame["image_id"].unique())}
    except DatasetError as e:
        note = f"no annotations for split {split!r} ({e}); the size analysis is left out"
        logger.warning(note)
        return (*empty, note)
    bins = size_bins(annotations)
    by_size, centre = weights_by_size(weights, bins)
    trend = size_trend(centre)
    counts = bins["size_bin"].value_counts()
    logger.info("size bins: " + ", ".join(f"{b} {int(counts.get(b, 0))}" for b in SIZE_BINS))
    return bins, by_size, centre, trend, ""


@holds_output_locks("fit")
def run_fit(cfg: Config) -> dict:
    return fit_flow(cfg.model_dump(mode="json"), cfg.preset)


def load_current_fit(cfg: Config, metric: str = "AP") -> dict:
    """The fit the allocation stages use: per task the pooled and per-scale (alpha, beta) of
    the Cauchy model for `metric`, the rate-phi (a, b) per scale and the static weights
    (of the configured loss source). Rates are in bits per pixel of the scale. Each entry
    carries its `status`: only 'ok' entries are usable by the closed-form allocation."""
    root = fit_root(cfg)
    try:
        folder = f"{root}/{json.loads(read_bytes(f'{root}/current.json'))['version']}"
        doc = json.loads(read_bytes(f"{folder}/fit.json"))
    except FileNotFoundError as e:
        raise FitStageError(f"no fit under {root} ({e.filename or e}): run `mfiba fit --preset {cfg.preset}` "
                            "first") from e
    if metric not in METRICS:
        raise FitStageError(f"unknown metric {metric!r} (expected one of {list(METRICS)})")
    rate_phi = {s: {"a": r["a"], "b": r["b"], "status": r["status"]} for s, r in doc["rate_phi"].items()}
    src = doc["loss_source"]
    tasks = {}
    for task, t in doc["tasks"].items():
        m = t["metrics"].get(metric)
        if m is None:
            continue
        ab = lambda f: {"alpha": f["alpha"], "beta": f["beta"], "status": f["status"]} if f else None  # noqa: E731
        tasks[task] = {
            "pooled": ab(m["pooled"]),
            "per_scale": {s: ab(v.get("cauchy")) for s, v in m["per_scale"].items()},
            "rate_phi": rate_phi,
            "static_weights": t["static_weights"].get(src, {}),
        }
    # The measured means behind the rate-phi fit, for allocation.rate_phi_mode=interpolated.
    points = pd.read_parquet(io.BytesIO(read_bytes(f"{folder}/rate_phi_points.parquet")))
    rate_phi_points = {str(s): [g.sort_values("phi").phi.tolist(), g.sort_values("phi").rate.tolist()]
                       for s, g in points.groupby("scale")}
    return {"version": doc["version"], "folder": folder, "metric": metric, "loss_source": src,
            "split": doc["split"], "rate_unit": doc["rate_unit"], "scales": doc["scales"],
            "scale_pixels": doc["scale_pixels"], "input_pixels": doc["input_pixels"], "phis": doc["phis"],
            "rate_phi": rate_phi, "rate_phi_points": rate_phi_points, "tasks": tasks,
            "figures": {title: f"{folder}/{name}" for title, name in FIGURES.items()
                        if name in doc.get("files", [])}}


FIGURES = {"Fig. 5 importance by object size": "fig5_weights_by_size.png",
           "Fig. 6 loss-rate fits": "fig6_loss_rate.png", "Fig. 7 rate-phi fits": "fig7_rate_phi.png"}
