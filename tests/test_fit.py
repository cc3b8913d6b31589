"""The fit stage: known answers on synthetic precode tables, degenerate inputs, Fig. 5 binning,
static weights, and the flow end to end (versioned folder, reuse, load_current_fit)."""
import json

import numpy as np
import pandas as pd
import pytest

from tasks.fitting import (FitError, fit_cauchy, fit_loss_rate, fit_rate_phi_table, loss_oracle_correlation,
                           loss_rate_points, rate_phi_points, size_bin, size_bins, size_trend, static_weights,
                           weights_by_size)

SCALES = ("0", "1", "2", "3", "pool")
PIXELS = {"0": 4096, "1": 1024, "2": 256, "3": 64, "pool": 16}
ALPHA = {"0": 40.0, "1": 25.0, "2": 18.0, "3": 12.0, "pool": 6.0}
BETA = {"0": 0.55, "1": 0.68, "2": 0.64, "3": 0.74, "pool": 0.74}
PHIS = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483)
RATE_A = {"0": 60.0, "1": 80.0, "2": 120.0, "3": 200.0, "pool": 300.0}  # R = a phi + b
RATE_B = {"0": 0.2, "1": 0.3, "2": 0.5, "3": 1.0, "pool": 2.0}


def power_law_table(image_ids=(1, 2, 3), weights=None, tasks=("bbox",)) -> pd.DataFrame:
    """Every image identical: R_i = a_i phi + b_i (to whole bits), loss = w_i alpha_i R^-beta_i / 100.
    With `weights` one (alpha, beta) pair (scale '0''s) holds for all scales (Eq. 3)."""
    rows = []
    for image_id in image_ids:
        for q, phi in enumerate(PHIS):
            for s in SCALES:
                bits = int(round((RATE_A[s] * phi + RATE_B[s]) * PIXELS[s]))
                rate = bits / PIXELS[s]  # the realised rate: bits are whole numbers
                if weights is None:
                    loss = ALPHA[s] * rate ** -BETA[s] / 100
                else:
                    loss = weights[s] * ALPHA["0"] * rate ** -BETA["0"] / 100
                row = {"image_id": image_id, "split": "calib", "scale": s, "quality": q, "phi": phi,
                       "bits": bits, "estimated_bits": float(bits),
                       "mosaic_pixels": PIXELS[s] * 25, "scale_pixels": PIXELS[s], "input_pixels": 65536,
                       "reference_empty": False, "pool_mode": "coded", "seconds_codec": 0.1, "seconds_heads": 0.1}
                for t in tasks:
                    row.update({f"loss_{t}": loss, f"loss75_{t}": 1.2 * loss, f"oracle_{t}": 0.8 * loss,
                                f"oracle75_{t}": loss, f"lossless_ap_{t}": 0.7, f"lossless_ap75_{t}": 0.8})
                rows.append(row)
    return pd.DataFrame(rows)


def weights_frame(per_image: dict[int, dict[str, float]], task="bbox", source="loss", degenerate=()):
    return pd.DataFrame([{"image_id": i, "split": "calib", "task": task, "source": source, "scale": s,
                          "weight": w, "degenerate": i in degenerate}
                         for i, ws in per_image.items() for s, w in ws.items()])


def _row(fits, scale, model):
    r = fits[(fits["scale"] == scale) & (fits["model"] == model)]
    assert len(r) == 1
    return r.iloc[0]


# -- loss-rate model ---------------------------------------------------------------------
def test_power_law_data_recovers_alpha_beta_per_scale():
    table = power_law_table()
    points = loss_rate_points(table, "bbox", "AP")
    assert len(points) == len(SCALES) * len(PHIS)
    # Rate is bits per pixel of that scale; loss is in mAP points.
    p0 = points[(points["scale"] == "0") & (points["quality"] == 0)].iloc[0]
    assert p0["rate"] == pytest.approx(RATE_A["0"] * PHIS[0] + RATE_B["0"], rel=1e-3)
    assert p0["loss"] == pytest.approx(ALPHA["0"] * p0["rate"] ** -BETA["0"], rel=1e-3)
    fits = fit_loss_rate(points)
    for s in SCALES:
        c = _row(fits, s, "cauchy")
        assert c["status"] == "ok"
        assert c["alpha"] == pytest.approx(ALPHA[s], rel=2e-3) and c["beta"] == pytest.approx(BETA[s], rel=2e-3)
        assert c["cc"] > 0.9999
    assert _row(fits, "all", "cauchy")["cc"] > 0.9999


