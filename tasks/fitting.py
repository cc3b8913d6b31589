"""Offline model fitting (Liu et al., TOMM 2024, Sec. 3.3, Tables 1 and 2).

- Task loss-rate model, Cauchy form: d = alpha * R^(-beta), fitted in log-log space
  (log d = log alpha - beta log R, least squares) or, with method="lsq", by least squares
  in loss units started from the log-log solution; against the quadratic model
  d = c0 + c1 R + c2 R^2 for comparison.
- Rate-phi model: R = a * phi + b per scale (linear least squares).
Every fit reports the Pearson correlation (CC) and RMSE of its predictions on the data it
came from, as the paper's tables do; degenerate data (too few points, a flat curve) raises
a clear error instead of returning NaN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class FitError(ValueError):
    pass


@dataclass(frozen=True)
class Fit:
    model: str  # "cauchy", "quadratic" or "linear"
    params: dict[str, float]
    cc: float
    rmse: float
    points: int

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(x, y, what: str, min_points: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise FitError(f"{what}: x and y differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < min_points:
        raise FitError(f"{what}: {x.size} usable points, need at least {min_points}")
    if np.ptp(x) == 0:
        raise FitError(f"{what}: all x values are equal ({x[0]}); nothing to fit")
    return x, y


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    rmse = float(np.sqrt(np.mean((y - pred) ** 2)))
    cc = float(np.corrcoef(y, pred)[0, 1]) if np.std(y) > 0 and np.std(pred) > 0 else float("nan")
    return cc, rmse


def fit_cauchy(rate, loss, what: str = "loss-rate", method: str = "loglog", factor=None) -> Fit:
    """d = factor * alpha * R^-beta (factor: a known multiplier per point, e.g. the MFIP
    weight of Eq. 3; 1 if None).

    method "loglog": least squares on log d (relative errors; points with zero loss cannot
    enter). "lsq": least squares on d itself, i.e. the RMSE that Table 1 reports, by
    Levenberg-Marquardt from the log-log solution; zero-loss points count. The log-log fit
    lets the near-zero losses at high rate steer the curve, which can miss the large losses
    at low rate by tens of mAP points."""
    if method not in ("loglog", "lsq"):
        raise FitError(f"{what}: unknown Cauchy fit method {method!r} (expected 'loglog' or 'lsq')")
    r, d = _clean(rate, loss, what, 2)
    f = np.ones_like(r) if factor is None else np.asarray(factor, float).ravel()
    if f.shape != np.asarray(rate, float).ravel().shape:
        raise FitError(f"{what}: factor has {f.size} entries for {np.asarray(rate).size} points")
    f = f[np.isfinite(np.asarray(rate, float).ravel()) & np.isfinite(np.asarray(loss, float).ravel())]
    if not np.all(f > 0):
        raise FitError(f"{what}: the multipliers (weights) must be positive")
    ok = (r > 0) & (d > 0)  # the log-log fit needs positive values
    if ok.sum() < 2:
        raise FitError(f"{what}: fewer than 2 points with positive rate and loss")
    if np.ptp(r[ok]) == 0:
        raise FitError(f"{what}: the points with positive loss all have the same rate ({r[ok][0]})")
    slope, intercept = np.polyfit(np.log(r[ok]), np.log(d[ok] / f[ok]), 1)
    alpha, beta = float(np.exp(intercept)), float(-slope)
    if method == "lsq" and np.all(r > 0):
        alpha, beta = _refine_cauchy(r, d, f, alpha, beta)
    cc, rmse = _scores(d, f * alpha * r ** (-beta))
    return Fit("cauchy", {"alpha": alpha, "beta": beta}, cc, rmse, int(r.size))


def _refine_cauchy(r, d, f, alpha: float, beta: float, iterations: int = 200) -> tuple[float, float]:
    """Levenberg-Marquardt on (log alpha, beta) for sum (f alpha R^-beta - d)^2; keeps the
    start when nothing improves on it (never worse than the log-log fit in loss units)."""
    log_r = np.log(r)

    def model(theta):
        with np.errstate(over="ignore", invalid="ignore"):
            return f * np.exp(theta[0] - theta[1] * log_r)

    theta = np.array([np.log(alpha), beta])
    cost = float(np.sum((model(theta) - d) ** 2))
    damping = 1e-3
    for _ in range(iterations):
        pred = model(theta)
        jac = np.stack([pred, -pred * log_r], axis=1)
        a, g = jac.T @ jac, jac.T @ (pred - d)
        try:
            step = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -g)
        except np.linalg.LinAlgError:
            break
        trial = theta + step
        trial_cost = float(np.sum((model(trial) - d) ** 2))
        if np.isfinite(trial_cost) and trial_cost < cost:
            converged = cost - trial_cost <= 1e-12 * max(cost, 1e-300)
            theta, cost, damping = trial, trial_cost, damping * 0.3
            if converged:
                break
        else:
            damping *= 10.0
            if damping > 1e12:
                break
    return float(np.exp(theta[0])), float(theta[1])


def fit_quadratic(rate, loss, what: str = "loss-rate") -> Fit:
    r, d = _clean(rate, loss, what, 3)
    c2, c1, c0 = np.polyfit(r, d, 2)
    cc, rmse = _scores(d, c0 + c1 * r + c2 * r ** 2)
    return Fit("quadratic", {"c0": float(c0), "c1": float(c1), "c2": float(c2)}, cc, rmse, int(r.size))


def fit_rate_phi(phi, rate, what: str = "rate-phi") -> Fit:
    p, r = _clean(phi, rate, what, 2)
    a, b = np.polyfit(p, r, 1)
    if a == 0:
        raise FitError(f"{what}: rate does not change with phi (slope 0)")
    cc, rmse = _scores(r, a * p + b)
    return Fit("linear", {"a": float(a), "b": float(b)}, cc, rmse, int(p.size))


# ---------------------------------------------------------------------------------------
# The fit stage's analyses on a precode table (pure pandas, no Prefect).
#
# Units: rate R is bits per pixel *of that scale* (sum of bits / sum of scale_pixels over the
# split), the allocation's unit (REFERENCE.md, 'Units'); loss is in mAP points (x100), as the
# paper's Table 1 RMSEs are.
# ---------------------------------------------------------------------------------------

SCALE_ORDER = ("0", "1", "2", "3", "pool")
METRICS = {"AP": "", "AP75": "75"}  # metric -> column infix: loss_bbox / loss75_bbox
SIZE_BINS = ("small", "medium", "large", "none")
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2  # COCO's object-size thresholds

# Paper (Liu et al., TOMM 2024) Table 1: fit quality on COCO val, detection.
PAPER_TABLE1 = {("cauchy", "AP"): (0.9991, 0.4551), ("cauchy", "AP75"): (0.9989, 0.6217),
                ("quadratic", "AP"): (0.9956, 1.0078), ("quadratic", "AP75"): (0.9930, 1.5966)}
# Paper Table 2: rate-phi linear fit per scale, (CC, RMSE).
PAPER_TABLE2 = {"0": (0.9938, 0.0084), "1": (0.9855, 0.0145), "2": (0.9823, 0.0238),
                "3": (0.9774, 0.0321), "pool": (0.9768, 0.0181)}


def ordered_scales(scales) -> list[str]:
    present = {str(s) for s in scales}
    unknown = sorted(present - set(SCALE_ORDER))
    if unknown:
        raise FitError(f"unknown scale names {unknown} (expected {list(SCALE_ORDER)})")
    return [s for s in SCALE_ORDER if s in present]


def table_tasks(table) -> list[str]:
    """Tasks with a loss column in the precode table, in a fixed order."""
    return [t for t in ("bbox", "segm", "keypoints") if f"loss_{t}" in table.columns]


def loss_column(task: str, metric: str, source: str = "loss") -> str:
    if metric not in METRICS:
        raise FitError(f"unknown metric {metric!r} (expected one of {list(METRICS)})")
    if source not in ("loss", "oracle"):
        raise FitError(f"unknown loss source {source!r} (expected 'loss' or 'oracle')")
    return f"{source}{METRICS[metric]}_{task}"


def _require(table, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise FitError(f"{what}: the precode table has no column(s) {missing}")


def loss_rate_points(table, task: str, metric: str, source: str = "loss"):
    """Dataset-mean (rate, loss) per (scale, quality) over the rows whose loss is finite.

    Rate is a ratio of sums (bits / scale pixels) over the same rows the loss mean uses, so
    both coordinates of a point describe the same images (the oracle is NaN on images
    without annotations of that kind)."""
    import pandas as pd

    column = loss_column(task, metric, source)
    _require(table, [column, "scale", "quality", "phi", "bits", "scale_pixels"], f"{task} {metric} ({source})")
    rows = table[np.isfinite(table[column].to_numpy(float))]
    if rows.empty:
        raise FitError(f"{task} {metric} ({source}): column {column} has no finite value on this split")
    g = rows.groupby(["scale", "quality"], sort=False)
    points = pd.DataFrame({
        "phi": g["phi"].first(),
        "rate": g["bits"].sum() / g["scale_pixels"].sum(),
        "loss": g[column].mean() * 100.0,
        "images": g["image_id"].nunique(),
    }).reset_index()
    # AP arithmetic leaves ~1e-16 where the loss is really 0; in log-log space that would
    # be a point at -37, so it is snapped to 0 (and left out of the Cauchy fit).
    points.loc[points["loss"].abs() < 1e-9, "loss"] = 0.0
    points.insert(0, "task", task)
    points.insert(1, "metric", metric)
    points.insert(2, "source", source)
    points["scale"] = points["scale"].astype(str)
    order = {s: i for i, s in enumerate(SCALE_ORDER)}
    return points.sort_values(["scale", "quality"], key=lambda c: c.map(order) if c.name == "scale" else c,
                              ignore_index=True)


def _fit_row(task, metric, source, scale, model, fit: Fit | None, status: str) -> dict:
    row = {"task": task, "metric": metric, "source": source, "scale": scale, "model": model,
           "alpha": np.nan, "beta": np.nan, "c0": np.nan, "c1": np.nan, "c2": np.nan,
           "cc": np.nan, "rmse": np.nan, "cc_within_scales": np.nan, "points": 0, "zero_loss_points": 0,
           "status": status}
    if fit is not None:
        row.update(fit.params)
        row.update(cc=fit.cc, rmse=fit.rmse, points=fit.points)
    return row


def failed_fit_rows(task: str, metric: str, source: str, message: str):
    """The rows `fit_loss_rate` would give when there is nothing to fit at all (all-NaN loss)."""
    import pandas as pd

    return pd.DataFrame([_fit_row(task, metric, source, "all", model, None, f"error: {message}")
                         for model in ("cauchy", "quadratic")])


def _cauchy_status(fit: Fit) -> str:
    if not fit.params["beta"] > 0:
        return f"unusable: beta = {fit.params['beta']:.4g} <= 0 (loss does not fall as rate rises)"
    if not np.isfinite(fit.cc):
        return "flat: the fitted curve or the data is constant, CC undefined"
    return "ok"


def predict(row: dict, rate) -> np.ndarray:
    """A fitted model (a row of `fit_loss_rate`'s table) evaluated at `rate`."""
    r = np.asarray(rate, float)
    if row["model"] == "quadratic":
        return row["c0"] + row["c1"] * r + row["c2"] * r ** 2
    return row["alpha"] * r ** (-row["beta"])


def fit_loss_rate(points, scale_weights: dict[str, float] | None = None, cauchy_method: str = "lsq"):
    """Cauchy and quadratic fits per scale for one (task, metric, source) set of points, plus:

    - scale 'all': CC and RMSE of the per-scale fits over all points together (one number
      per model, as the paper's Table 1 gives);
    - scale 'pooled' (when `scale_weights` are given): one Cauchy pair for every scale,
      fitted to d_i / w_i (Eq. 3's d_i = w_i alpha R_i^-beta, so alpha and beta are
      weight-free); its CC and RMSE compare w_i alpha R^-beta with d_i, in loss units.

    The Cauchy fits use `cauchy_method` (see `fit_cauchy`). Degenerate data gives a row whose
    `status` names the reason (params NaN), never a silent NaN.
    """
    import pandas as pd

    task, metric, source = (points[c].iloc[0] for c in ("task", "metric", "source"))
    rows, observed, predicted = [], {"cauchy": [], "quadratic": []}, {"cauchy": [], "quadratic": []}
    for scale in ordered_scales(points["scale"].unique()):
        p = points[points["scale"] == scale]
        what = f"{task} {metric} ({source}) scale {scale}"
        cauchy = lambda rate, loss, what: fit_cauchy(rate, loss, what, method=cauchy_method)  # noqa: E731
        for model, fitter in (("cauchy", cauchy), ("quadratic", fit_quadratic)):
            try:
                fit = fitter(p["rate"], p["loss"], what=f"{what} {model}")
                if np.ptp(p["loss"].to_numpy(float)) == 0:
                    status = f"flat: loss is {p['loss'].iloc[0]:.4g} at every rate, CC undefined"
                elif model == "cauchy":
                    status = _cauchy_status(fit)
                else:
                    status = "ok" if np.isfinite(fit.cc) else "flat: the fitted curve is constant, CC undefined"
            except FitError as e:
                fit, status = None, f"error: {e}"
            rows.append(_fit_row(task, metric, source, scale, model, fit, status))
            if model == "cauchy":  # zero losses cannot enter the log-log fit (its start, for "lsq")
                rows[-1]["zero_loss_points"] = int((p["loss"] <= 0).sum())
            # Table 1 scores how well the form describes the data, so a fit with beta <= 0
            # (unusable by the allocation, flagged) still counts; a failed or flat one cannot.
            if fit is not None and np.isfinite(fit.cc):
                observed[model].append(p["loss"].to_numpy(float))
                predicted[model].append(predict(rows[-1], p["rate"]))
    scale_rows = pd.DataFrame(rows)
    n_all = points["scale"].nunique()
    for model in ("cauchy", "quadratic"):
        if not observed[model]:
            rows.append(_fit_row(task, metric, source, "all", model, None,
                                 f"error: {task} {metric} ({source}): no scale has a {model} fit"))
            continue
        y, pred = np.concatenate(observed[model]), np.concatenate(predicted[model])
        cc, rmse = _scores(y, pred)
        mine = scale_rows[scale_rows["model"] == model]
        problems = [f"scale {r.scale}: {r.status.split(':')[0]}" for r in mine.itertuples() if r.status != "ok"]
        status = "ok" if not problems else f"{len(problems)} of {n_all} scales not ok ({', '.join(problems)})"
        rows.append(_fit_row(task, metric, source, "all", model, Fit(model, {}, cc, rmse, int(y.size)), status))
        # CC over all points is dominated by the spread between scales; the mean CC within a
        # scale shows how well each curve follows its own points.
        rows[-1]["cc_within_scales"] = float(np.nanmean(mine["cc"])) if np.isfinite(mine["cc"]).any() else np.nan
    if scale_weights is not None:
        rows.append(_pooled_row(points, scale_weights, task, metric, source, cauchy_method))
    return pd.DataFrame(rows)


def _pooled_row(points, scale_weights, task, metric, source, method: str) -> dict:
    what = f"{task} {metric} ({source}) pooled over scales"
    w = points["scale"].map(lambda s: scale_weights.get(s, np.nan)).to_numpy(float)
    usable = np.isfinite(w) & (w > 0)
    if not usable.any():
        return _fit_row(task, metric, source, "pooled", "cauchy-pooled", None,
                        f"error: {what}: no scale has a positive mean MFIP weight")
    p, w = points[usable], w[usable]
    try:  # scored in loss units: the prediction for scale i is w_i alpha R^-beta
        fit = fit_cauchy(p["rate"], p["loss"], what=what, method=method, factor=w)
    except FitError as e:
        return _fit_row(task, metric, source, "pooled", "cauchy-pooled", None, f"error: {e}")
    status = _cauchy_status(fit)
    skipped = sorted(set(points["scale"]) - set(p["scale"]))
    if status == "ok" and skipped:
        status = f"partial: scales {skipped} have no positive mean weight and are left out"
    row = _fit_row(task, metric, source, "pooled", "cauchy-pooled", fit, status)
    row["zero_loss_points"] = int((p["loss"] <= 0).sum())
    return row


def per_image_fit_quality(table, fits, task: str, metric: str, source: str = "loss"):
    """How well the dataset-level per-scale Cauchy fit predicts single images (per-image
    rate and loss): CC and RMSE per scale. Single images are noisy (losses are 0 or a few
    AP steps), so this is a diagnostic, far below the dataset-level CC."""
    import pandas as pd

    column = loss_column(task, metric, source)
    rows = []
    for _, fit in fits[(fits["model"] == "cauchy") & (fits["status"] == "ok")
                       & fits["scale"].isin(SCALE_ORDER)].iterrows():
        t = table[(table["scale"].astype(str) == fit["scale"]) & np.isfinite(table[column].to_numpy(float))]
        if len(t) < 2:
            continue
        y = t[column].to_numpy(float) * 100.0
        pred = predict(fit.to_dict(), t["bits"].to_numpy(float) / t["scale_pixels"].to_numpy(float))
        cc, rmse = _scores(y, pred)
        rows.append({"task": task, "metric": metric, "source": source, "scale": fit["scale"],
                     "cc_images": cc, "rmse_images": rmse, "rows": len(t)})
    return pd.DataFrame(rows, columns=["task", "metric", "source", "scale", "cc_images", "rmse_images", "rows"])


def rate_phi_points(table):
    """Dataset-mean rate (bits per scale pixel, ratio of sums) per (scale, quality), with phi."""
    import pandas as pd

    _require(table, ["scale", "quality", "phi", "bits", "scale_pixels"], "rate-phi")
    phis_per_quality = table.groupby(["scale", "quality"])["phi"].nunique()
    if (phis_per_quality > 1).any():
        bad = phis_per_quality[phis_per_quality > 1].index.tolist()[:3]
        raise FitError(f"rate-phi: (scale, quality) {bad} carry more than one phi; the table mixes codec settings")
    g = table.groupby(["scale", "quality"], sort=False)
    points = pd.DataFrame({"phi": g["phi"].first(), "rate": g["bits"].sum() / g["scale_pixels"].sum(),
                           "images": g["image_id"].nunique()}).reset_index()
    points["scale"] = points["scale"].astype(str)
    order = {s: i for i, s in enumerate(SCALE_ORDER)}
    return points.sort_values(["scale", "quality"], key=lambda c: c.map(order) if c.name == "scale" else c,
                              ignore_index=True)


def fit_rate_phi_table(points):
    """R = a phi + b per scale (the paper's Table 2), and beside it R = a' log(phi) + b' as a
    diagnostic: log-spaced phis with a concave rate curve fit the log form far better."""
    import pandas as pd

    rows = []
    for scale in ordered_scales(points["scale"].unique()):
        p = points[points["scale"] == scale]
        row = {"scale": scale, "a": np.nan, "b": np.nan, "cc": np.nan, "rmse": np.nan, "nrmse": np.nan,
               "points": int(len(p)), "log_a": np.nan, "log_b": np.nan, "log_cc": np.nan, "log_rmse": np.nan,
               "status": "ok", "note": ""}
        what = f"rate-phi scale {scale}"
        try:
            fit = fit_rate_phi(p["phi"], p["rate"], what=what)
            row.update(a=fit.params["a"], b=fit.params["b"], cc=fit.cc, rmse=fit.rmse, points=fit.points,
                       nrmse=fit.rmse / float(p["rate"].mean()))
            if not fit.params["a"] > 0:
                row["status"] = f"unusable: slope a = {fit.params['a']:.4g} <= 0 (rate falls as phi rises)"
            elif not np.isfinite(fit.cc):
                row["status"] = "flat: rate constant over phi, CC undefined"
            # Usable, but worth knowing: a convex rate curve gives a line below zero at the low end.
            low = fit.params["a"] * float(p["phi"].min()) + fit.params["b"]
            if low <= 0:
                row["note"] = f"the line gives R = {low:.4g} <= 0 at the lowest phi {p['phi'].min():g}"
        except FitError as e:
            row["status"] = f"error: {e}"
        if (p["phi"] > 0).sum() >= 2:
            try:
                log_fit = fit_rate_phi(np.log(p["phi"].where(p["phi"] > 0)), p["rate"], what=f"{what} (log phi)")
                row.update(log_a=log_fit.params["a"], log_b=log_fit.params["b"], log_cc=log_fit.cc,
                           log_rmse=log_fit.rmse)
            except FitError:
                pass  # a diagnostic only: the linear fit's status already says what is wrong
        row["paper_cc"], row["paper_rmse"] = PAPER_TABLE2.get(scale, (np.nan, np.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    import pandas as pd

    # Pearson on average ranks is Spearman's rho (ties included), without scipy.
    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


def loss_oracle_correlation(table, tasks=None):
    """Per task and metric: Pearson and Spearman correlation between the encoder-side loss
    (against the lossless output) and the oracle (against annotations), over the rows where
    both are finite (one row per image, scale and quality)."""
    import pandas as pd

    rows = []
    for task in tasks or table_tasks(table):
        for metric in METRICS:
            lc, oc = loss_column(task, metric, "loss"), loss_column(task, metric, "oracle")
            row = {"task": task, "metric": metric, "n": 0, "pearson": np.nan, "spearman": np.nan, "status": "ok"}
            if lc not in table or oc not in table:
                row["status"] = f"missing: the table has no {oc if lc in table else lc} column"
                rows.append(row)
                continue
            x, y = table[lc].to_numpy(float), table[oc].to_numpy(float)
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            row["n"] = int(keep.sum())
            if row["n"] < 3:
                row["status"] = f"too few: {row['n']} rows with a finite loss and oracle (need 3)"
            elif np.ptp(x) == 0 or np.ptp(y) == 0:
                row["status"] = f"constant: the {'loss' if np.ptp(x) == 0 else 'oracle'} does not vary"
            else:
                row["pearson"] = float(np.corrcoef(x, y)[0, 1])
                row["spearman"] = _spearman(x, y)
                if not (np.isfinite(row["pearson"]) and np.isfinite(row["spearman"])):
                    row["status"] = "undefined: a correlation is not finite (near-constant data)"
            rows.append(row)
    return pd.DataFrame(rows)


def static_weights(weights, source: str = "loss", split: str | None = None):
    """The 'static' baseline: mean MFIP weight per (task, scale) over the split's images,
    renormalised to sum 1 per task. Degenerate images (all losses zero, uniform weights)
    are left out, since they carry no information about the scales; a task whose images are
    all degenerate gets uniform weights, flagged."""
    import pandas as pd

    _require(weights, ["image_id", "task", "source", "scale", "weight", "degenerate"], "static weights")
    w = weights[weights["source"] == source]
    if split is not None and "split" in w:
        w = w[w["split"] == split]
    rows = []
    for task, per_task in w.groupby("task", sort=True):
        scales = ordered_scales(per_task["scale"].unique())
        images = per_task["image_id"].nunique()
        informative = per_task[~per_task["degenerate"].astype(bool)]
        n_degenerate = images - informative["image_id"].nunique()
        if informative.empty:
            mean = pd.Series(1.0 / len(scales), index=scales)
            status = f"uniform: all {images} images have degenerate (all-zero) losses"
        else:
            mean = informative.groupby("scale")["weight"].mean().reindex(scales)
            status = "ok"
        mean = mean / mean.sum()
        for scale in scales:
            rows.append({"task": task, "source": source, "scale": scale, "weight": float(mean[scale]),
                         "images": int(images - n_degenerate), "degenerate_images": int(n_degenerate),
                         "status": status})
    if not rows:
        raise FitError(f"static weights: no MFIP weights with source {source!r}"
                       + (f" on split {split!r}" if split else ""))
    return pd.DataFrame(rows)


def size_bin(areas) -> str:
    """COCO size class of the median object area (pixels^2) of an image; 'none' if no objects."""
    a = np.asarray([x for x in areas if x is not None and np.isfinite(x)], float)
    if a.size == 0:
        return "none"
    median = float(np.median(a))
    return "small" if median < SMALL_AREA else "medium" if median < MEDIUM_AREA else "large"


def size_bins(annotations: dict[int, list[dict]]):
    """One row per image: its size bin from the median 'area' of its (non-crowd) annotations."""
    import pandas as pd

    rows = []
    for image_id, anns in annotations.items():
        areas = [float(a["area"]) for a in anns if not a.get("iscrowd", 0) and "area" in a]
        rows.append({"image_id": int(image_id), "size_bin": size_bin(areas), "objects": len(areas),
                     "median_area": float(np.median(areas)) if areas else np.nan})
    return pd.DataFrame(rows, columns=["image_id", "size_bin", "objects", "median_area"])


def weights_by_size(weights, bins):
    """Fig. 5: mean MFIP weight per (source, task, size bin, scale) with image counts, and per
    (source, task, bin) the centre of mass sum_i i * w_i over scale indices (0 = finest,
    4 = 'pool'): "small objects lean on fine scales" means a smaller centre for 'small'.
    Degenerate images (uniform weights) are left out and counted."""
    import pandas as pd

    _require(weights, ["image_id", "task", "source", "scale", "weight", "degenerate"], "Fig. 5")
    merged = weights.merge(bins[["image_id", "size_bin"]], on="image_id", how="left")
    merged["size_bin"] = merged["size_bin"].fillna("none")
    merged["scale"] = merged["scale"].astype(str)
    informative = merged[~merged["degenerate"].astype(bool)]
    keys = ["source", "task", "size_bin"]
    mean = (informative.groupby([*keys, "scale"])
            .agg(weight=("weight", "mean"), images=("image_id", "nunique")).reset_index())
    degenerate = (merged[merged["degenerate"].astype(bool)].groupby(keys)["image_id"].nunique()
                  .rename("degenerate_images"))
    mean = mean.merge(degenerate.reset_index(), on=keys, how="left").fillna({"degenerate_images": 0})
    mean["degenerate_images"] = mean["degenerate_images"].astype(int)
    index = {s: i for i, s in enumerate(SCALE_ORDER)}
    mean["scale_index"] = mean["scale"].map(index)
    centres = []
    for (source, task, b), g in mean.groupby(keys, sort=False):
        w = g["weight"].to_numpy(float)
        centres.append({"source": source, "task": task, "size_bin": b, "images": int(g["images"].max()),
                        "centre": float((g["scale_index"].to_numpy(float) * w).sum() / w.sum())})
    centre = pd.DataFrame(centres, columns=["source", "task", "size_bin", "images", "centre"])
    order = {b: i for i, b in enumerate(SIZE_BINS)}
    sort = lambda c: c.map(order) if c.name == "size_bin" else (c.map(index) if c.name == "scale" else c)  # noqa: E731
    return (mean.sort_values([*keys, "scale"], key=sort, ignore_index=True),
            centre.sort_values(keys, key=sort, ignore_index=True))


def size_trend(centre):
    """Per (source, task): centre of mass for small and large objects and whether
    small < large (fine scales for small objects); a missing bin is flagged, not guessed."""
    import pandas as pd

    rows = []
    for (source, task), g in centre.groupby(["source", "task"], sort=True):
        c = dict(zip(g["size_bin"], g["centre"]))
        row = {"source": source, "task": task, **{f"centre_{b}": c.get(b, np.nan) for b in SIZE_BINS}}
        if "small" in c and "large" in c:
            row["small_below_large"] = bool(c["small"] < c["large"])
            row["status"] = "ok"
        else:
            row["small_below_large"] = None
            row["status"] = "missing bin: " + ", ".join(b for b in ("small", "large") if b not in c)
        rows.append(row)
    return pd.DataFrame(rows)
