"""Figures and the Markdown report of the fit stage (the paper's Fig. 5, 6, 7 and Tables 1, 2).

Pure functions of the tables `tasks.fitting` computes; matplotlib with the Agg backend (no
display). Units: rate is bits per pixel of the scale, loss is in mAP points (x100).
"""
from __future__ import annotations

import numpy as np

from tasks.fitting import METRICS, PAPER_TABLE1, SCALE_ORDER, SIZE_BINS, predict
from tasks.reporting import md_table as _md_table
from tasks.reporting import pyplot as _pyplot
from tasks.reporting import save_figure as _save


def md_table(frame, digits: int = 4) -> str:
    """The fit report's tables: four digits (CC values sit close to 1)."""
    return _md_table(frame, digits)


SCALE_COLOURS = {"0": "tab:blue", "1": "tab:orange", "2": "tab:green", "3": "tab:red", "pool": "tab:purple"}
BIN_COLOURS = {"small": "tab:cyan", "medium": "tab:olive", "large": "tab:brown", "none": "tab:gray"}






def plot_loss_rate(points, fits, path) -> str:
    """Fig. 6: loss against rate per scale, data points with the Cauchy (solid) and quadratic
    (dotted) fits; one panel per (task, metric). Log rate axis: the coarse scales run at far
    higher rates per scale pixel than the fine ones."""
    plt = _pyplot()
    panels = points[["task", "metric"]].drop_duplicates().itertuples(index=False)
    panels = list(panels)
    tasks = list(dict.fromkeys(p.task for p in panels))
    metrics = [m for m in METRICS if any(p.metric == m for p in panels)]
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(5.2 * len(metrics), 3.8 * len(tasks)),
                             squeeze=False, layout="constrained")
    for r, task in enumerate(tasks):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            pts = points[(points["task"] == task) & (points["metric"] == metric)]
            fit = fits[(fits["task"] == task) & (fits["metric"] == metric)]
            for scale in [s for s in SCALE_ORDER if s in set(pts["scale"])]:
                p = pts[pts["scale"] == scale]
                colour = SCALE_COLOURS[scale]
                ax.scatter(p["rate"], p["loss"], s=16, color=colour, label=f"scale {scale}")
                grid = np.geomspace(p["rate"].min(), p["rate"].max(), 60) if (p["rate"] > 0).all() else None
                if grid is None:
                    continue
                for model, style in (("cauchy", "-"), ("quadratic", ":")):
                    row = fit[(fit["scale"] == scale) & (fit["model"] == model)]
                    if row.empty or not np.isfinite(row.iloc[0]["cc"]):
                        continue
                    ax.plot(grid, predict(row.iloc[0].to_dict(), grid), style, color=colour, lw=1.2,
                            alpha=1.0 if row.iloc[0]["status"] == "ok" else 0.4)
            ax.set_xscale("log")
            ax.set_xlabel("rate R_i (bits per scale pixel)")
            ax.set_ylabel(f"loss (mAP@{'50:95' if metric == 'AP' else '75'} points)")
            ax.set_title(f"{task} {metric} ({pts['source'].iloc[0] if len(pts) else ''})")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, title="solid Cauchy, dotted quadratic", title_fontsize=7)
    fig.suptitle("Fig. 6: task loss vs rate per scale")
    return _save(fig, path)


def plot_rate_phi(points, fits, path) -> str:
    """Fig. 7: rate against phi per scale with the linear fit (solid) and the log-phi
    diagnostic (dashed); one panel per scale, since their rates differ by orders of magnitude."""
    plt = _pyplot()
    scales = [s for s in SCALE_ORDER if s in set(points["scale"])]
    fig, axes = plt.subplots(1, len(scales), figsize=(3.6 * len(scales), 3.4), squeeze=False,
                             layout="constrained")
    for ax, scale in zip(axes[0], scales):
        p = points[points["scale"] == scale]
        f = fits[fits["scale"] == scale].iloc[0]
        ax.scatter(p["phi"], p["rate"], s=16, color=SCALE_COLOURS[scale])
        grid = np.linspace(p["phi"].min(), p["phi"].max(), 60)
        if np.isfinite(f["a"]):
            ax.plot(grid, f["a"] * grid + f["b"], "-", color=SCALE_COLOURS[scale], lw=1.2,
                    label=f"linear CC {f['cc']:.4f}")
        if np.isfinite(f["log_a"]) and (grid > 0).all():
            ax.plot(grid, f["log_a"] * np.log(grid) + f["log_b"], "--", color="k", lw=1,
                    label=f"log(phi) CC {f['log_cc']:.4f}")
        ax.set_title(f"scale {scale}")
        ax.set_xlabel("phi")
        ax.set_ylabel("R (bits per scale pixel)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 7: rate vs phi per scale")
    return _save(fig, path)