def test_lsq_cauchy_minimises_rmse_in_loss_units():
    rng = np.random.default_rng(0)
    r = np.geomspace(2, 300, 8)
    d = 400 * r ** -1.2 + rng.normal(0, 0.3, r.size).clip(-0.5)
    d[-2:] = [0.05, 0.0]  # near-zero losses at high rate pull the log-log fit
    loglog, lsq = fit_cauchy(r, d, method="loglog"), fit_cauchy(r, d, method="lsq")
    assert lsq.rmse < loglog.rmse and lsq.params["beta"] > 0
    exact = fit_cauchy(r, 400 * r ** -1.2, method="lsq")
    assert exact.params["alpha"] == pytest.approx(400, rel=1e-6) and exact.params["beta"] == pytest.approx(1.2)
    # A known multiplier per point (Eq. 3's weight) is fitted around, not into alpha.
    w = np.linspace(0.1, 0.5, r.size)
    scaled = fit_cauchy(r, w * 30 * r ** -0.7, method="lsq", factor=w)
    assert scaled.params["alpha"] == pytest.approx(30, rel=1e-6) and scaled.rmse < 1e-9
    with pytest.raises(FitError, match="multipliers"):
        fit_cauchy(r, d, factor=np.zeros_like(r))
    with pytest.raises(FitError, match="unknown Cauchy fit method"):
        fit_cauchy(r, d, method="nls")


def test_quadratic_fits_power_law_data_worse_than_cauchy():
    fits = fit_loss_rate(loss_rate_points(power_law_table(), "bbox", "AP75"))
    cauchy, quad = _row(fits, "all", "cauchy"), _row(fits, "all", "quadratic")
    assert quad["status"] == "ok"
    assert quad["rmse"] > 10 * cauchy["rmse"] and quad["cc"] < cauchy["cc"]


def test_pooled_fit_divides_by_the_mean_weight_and_is_weight_free():
    w = {"0": 0.4, "1": 0.25, "2": 0.2, "3": 0.1, "pool": 0.05}
    table = power_law_table(weights=w)
    static = static_weights(weights_frame({1: w, 2: w, 3: w}))
    scale_weights = dict(zip(static["scale"], static["weight"]))
    fits = fit_loss_rate(loss_rate_points(table, "bbox", "AP"), scale_weights)
    pooled = _row(fits, "pooled", "cauchy-pooled")
    assert pooled["status"] == "ok"
    assert pooled["alpha"] == pytest.approx(ALPHA["0"], rel=2e-3)
    assert pooled["beta"] == pytest.approx(BETA["0"], rel=2e-3)
    assert pooled["cc"] > 0.9999 and pooled["points"] == len(SCALES) * len(PHIS)


def test_oracle_source_uses_oracle_columns_and_skips_nan_rows():
    table = power_law_table(image_ids=(1, 2))
    table.loc[table["image_id"] == 2, "oracle_bbox"] = np.nan  # image 2 has no annotation
    points = loss_rate_points(table, "bbox", "AP", source="oracle")
    assert (points["images"] == 1).all()
    fits = fit_loss_rate(points)
    assert _row(fits, "0", "cauchy")["alpha"] == pytest.approx(0.8 * ALPHA["0"], rel=2e-3)


# -- rate-phi model ----------------------------------------------------------------------
def test_rate_phi_recovers_a_and_b_per_scale():
    fits = fit_rate_phi_table(rate_phi_points(power_law_table()))
    assert list(fits["scale"]) == list(SCALES)
    for r in fits.itertuples():
        assert r.status == "ok"
        assert r.a == pytest.approx(RATE_A[r.scale], rel=2e-2) and r.b == pytest.approx(RATE_B[r.scale], rel=2e-2)
        assert r.cc > 0.9999 and r.log_cc < r.cc  # the linear data fits the linear form best
        assert r.paper_cc > 0.97


