"""Evaluation report: RD points, BD-rate with the paired image bootstrap, plots and Markdown,
on a tiny synthetic ground truth with fabricated detections."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tasks.evaluation.coco_eval import _bootstrap_indices, _resampled_ap, _silenced, make_cocoeval
from tasks.evaluation.report import (
    APResampler,
    bd_table,
    ceiling,
    markdown_report,
    rd_plots,
    resampled_metrics,
    score_points,
)

N_IMAGES = 8
SIZE = 96
N_POINTS = 5
BASE_BITS = (4000, 9000, 20000, 45000, 100000)  # per image at each point, before the image's factor


def _square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def synthetic_gt() -> dict:
    """N_IMAGES 96x96 images, two boxes each; category 2 has 3 keypoints and its own OKS sigmas."""
    rng = np.random.default_rng(7)
    anns, next_id = [], 1
    for image_id in range(1, N_IMAGES + 1):
        for category_id in (1, 2):
            side = float(rng.integers(20, 40))
            x, y = (float(v) for v in rng.integers(2, SIZE - 42, 2))
            ann = {"id": next_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, side, side],
                   "area": side * side, "iscrowd": 0, "segmentation": _square(x, y, side)}
            if category_id == 2:
                ann["keypoints"] = [x + 3, y + 3, 2, x + side - 3, y + 3, 2, x + side / 2, y + side - 3, 2]
                ann["num_keypoints"] = 3
            anns.append(ann)
            next_id += 1
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in range(1, N_IMAGES + 1)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"},
                       {"id": 2, "name": "walker", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]],
                        "oks_sigmas": [0.05, 0.06, 0.07]}],
    }


@pytest.fixture(scope="module")
def gt() -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(synthetic_gt())
    with _silenced():
        coco.createIndex()
    return coco


def perfect_results(coco: COCO) -> list[dict]:
    out = []
    for n, ann in enumerate(coco.dataset["annotations"]):
        rle = coco.annToRLE(ann)
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        r = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
             "score": 1.0 - 0.001 * n, "segmentation": {"size": rle["size"], "counts": counts}}
        if "keypoints" in ann:
            r["keypoints"] = list(ann["keypoints"])
        out.append(r)
    return out


def shifted_results(coco: COCO, level: float, seed: int = 0) -> list[dict]:
    """Boxes moved by level x (a per-box random fraction of their side): more shift, lower AP.
    The per-box fractions are the same at every level, so AP rises steadily as level falls, on
    any subset of the images."""
    rng = np.random.default_rng(seed)
    out = []
    for ann in coco.dataset["annotations"]:
        frac = rng.uniform(0.1, 0.6)
        score = float(rng.uniform(0.2, 1.0))
        x, y, w, h = ann["bbox"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": [x + level * frac * w, y + level * frac * h / 2, w, h], "score": score})
    return out


def image_bits(point: int, image_id: int) -> int:
    return BASE_BITS[point] * (5 + image_id % 3)  # multiples of 5: exactly 0.8x is an integer


def table(coco: COCO, methods: dict, pool_modes=("coded",), drop=()) -> pd.DataFrame:
    """Rows of the evaluation table. methods: name -> (results_fn(point), bits_factor)."""
    rows = []
    for pool_mode in pool_modes:
        for method, (results_fn, factor) in methods.items():
            for point in range(N_POINTS):
                by_image: dict[int, list] = {}
                for r in results_fn(point):
                    by_image.setdefault(r["image_id"], []).append(r)
                for image_id in range(1, N_IMAGES + 1):
                    if (method, point, image_id) in drop:
                        continue
                    bits = int(round(image_bits(point, image_id) * factor))
                    rows.append({"image_id": image_id, "method": method, "point": point, "codec": "synthetic",
                                 "pool_mode": pool_mode, "bits": bits,
                                 "bits_per_scale": json.dumps({"0": bits // 2, "1": bits - bits // 2}),
                                 "mosaic_pixels": 64 * 64, "input_pixels": SIZE * SIZE,
                                 "detections": json.dumps(by_image.get(image_id, []))})
    return pd.DataFrame(rows)


IDS = list(range(1, N_IMAGES + 1))
LEVELS = (0.9, 0.6, 0.4, 0.2, 0.05)  # shift per rate point: quality rises with rate


def _ladder(coco, seed=0):
    return lambda p: shifted_results(coco, LEVELS[p], seed)


@pytest.fixture(scope="module")
def scored(gt):
    """uniform (anchor), better (same detections, 0.8x bits), and its incomplete / non-monotonic kin."""
    methods = {
        "uniform": (_ladder(gt), 1.0),
        "better": (_ladder(gt), 0.8),
        "holey": (_ladder(gt), 0.8),
        "wobbly": (lambda p: shifted_results(gt, (0.9, 0.3, 0.6, 0.2, 0.05)[p]), 0.9),  # point 2 loses accuracy
        "flat": (lambda p: shifted_results(gt, 0.3), 1.0),
    }
    det = table(gt, methods, pool_modes=("coded", "derived"), drop={("holey", 4, 3)})
    points, evals = score_points(det, gt, ["bbox"], IDS)
    return det, points, evals


# -- points --------------------------------------------------------------------------------

def test_perfect_detections_score_100(gt):
    det = table(gt, {"perfect": (lambda p: perfect_results(gt), 1.0)})
    points, evals = score_points(det, gt, ["bbox", "segm", "keypoints"], IDS)
    assert len(points) == N_POINTS and points["complete"].all()
    for task in ("bbox", "segm", "keypoints"):
        assert points[f"AP_{task}"].to_numpy() == pytest.approx(100.0)
        assert points[f"AP75_{task}"].to_numpy() == pytest.approx(100.0)
    row = points.iloc[0]
    assert row["bpp_input"] == pytest.approx(sum(image_bits(0, i) for i in IDS) / (N_IMAGES * SIZE * SIZE))
    assert row["bits_per_mosaic_pixel"] == pytest.approx(row["bits"] / (N_IMAGES * 64 * 64))
    assert json.loads(row["bits_per_scale"])["0"] == sum(image_bits(0, i) // 2 for i in IDS)
    assert set(evals) == {("coded", "perfect", p, t) for p in range(N_POINTS) for t in ("bbox", "segm", "keypoints")}
    top = ceiling(perfect_results(gt), gt, ["bbox", "segm", "keypoints"], IDS)
    assert top["AP_bbox"] == pytest.approx(100.0) and top["AP75_keypoints"] == pytest.approx(100.0)
    assert top["n_images"] == N_IMAGES


def test_gt_per_task_mapping_and_bad_input(gt):
    det = table(gt, {"perfect": (lambda p: perfect_results(gt), 1.0)})
    points, _ = score_points(det[det["point"] == 0], {"bbox": gt, "keypoints": synthetic_gt()}, ["bbox", "keypoints"],
                             IDS)
    assert points["AP_keypoints"].iloc[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="duplicate"):
        score_points(pd.concat([det, det.iloc[:1]]), gt, ["bbox"], IDS)
    with pytest.raises(ValueError, match="not in the bbox ground truth"):
        score_points(det, gt, ["bbox"], [1, 999])


def test_incomplete_rows_are_flagged_and_left_out(scored):
    _, points, evals = scored
    holey = points[points["method"] == "holey"].set_index(["pool_mode", "point"])
    assert not holey.loc[("coded", 4), "complete"]
    assert holey.loc[("coded", 4), "missing_images"] == 1
    assert json.loads(holey.loc[("coded", 4), "missing_image_ids"]) == [3]
    assert holey.loc[("coded", 4), "n_images"] == N_IMAGES - 1
    assert holey.drop(index=[("coded", 4), ("derived", 4)])["complete"].all()
    bd = bd_table(points, evals, ["bbox"], n_boot=20)
    row = bd[(bd["method"] == "holey") & (bd["pool_mode"] == "coded") & (bd["metric"] == "AP")].iloc[0]
    assert row["points_test"] == N_POINTS - 1 and row["excluded_points"] == "holey:4"
    assert "incomplete" in row["reason"]
    # The four complete points lie on 'better''s curve: about the same BD-rate (the end slope differs).
    assert row["bd_pchip"] == pytest.approx(-20.0, abs=2.0)
    md = markdown_report(points, bd, None, {"title": "t"})
    assert "## Incomplete rows" in md and "| coded | holey | 4 | 7 | 1 | [3] |" in md


# -- BD-rate -------------------------------------------------------------------------------

def test_twenty_percent_fewer_bits_gives_minus_twenty(scored):
    _, points, evals = scored
    uniform = points[(points["method"] == "uniform") & (points["pool_mode"] == "coded")]
    assert np.all(np.diff(uniform["AP_bbox"]) > 0) and np.all(np.diff(uniform["AP75_bbox"]) >= 0)
    bd = bd_table(points, evals, ["bbox"], n_boot=50)
    for metric in ("AP", "AP75"):
        row = bd[(bd["method"] == "better") & (bd["pool_mode"] == "coded") & (bd["metric"] == metric)].iloc[0]
        if metric == "AP":
            for col in ("bd_pchip", "bd_akima", "bd_cubic"):
                assert row[col] == pytest.approx(-20.0, abs=1e-6)
        if math.isfinite(row["bd_pchip"]):
            assert row["bd_pchip"] == pytest.approx(-20.0, abs=1e-6)
            assert row["ci_low"] <= row["bd_pchip"] + 1e-9 and row["ci_high"] >= row["bd_pchip"] - 1e-9
            assert 0 < row["n_finite"] <= 50
        assert row["anchor"] == "uniform" and row["n_boot"] == 50
    assert set(bd["pool_mode"]) == {"coded", "derived"}
    assert "uniform" not in set(bd["method"])


def test_noisy_rates_ci_contains_estimate(gt):
    """Per-image bit noise: the estimate moves off -20 and the paired interval still holds it."""
    det = table(gt, {"uniform": (_ladder(gt), 1.0), "better": (_ladder(gt), 0.8)})
    rng = np.random.default_rng(3)
    better = det["method"] == "better"
    det.loc[better, "bits"] = (det.loc[better, "bits"] * rng.uniform(0.8, 1.2, better.sum())).round().astype(int)
    points, evals = score_points(det, gt, ["bbox"], IDS)
    row = bd_table(points, evals, ["bbox"], n_boot=100).query("metric == 'AP'").iloc[0]
    assert -30 < row["bd_pchip"] < -10
    assert row["ci_low"] < row["bd_pchip"] < row["ci_high"]
    assert row["ci_high"] - row["ci_low"] > 0.1
    assert row["n_finite"] == 100


def test_non_monotonic_curves_are_flagged_never_crash(scored):
    _, points, evals = scored
    bd = bd_table(points, evals, ["bbox"], n_boot=20)
    wobbly = bd[(bd["method"] == "wobbly") & (bd["metric"] == "AP")]
    assert wobbly["non_monotonic"].all() and (wobbly["dropped_test"] >= 1).all()
    # 4 of 5 points are left on the front: a value with the flag; nothing raised.
    flat = bd[(bd["method"] == "flat")]
    assert flat["non_monotonic"].all() and flat["bd_pchip"].isna().all()
    assert flat["reason"].str.contains("fewer than 4 monotone points").all()
    assert (flat["n_finite"] == 0).all() and flat["ci_low"].isna().all()


def test_bootstrap_is_deterministic_for_a_seed(scored):
    _, points, evals = scored
    a = bd_table(points, evals, ["bbox"], n_boot=30, seed=5, methods=["wobbly"])
    b = bd_table(points, evals, ["bbox"], n_boot=30, seed=5, methods=["wobbly"])
    c = bd_table(points, evals, ["bbox"], n_boot=30, seed=6, methods=["wobbly"])
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["ci_low"].fillna(0), c["ci_low"].fillna(0)) or \
        not np.allclose(a["ci_high"].fillna(0), c["ci_high"].fillna(0))


def test_several_anchors_and_compact_evals(gt, scored):
    det, points, evals = scored
    bd = bd_table(points, evals, ["bbox"], anchors=["uniform", "better"], n_boot=10)
    assert set(bd["anchor"]) == {"uniform", "better"}
    vs_better = bd[(bd["anchor"] == "better") & (bd["method"] == "uniform") & (bd["metric"] == "AP")]
    assert vs_better["bd_pchip"].iloc[0] == pytest.approx(25.0, abs=1e-6)  # 1 / 0.8 - 1
    with pytest.raises(ValueError, match="anchor"):
        bd_table(points, evals, ["bbox"], anchor="nope", n_boot=0)
    small = det[det["method"].isin(["uniform", "wobbly"])]
    p1, e1 = score_points(small, gt, ["bbox"], IDS)
    p2, e2 = score_points(small, gt, ["bbox"], IDS, compact=True)
    assert all(isinstance(v, APResampler) for v in e2.values())
    reference = bd_table(p1, e1, ["bbox"], n_boot=15)
    pd.testing.assert_frame_equal(reference, bd_table(p2, e2, ["bbox"], n_boot=15))
    # Scoring one method per call and merging gives the same table.
    parts = [score_points(small[small["method"] == m], gt, ["bbox"], IDS, compact=True) for m in ("uniform", "wobbly")]
    merged = pd.concat([p for p, _ in parts], ignore_index=True)
    pd.testing.assert_frame_equal(reference, bd_table(merged, {**parts[0][1], **parts[1][1]}, ["bbox"], n_boot=15))


def test_resampler_matches_pycocotools_accumulate(gt):
    """The vectorised resampling equals COCOeval.accumulate() on the resampled evalImgs."""
    rng = np.random.default_rng(1)
    results = shifted_results(gt, 0.3, seed=2)
    for r in results[::3]:  # false positives and a few repeated scores
        results.append({**r, "bbox": [1.0, 1.0, 10.0, 10.0], "score": float(rng.uniform(0.0, 0.5))})
    results.append({**results[0], "score": results[1]["score"]})
    for iou_type in ("bbox", "segm"):
        if iou_type == "segm":
            for r in results:
                x, y, w, h = r["bbox"]
                rle = mask_utils.frPyObjects(_square(x, y, w), SIZE, SIZE)[0]
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        ev = make_cocoeval(gt, results, iou_type, IDS)
        draws = _bootstrap_indices(N_IMAGES, 40, 0)
        counts = np.stack([np.bincount(d, minlength=N_IMAGES) for d in draws])
        ours = resampled_metrics(ev, counts)
        ref_ap = np.array([_resampled_ap(ev, 0, d) for d in draws])
        np.testing.assert_allclose(ours["AP"], 100 * ref_ap, atol=1e-10)
        ref_ap75 = np.array([_reference_ap75(ev, d) for d in draws])
        np.testing.assert_allclose(ours["AP75"], 100 * ref_ap75, atol=1e-10)
        identity = resampled_metrics(ev, np.ones((1, N_IMAGES)))
        assert identity["AP"][0] == pytest.approx(100 * ev.stats[0], abs=1e-10)
        assert identity["AP75"][0] == pytest.approx(100 * ev.stats[2], abs=1e-10)


def _reference_ap75(ev, draw) -> float:
    src = ev._paramsEval
    n_images, n_areas = len(src.imgIds), len(src.areaRng)
    evaluated = []
    for k in range(len(src.catIds)):
        evaluated += [ev.evalImgs[k * n_areas * n_images + i] for i in draw]
    params = copy.copy(src)
    params.imgIds, params.areaRng, params.areaRngLbl = list(range(len(draw))), [src.areaRng[0]], ["all"]
    params.maxDets = [src.maxDets[-1]]
    view = copy.copy(ev)
    view.params, view._paramsEval, view.evalImgs = params, copy.copy(params), evaluated
    with _silenced():
        view.accumulate()
    t = int(np.nonzero(np.isclose(src.iouThrs, 0.75))[0][0])
    precision = view.eval["precision"][t, :, :, 0, 0]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


# -- plots and Markdown --------------------------------------------------------------------

def test_plots_and_markdown(tmp_path, scored, gt):
    _, points, evals = scored
    top = ceiling(perfect_results(gt), gt, ["bbox"], IDS)
    files = rd_plots(points, top, ["bbox"], tmp_path / "plots")
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["rd_bbox_AP.png", "rd_bbox_AP75.png"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    bd = bd_table(points, evals, ["bbox"], anchors=["uniform", "flat"], n_boot=10)
    md = markdown_report(points, bd, top, {"title": "Synthetic", "images": N_IMAGES})
    assert md.startswith("# Synthetic")
    assert "### against `uniform`" in md and "### against `flat`" in md
    assert "Pareto front" in md  # the non-monotonic rule is quoted
    assert "## Lossless ceiling" in md and "100.00" in md
    assert "| coded | better | bbox | AP | -20.00 | [-20.00, -20.00] | 10/10 |" in md