def plot_weights_by_size(by_size, source: str, path) -> str:
    """Fig. 5: mean MFIP weight per scale, one bar per object-size bin; one panel per task."""
    plt = _pyplot()
    data = by_size[by_size["source"] == source]
    tasks = sorted(data["task"].unique())
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.6 * max(len(tasks), 1), 3.4),
                             squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        d = data[data["task"] == task]
        scales = [s for s in SCALE_ORDER if s in set(d["scale"])]
        bins = [b for b in SIZE_BINS if b in set(d["size_bin"])]
        width = 0.8 / max(len(bins), 1)
        for k, b in enumerate(bins):
            per_bin = d[d["size_bin"] == b].set_index("scale")["weight"].reindex(scales)
            n = int(d[d["size_bin"] == b]["images"].max())
            ax.bar(np.arange(len(scales)) + (k - (len(bins) - 1) / 2) * width, per_bin.to_numpy(float), width,
                   color=BIN_COLOURS[b], label=f"{b} (n={n})")
        ax.set_xticks(np.arange(len(scales)), scales)
        ax.set_xlabel("scale")
        ax.set_ylabel("mean MFIP weight")
        ax.set_title(f"{task} ({source})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Fig. 5: MFIP weight per scale by object size")
    return _save(fig, path)


# -- Markdown ---------------------------------------------------------------------------------




def table1(fits, loglog_fits=None):
    """The paper's Table 1 shape: CC and RMSE of the per-scale Cauchy and quadratic fits over
    all points, the pooled (weight-free) Cauchy beside them, and the paper's values; with
    `loglog_fits`, the Cauchy's CC and RMSE when fitted in log-log space instead."""
    import pandas as pd

    rows = []
    for (task, metric), f in fits.groupby(["task", "metric"], sort=False):
        loglog = None
        if loglog_fits is not None:
            ll = loglog_fits[(loglog_fits["task"] == task) & (loglog_fits["metric"] == metric)
                             & (loglog_fits["scale"] == "all") & (loglog_fits["model"] == "cauchy")]
            loglog = ll.iloc[0] if len(ll) else None
        def pick(scale, model):
            r = f[(f["scale"] == scale) & (f["model"] == model)]
            return r.iloc[0] if len(r) else None

        cauchy, quad, pooled = pick("all", "cauchy"), pick("all", "quadratic"), pick("pooled", "cauchy-pooled")
        paper_c, paper_q = PAPER_TABLE1[("cauchy", metric)], PAPER_TABLE1[("quadratic", metric)]
        notes = [f"{name}: {r['status']}" for name, r in (("cauchy", cauchy), ("quadratic", quad), ("pooled", pooled))
                 if r is not None and r["status"] != "ok"]
        rows.append({"task": task, "metric": metric,
                     "cauchy CC": cauchy["cc"] if cauchy is not None else np.nan,
                     "cauchy RMSE": cauchy["rmse"] if cauchy is not None else np.nan,
                     "cauchy CC within scales": cauchy["cc_within_scales"] if cauchy is not None else np.nan,
                     "quadratic CC": quad["cc"] if quad is not None else np.nan,
                     "quadratic RMSE": quad["rmse"] if quad is not None else np.nan,
                     "quadratic CC within scales": quad["cc_within_scales"] if quad is not None else np.nan,
                     "pooled CC": pooled["cc"] if pooled is not None else np.nan,
                     "pooled RMSE": pooled["rmse"] if pooled is not None else np.nan,
                     **({"cauchy log-log CC": loglog["cc"] if loglog is not None else np.nan,
                         "cauchy log-log RMSE": loglog["rmse"] if loglog is not None else np.nan}
                        if loglog_fits is not None else {}),
                     "paper cauchy CC/RMSE": f"{paper_c[0]} / {paper_c[1]}",
                     "paper quadratic CC/RMSE": f"{paper_q[0]} / {paper_q[1]}",
                     "notes": "; ".join(notes)})
    return pd.DataFrame(rows)


def per_scale_table(fits):
    """One row per (task, metric, scale): Cauchy alpha, beta, CC, RMSE and the quadratic's CC, RMSE."""
    import pandas as pd

    rows = []
    per_scale = fits[fits["scale"].isin(SCALE_ORDER)]
    for (task, metric, scale), f in per_scale.groupby(["task", "metric", "scale"], sort=False):
        c = f[f["model"] == "cauchy"].iloc[0]
        q = f[f["model"] == "quadratic"].iloc[0]
        status = c["status"] if c["status"] != "ok" else ("quadratic " + q["status"] if q["status"] != "ok" else "ok")
        rows.append({"task": task, "metric": metric, "scale": scale, "alpha": c["alpha"], "beta": c["beta"],
                     "cauchy CC": c["cc"], "cauchy RMSE": c["rmse"], "quadratic CC": q["cc"],
                     "quadratic RMSE": q["rmse"], "zero-loss points": int(c["zero_loss_points"]), "status": status})
    return pd.DataFrame(rows)