def test_rate_phi_notes_a_line_below_zero_on_a_convex_curve():
    points = pd.DataFrame({"scale": "0", "quality": range(4), "phi": [1.0, 2.0, 3.0, 4.0],
                           "rate": [1.0, 4.0, 9.0, 16.0], "images": 1})
    row = fit_rate_phi_table(points).iloc[0]
    assert row["status"] == "ok" and "<= 0 at the lowest phi 1" in row["note"]


def test_rate_phi_refuses_mixed_codec_settings():
    table = power_law_table()
    table.loc[0, "phi"] = 0.5
    with pytest.raises(FitError, match="more than one phi"):
        rate_phi_points(table)


# -- degenerate data: flagged with a reason, never a silent NaN -----------------------------
def test_one_quality_gives_error_rows_naming_task_metric_and_scale():
    table = power_law_table()
    fits = fit_loss_rate(loss_rate_points(table[table["quality"] == 0], "bbox", "AP75"))
    c = _row(fits, "2", "cauchy")
    assert c["status"].startswith("error") and "bbox AP75 (loss) scale 2" in c["status"]
    assert "need at least" in c["status"]
    assert _row(fits, "all", "cauchy")["status"].startswith("error")
    assert (fits.loc[~np.isfinite(fits["cc"]), "status"] != "ok").all()
    rp = fit_rate_phi_table(rate_phi_points(table[table["quality"] == 0]))
    assert rp["status"].str.contains("rate-phi scale").all()


def test_flat_and_rising_curves_are_flagged():
    table = power_law_table()
    table.loc[table["scale"] == "1", "loss_bbox"] = 0.3  # flat
    rising = table["scale"] == "3"
    table.loc[rising, "loss_bbox"] = table.loc[rising, "phi"]  # loss grows with rate
    fits = fit_loss_rate(loss_rate_points(table, "bbox", "AP"))
    assert _row(fits, "1", "cauchy")["status"].startswith("flat")
    assert _row(fits, "1", "quadratic")["status"].startswith("flat")
    assert _row(fits, "3", "cauchy")["status"].startswith("unusable: beta")
    assert _row(fits, "0", "cauchy")["status"] == "ok"
    overall = _row(fits, "all", "cauchy")
    assert "scale 1: flat" in overall["status"] and "scale 3: unusable" in overall["status"]
    assert (fits.loc[~np.isfinite(fits["cc"]), "status"] != "ok").all()


def test_zero_loss_scale_is_an_error_row_and_all_nan_raises():
    table = power_law_table()
    table.loc[table["scale"] == "pool", "loss_bbox"] = 1e-17  # float residue of a zero AP drop
    fits = fit_loss_rate(loss_rate_points(table, "bbox", "AP"))
    c = _row(fits, "pool", "cauchy")
    assert c["status"].startswith("error") and "positive rate and loss" in c["status"]
    assert c["zero_loss_points"] == len(PHIS)
    table["oracle_bbox"] = np.nan
    with pytest.raises(FitError, match="bbox AP \\(oracle\\).*no finite value"):
        loss_rate_points(table, "bbox", "AP", source="oracle")
    with pytest.raises(FitError, match="no column"):
        loss_rate_points(table, "segm", "AP")


# -- loss vs oracle ----------------------------------------------------------------------
def test_loss_oracle_correlation():
    table = power_law_table(image_ids=(1, 2))
    table.loc[table["image_id"] == 2, "oracle_bbox"] = np.nan
    corr = loss_oracle_correlation(table).set_index("metric")
    assert corr.loc["AP", "n"] == len(table) // 2
    assert corr.loc["AP", "pearson"] == pytest.approx(1.0) and corr.loc["AP", "spearman"] == pytest.approx(1.0)
    table["oracle75_bbox"] = 0.1
    assert loss_oracle_correlation(table).set_index("metric").loc["AP75", "status"].startswith("constant")