def report_markdown(info: dict, fits, rate_phi, correlation, by_size, trend, weights, image_quality=None,
                    loglog_fits=None) -> str:
    """The fit report: provenance, then the tables in the paper's order."""
    src = info["loss_source"]
    against = "encoder-side: vs the lossless output" if src == "loss" else "oracle: vs annotations"
    lines = [
        f"# Fit report {info['version']}",
        "",
        f"- precode table: `{info['precode_table']}` (sha256 {info['data_sha256'][:16]})",
        f"- split `{info['split']}`: {info['images']} images, {info['rows']} rows, scales {info['scales']}, "
        f"{info['qualities']} qualities",
        f"- loss source: `{src}` ({against}); "
        f"MFIP weights recomputed with importance mode `{info['importance_mode']}`, floor {info['importance_floor']}",
        "- units: rate R_i = bits / pixels of scale i (ratio of sums over the split); loss = 100 x (1 - AP) "
        "in mAP points; the paper's RMSEs are in the same loss unit, its rate-phi RMSEs in its own bpp "
        "(not comparable in absolute terms: see nRMSE)",
        f"- config digest {info['config_digest']}, code {info['code_version']}",
        "",
        "## Loss-rate model fit (paper Table 1)",
        "",
        "Cauchy d = alpha R^-beta (least squares in loss units, started from the log-log fit; `log-log`: the "
        "log-log least-squares fit alone) and quadratic d = c0 + c1 R + c2 R^2, fitted per scale; "
        "CC and RMSE over all (scale, quality) points (CC there is dominated by the spread between scales; "
        "`CC within scales` is the mean of the per-scale CCs). `pooled`: one (alpha, beta) for every scale, "
        "d_i = w_i alpha R_i^-beta with w_i the scale's mean MFIP weight (Eq. 3), fitted and scored in loss units. "
        "The paper's values are for detection on COCO val. The closed-form allocation needs the Cauchy form "
        "(beta > 0); the quadratic is the paper's comparison only.",
        "",
        md_table(table1(fits, loglog_fits)),
        "",
        "### Per scale",
        "",
        md_table(per_scale_table(fits)),
        "",
        "![Fig. 6](fig6_loss_rate.png)",
        "",
        "## Rate-phi model (paper Table 2)",
        "",
        "R_i = a_i phi + b_i per scale (R in bits per scale pixel, so RMSEs are not comparable with the paper's; "
        "nRMSE = RMSE / mean R). `log_*`: R = a' log(phi) + b', a diagnostic for log-spaced phis.",
        "",
        md_table(rate_phi[["scale", "a", "b", "cc", "rmse", "nrmse", "paper_cc", "paper_rmse", "log_cc",
                           "log_rmse", "points", "status", "note"]]),
        "",
        "![Fig. 7](fig7_rate_phi.png)",
        "",
        "## Encoder-side loss vs oracle",
        "",
        "Per (image, scale, quality) row of the split, where the oracle is finite.",
        "",
        md_table(correlation),
        "",
        "## MFIP weight by object size (Fig. 5)",
        "",
        "Size bin of an image: COCO thresholds (small < 32^2, medium < 96^2 px^2) on the median annotation "
        "area; `none`: no annotation. Degenerate images (all losses zero) are left out. Centre = sum_i i w_i "
        "with i = 0 for scale '0' ... 4 for 'pool': smaller means finer scales.",
        "",
    ]
    shown = by_size[by_size["source"] == src]
    if not shown.empty:
        pivot = shown.pivot_table(index=["task", "size_bin"], columns="scale", values="weight", sort=False)
        pivot = pivot[[s for s in SCALE_ORDER if s in pivot.columns]].reset_index()
        counts = shown.groupby(["task", "size_bin"], sort=False)["images"].max().rename("images").reset_index()
        pivot = pivot.merge(counts, on=["task", "size_bin"])
        lines += [md_table(pivot, 3), ""]
    lines += [md_table(trend, 3), "", "![Fig. 5](fig5_weights_by_size.png)", "",
              "## Static weights (mean MFIP weight on the split, sum 1 per task)", ""]
    if not weights.empty:
        pivot = weights.pivot_table(index=["task", "source"], columns="scale", values="weight", sort=False)
        pivot = pivot[[s for s in SCALE_ORDER if s in pivot.columns]].reset_index()
        extra = weights.groupby(["task", "source"], sort=False).agg(
            images=("images", "first"), degenerate=("degenerate_images", "first"),
            status=("status", "first")).reset_index()
        lines += [md_table(pivot.merge(extra, on=["task", "source"]), 4), ""]
    if image_quality is not None and not image_quality.empty:
        lines += ["## Per-image fit quality (diagnostic)", "",
                  "The dataset-level per-scale Cauchy fit against single images' (rate, loss): single-image "
                  "losses move in whole AP steps, so these are far below the dataset-level numbers.", "",
                  md_table(image_quality), ""]
    return "\n".join(lines) + "\n"