# -- Fig. 5 and static weights ------------------------------------------------------------
def test_size_bin_uses_the_median_area_and_coco_thresholds():
    assert size_bin([100, 200, 50000]) == "small"  # median 200 < 32^2 though one object is large
    assert size_bin([2000, 3000]) == "medium"
    assert size_bin([9216]) == "large"  # 96^2 is not medium
    assert size_bin([1023.9]) == "small" and size_bin([1024]) == "medium"
    assert size_bin([]) == "none"
    bins = size_bins({1: [{"area": 100.0}], 2: [{"area": 20000.0}, {"area": 100.0, "iscrowd": 1}], 3: []})
    assert dict(zip(bins["image_id"], bins["size_bin"])) == {1: "small", 2: "large", 3: "none"}


def test_fig5_centre_of_mass_small_below_large():
    fine = {"0": 0.6, "1": 0.2, "2": 0.1, "3": 0.05, "pool": 0.05}
    coarse = {"0": 0.05, "1": 0.05, "2": 0.1, "3": 0.4, "pool": 0.4}
    uniform = {s: 0.2 for s in SCALES}
    weights = weights_frame({1: fine, 2: fine, 3: coarse, 4: uniform, 5: uniform}, degenerate={5})
    bins = size_bins({1: [{"area": 100.0}], 2: [{"area": 300.0}], 3: [{"area": 20000.0}], 4: [], 5: [{"area": 50.0}]})
    by_size, centre = weights_by_size(weights, bins)
    small = by_size[by_size["size_bin"] == "small"].set_index("scale")
    assert small.loc["0", "weight"] == pytest.approx(0.6)  # image 5 is degenerate: left out
    assert small.loc["0", "images"] == 2 and small.loc["0", "degenerate_images"] == 1
    c = dict(zip(centre["size_bin"], centre["centre"]))
    assert c["small"] == pytest.approx(0.2 + 0.2 + 0.15 + 0.2) and c["none"] == pytest.approx(2.0)
    trend = size_trend(centre).iloc[0]
    assert trend["small_below_large"] and trend["status"] == "ok"
    no_large = size_trend(centre[centre["size_bin"] != "large"]).iloc[0]
    assert no_large["small_below_large"] is None and "large" in no_large["status"]


def test_static_weights_sum_to_one_and_skip_degenerate_images():
    a = {"0": 0.5, "1": 0.2, "2": 0.1, "3": 0.1, "pool": 0.1}
    b = {"0": 0.3, "1": 0.3, "2": 0.2, "3": 0.1, "pool": 0.1}
    frame = pd.concat([weights_frame({1: a, 2: b, 3: {s: 0.2 for s in SCALES}}, degenerate={3}),
                       weights_frame({1: a}, task="segm"),
                       weights_frame({1: {s: 0.2 for s in SCALES}}, task="keypoints", degenerate={1}),
                       weights_frame({1: b}, source="oracle")])
    static = static_weights(frame)
    assert set(static["source"]) == {"loss"}
    for task, g in static.groupby("task"):
        assert g["weight"].sum() == pytest.approx(1.0)
    bbox = static[static["task"] == "bbox"].set_index("scale")
    assert bbox.loc["0", "weight"] == pytest.approx(0.4) and bbox.loc["0", "degenerate_images"] == 1
    kp = static[static["task"] == "keypoints"]
    assert kp["status"].iloc[0].startswith("uniform") and np.allclose(kp["weight"], 0.2)
    with pytest.raises(FitError, match="no MFIP weights"):
        static_weights(frame, source="oracle", split="test")


# -- the flow ------------------------------------------------------------------------------
def test_fit_flow_writes_a_version_then_reuses_it(tmp_path, prefect_server):
    from flows.fit import FitStageError, fit_flow, load_current_fit
    from flows.precode import precode_table_url
    from mfiba.config import load_config
    from storage.results import PartTable
    from tasks.datasets.sources import open_split

    cfg = load_config("demo", [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                               "data.calib_count=3"])
    with pytest.raises(FitStageError, match="run `mfiba precode"):
        fit_flow(cfg.model_dump(mode="json"), "demo")
    with pytest.raises(FitStageError, match="run `mfiba fit"):
        load_current_fit(cfg)

    ids = sorted(open_split(cfg, "calib").image_ids)[:3]
    w = {"0": 0.4, "1": 0.25, "2": 0.2, "3": 0.1, "pool": 0.05}
    table = power_law_table(image_ids=ids, weights=w, tasks=("bbox", "segm", "keypoints"))
    table.loc[table["image_id"] == ids[0], "oracle_keypoints"] = np.nan
    parts = PartTable(precode_table_url(cfg), {"test": "fit-flow"})
    parts.write("all", table)
    parts.consolidate()

    summary = fit_flow(cfg.model_dump(mode="json"), "demo")
    folder = tmp_path / "run" / "fit" / summary["version"]
    assert summary["recomputed"] and summary["folder"] == str(folder)
    for name in ("fit.json", "report.md", "fig5_weights_by_size.png", "fig6_loss_rate.png", "fig7_rate_phi.png",
                 "loss_rate_fits.parquet", "loss_rate_fits.csv", "rate_phi_fits.csv", "static_weights.csv"):
        assert (folder / name).exists(), name
    assert json.loads((tmp_path / "run" / "fit" / "current.json").read_text())["version"] == summary["version"]
    assert (tmp_path / "run" / "manifests" / "fit.json").exists()
    doc = json.loads((folder / "fit.json").read_text())
    assert doc["data_sha256"] and doc["precode_identity"] == {"test": "fit-flow"} and doc["code_version"]
    assert summary["table1"]["bbox/AP"]["cauchy"]["cc"] > 0.9999
    assert "Table 1" in (folder / "report.md").read_text()

    again = fit_flow(cfg.model_dump(mode="json"), "demo")
    assert not again["recomputed"] and again["version"] == summary["version"]

    fit = load_current_fit(cfg)
    assert fit["version"] == summary["version"] and fit["scales"] == list(SCALES)
    # A run folder moved elsewhere reads its own fit, not the original's.
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    moved = load_current_fit(load_config("demo", [f"run_dir={tmp_path / 'moved'}", f"data.root={tmp_path / 'data'}"]))
    assert moved["folder"] == str(tmp_path / "moved" / "fit" / summary["version"])
    bbox = fit["tasks"]["bbox"]
    # The flow recomputes MFIP weights from the losses (not w: per quality they normalise
    # w_i R_i^-beta); the pooled pair is the pure fit with those mean weights.
    static = pd.read_parquet(folder / "static_weights.parquet")
    static = static[(static["task"] == "bbox") & (static["source"] == "loss")]
    expected = _row(fit_loss_rate(loss_rate_points(table, "bbox", "AP"), dict(zip(static["scale"], static["weight"]))),
                    "pooled", "cauchy-pooled")
    assert bbox["pooled"]["status"] == "ok"
    assert bbox["pooled"]["alpha"] == pytest.approx(expected["alpha"]) and bbox["pooled"]["beta"] > 0
    assert bbox["per_scale"]["1"]["beta"] == pytest.approx(BETA["0"], rel=2e-3)  # one beta for all (Eq. 3 data)
    assert sum(bbox["static_weights"].values()) == pytest.approx(1.0)
    assert bbox["rate_phi"]["2"]["a"] == pytest.approx(RATE_A["2"], rel=2e-2)
    assert set(bbox["per_scale"]) == set(SCALES)

    # Another fit setting is another version; the old one stays.
    cfg2 = cfg.model_copy(update={"fit": cfg.fit.model_copy(update={"loss_source": "oracle"})})
    other = fit_flow(cfg2.model_dump(mode="json"), "demo")
    assert other["version"] != summary["version"] and folder.exists()
    assert load_current_fit(cfg2)["loss_source"] == "oracle"

    # No rows of the fit split: a clear error.
    parts.write("all", table.assign(split="test"))
    parts.consolidate()
    with pytest.raises(FitStageError, match="no rows of split 'calib'"):
        fit_flow(cfg.model_dump(mode="json"), "demo")
