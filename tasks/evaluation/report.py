"""Evaluation report: RD points, BD-rates with paired image-bootstrap intervals, RD plots, Markdown.

Pure functions (no Prefect) of the table the evaluation stage writes, one row per
(image, method, rate point, pool mode) with the image's real stream bits and its COCO results.

- `score_points`: one row per (pool_mode, method, point): the three rate units, AP and AP75
  per task (x100) over all test images, and whether every test image is there;
- `ceiling`: AP and AP75 on uncoded features (the lossless ceiling);
- `bd_table`: BD-rate of every method against an anchor of the same pool mode (pchip, akima,
  cubic), the non-monotonic flag of `tasks.bdrate`, and a paired bootstrap 95% interval of the
  pchip value over test images;
- `rd_plots`: AP vs bpp_input per task and metric;
- `markdown_report`: the tables, the ceiling and the notes;
- `APResampler`: AP / AP75 of one COCOeval on many image resamples at once (the bootstrap's
  engine; also a compact stand-in for the COCOeval in `evals`).

`score_points` can run on any subset of the rows (one method, say, in a worker of its own):
concatenating the `points` frames and merging the `evals` dicts gives what one call would.

Rates are `bpp_input` (bits over input-image pixels, ratio of sums: the MPEG convention) for
every BD-rate; the other two units are reported beside it. A (method, point) that lacks some test
images is flagged `complete=False` and is left out of every BD-rate (and said so in `reason`):
its AP counts the missing images as having no detections and its rate leaves their bits out,
so it is not comparable with a complete point.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.bdrate import METHODS as BD_METHODS
from tasks.bdrate import bd_rate
from tasks.codecs.measure import rate_units
from tasks.reporting import md_cell as _cell
from tasks.reporting import md_table as _md_table
from tasks.reporting import pyplot as _pyplot
from tasks.reporting import save_figure as _save
from tasks.evaluation.coco_eval import (
    IOU_TYPES,
    _area_index,
    _bootstrap_indices,
    _check_evaluated,
    _load_gt,
    make_cocoeval,
    stats_dict,
)

METRICS = ("AP", "AP75")
RATE_UNITS = ("bpp_input", "bpp_input_mean", "bits_per_mosaic_pixel")
KEY = ("pool_mode", "method", "point")
REQUIRED_COLUMNS = ("image_id", "method", "point", "codec", "pool_mode", "bits", "mosaic_pixels", "input_pixels",
                    "detections")
POOL_STYLES = {"coded": "-", "derived": "--"}


# -- ground truth --------------------------------------------------------------------------

def _gt_per_task(gt, tasks: Sequence[str]) -> dict[str, COCO]:
    """One loaded COCO per task. `gt` is one COCO / COCO dict / path for every task, or a
    mapping {task: gt} (keypoint evaluation usually needs the person_keypoints file)."""
    for task in tasks:
        if task not in IOU_TYPES:
            raise ValueError(f"tasks must be among {IOU_TYPES}, got {task!r}")
    if isinstance(gt, Mapping) and not isinstance(gt, COCO) and "annotations" not in gt and "images" not in gt:
        lacking = [t for t in tasks if t not in gt]
        if lacking:
            raise ValueError(f"ground truth mapping has no entry for tasks {lacking}")
        loaded: dict[int, COCO] = {}
        out = {}
        for task in tasks:
            g = gt[task]
            out[task] = loaded.setdefault(id(g), _load_gt(g))
        return out
    coco = _load_gt(gt)
    return {task: coco for task in tasks}


def _check_image_ids(gts: Mapping[str, COCO], image_ids) -> list[int]:
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("image_ids is empty")
    for task, coco in gts.items():
        unknown = sorted(set(ids) - set(coco.getImgIds()))
        if unknown:
            raise ValueError(f"image ids not in the {task} ground truth: {unknown[:10]}")
    return ids


def _percent(stats: dict, name: str) -> float:
    v = stats.get(name, float("nan"))
    return 100.0 * v if math.isfinite(v) else float("nan")


# -- 1. RD points --------------------------------------------------------------------------

def _parse_results(rows: pd.DataFrame) -> list[dict]:
    results = []
    for image_id, text in zip(rows["image_id"], rows["detections"]):
        dets = json.loads(text) if isinstance(text, (str, bytes)) else list(text or [])
        for d in dets:
            if int(d["image_id"]) != int(image_id):
                raise ValueError(f"row of image {image_id} holds a result of image {d['image_id']}")
        results += dets
    return results


def _sum_parts(values) -> str:
    total: dict[str, int] = {}
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts = json.loads(v) if isinstance(v, (str, bytes)) else dict(v)
        for part, bits in parts.items():
            total[str(part)] = total.get(str(part), 0) + int(bits)
    return json.dumps(total, sort_keys=True)


def score_points(detections: pd.DataFrame, gt, tasks: Sequence[str], image_ids,
                 keypoint_sigmas=None, compact: bool = False) -> tuple[pd.DataFrame, dict]:
    """RD points and their COCOevals.

    Returns `(points, evals)`. `points` has one row per (pool_mode, method, point), sorted by
    pool mode, method (order of first appearance in `detections`) and point, with columns:
    codec, n_images, complete, missing_images (count), missing_image_ids (JSON list),
    bpp_input, bpp_input_mean, bits_per_mosaic_pixel (over the images present),
    bits (sum), bits_per_scale (JSON, summed over images), AP_<task> and AP75_<task> in percent
    over *all* `image_ids` (a missing image counts as one without detections), and
    image_bits / image_input_pixels: per-image lists in the order of sorted(image_ids), 0 for a
    missing image (what `bd_table`'s bootstrap resamples).
    `evals` maps (pool_mode, method, point, task) to the evaluated COCOeval, or with
    `compact=True` to an `APResampler` (all `bd_table` needs; a COCOeval holds ~16 MB of
    accumulate() arrays plus its evalImgs, which grow with the image count).
    `gt`: a COCO, a COCO-format dict or path, or a mapping {task: one of those}. Rows of images
    outside `image_ids` are ignored; two rows of one (image, method, point, pool_mode) raise.
    """
    tasks = list(tasks)
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in detections.columns]
    if missing_cols:
        raise ValueError(f"detections lacks columns {missing_cols}")
    gts = _gt_per_task(gt, tasks)
    ids = _check_image_ids(gts, image_ids)
    position = {iid: n for n, iid in enumerate(ids)}

    table = detections[detections["image_id"].astype(int).isin(position)].copy()
    table["image_id"] = table["image_id"].astype(int)
    table["point"] = table["point"].astype(int)
    dup = table.duplicated(["image_id", *KEY], keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        raise ValueError(f"{int(dup.sum())} duplicate rows, e.g. image {first['image_id']} of "
                         f"({first['pool_mode']}, {first['method']}, {first['point']})")

    rows, evals = [], {}
    for (pool_mode, method, point), g in table.groupby(list(KEY), sort=True):
        present = set(g["image_id"])
        missing = [i for i in ids if i not in present]
        image_bits = [0] * len(ids)
        image_pixels = [0] * len(ids)
        for iid, b, px in zip(g["image_id"], g["bits"], g["input_pixels"]):
            image_bits[position[iid]] = int(b)
            image_pixels[position[iid]] = int(px)
        row = {"pool_mode": pool_mode, "method": method, "point": int(point),
               "codec": "+".join(sorted({str(c) for c in g["codec"]})),
               "n_images": len(present), "complete": not missing, "missing_images": len(missing),
               "missing_image_ids": json.dumps(missing),
               **rate_units(g["bits"], g["input_pixels"], g["mosaic_pixels"]),
               "bits": int(g["bits"].sum()),
               "bits_per_scale": _sum_parts(g["bits_per_scale"]) if "bits_per_scale" in g else "{}"}
        results = _parse_results(g)
        for task in tasks:
            ev = make_cocoeval(gts[task], results, task, image_ids=ids, keypoint_sigmas=keypoint_sigmas)
            stats = stats_dict(ev)
            row[f"AP_{task}"] = _percent(stats, "AP")
            row[f"AP75_{task}"] = _percent(stats, "AP75")
            evals[(pool_mode, method, int(point), task)] = APResampler(ev) if compact else ev
        row["image_bits"] = image_bits
        row["image_input_pixels"] = image_pixels
        rows.append(row)
    points = pd.DataFrame(rows)
    if not points.empty:
        # Methods in their order of first appearance in `detections` (anchor first, usually).
        rank = {m: n for n, m in enumerate(dict.fromkeys(table["method"]))}
        points = (points.assign(_rank=points["method"].map(rank))
                  .sort_values(["pool_mode", "_rank", "point"], kind="stable")
                  .drop(columns="_rank").reset_index(drop=True))
    return points, evals


# -- 2. lossless ceiling -------------------------------------------------------------------

def ceiling(lossless_results: list[dict], gt, tasks: Sequence[str], image_ids, keypoint_sigmas=None) -> dict:
    """AP_<task> and AP75_<task> (percent) of the detections on uncoded features, over `image_ids`;
    `n_images` beside them. Results of other images are ignored."""
    tasks = list(tasks)
    gts = _gt_per_task(gt, tasks)
    ids = _check_image_ids(gts, image_ids)
    keep = set(ids)
    results = [r for r in lossless_results if int(r["image_id"]) in keep]
    out: dict = {"n_images": len(ids)}
    for task in tasks:
        stats = stats_dict(make_cocoeval(gts[task], results, task, image_ids=ids, keypoint_sigmas=keypoint_sigmas))
        out[f"AP_{task}"] = _percent(stats, "AP")
        out[f"AP75_{task}"] = _percent(stats, "AP75")
    return out


# -- fast paired resampling of COCOeval ----------------------------------------------------

class APResampler:
    """AP and AP75 of one evaluated COCOeval on many resamples of its images at once.

    Built from a COCOeval on which evaluate() has run; keeps only what the bootstrap needs
    (a small fraction of the COCOeval's memory), so `score_points(..., compact=True)` can
    store these instead of the COCOevals.

    Equivalent to COCOeval.accumulate() on the resampled evalImgs (what
    `coco_eval._resampled_ap` does one draw at a time), for area 'all' and the largest maxDets,
    but vectorised over draws: an image drawn c times weighs its detections and its non-ignored
    ground truths by c. Counting a detection c times in one place gives the same interpolated
    precision as c adjacent copies (a repeated true positive never lowers the precision
    envelope, a repeated false positive does not move recall). Only detections that are a true
    positive at some IoU threshold are kept as curve points: the precision envelope at a true
    positive is reached at a true positive, so the false positives between two kept detections
    only enter as a weighted count (sparse gaps x images matrices). The one difference from
    pycocotools: detections of *different* images with exactly equal scores are ordered by image
    id rather than by draw order (pycocotools' order among ties is arbitrary too).
    """

    def __init__(self, cocoeval: COCOeval, max_elements: int = 2_000_000):
        from scipy import sparse

        _check_evaluated(cocoeval)
        p = cocoeval._paramsEval
        self.image_ids = [int(i) for i in p.imgIds]
        self.iou_type = p.iouType
        self.n_images = n_images = len(p.imgIds)
        n_areas = len(p.areaRng)
        n_cats = len(p.catIds) if p.useCats else 1
        area = _area_index(cocoeval, "all")
        max_det = p.maxDets[-1]
        self.rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
        iou_thrs = np.asarray(p.iouThrs, dtype=np.float64)
        self.n_t = n_t = len(iou_thrs)
        self.n_r = len(self.rec_thrs)
        hit = np.nonzero(np.isclose(iou_thrs, 0.75))[0]
        self.t75 = int(hit[0]) if hit.size else None
        self.max_elements = max_elements

        npig = np.zeros((n_cats, n_images))
        tps, fps, imgs, seg_cat, lens = [], [], [], [], []
        # Skipped false positives, as (image, gap) pairs: false at every threshold, or per threshold.
        all_img, all_gap, one_img, one_t, one_gap = [], [], [], [], []
        n_kept = 0
        for k in range(n_cats):
            start = k * n_areas * n_images + area * n_images
            scores, tp_k, fp_k, img_k = [], [], [], []
            for i, e in enumerate(cocoeval.evalImgs[start:start + n_images]):
                if e is None:
                    continue
                gt_ignore = e["gtIgnore"]
                npig[k, i] = len(gt_ignore) - np.count_nonzero(gt_ignore)
                s = e["dtScores"][:max_det]
                if not len(s):
                    continue
                dtm = e["dtMatches"][:, :max_det]
                dtig = e["dtIgnore"][:, :max_det].astype(bool)
                scores.append(np.asarray(s, dtype=np.float64))
                tp_k.append((dtm != 0) & ~dtig)
                fp_k.append((dtm == 0) & ~dtig)
                img_k.append(np.full(len(s), i))
            if not scores:
                continue
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as accumulate() sorts
            tp = np.concatenate(tp_k, axis=1)[:, order]
            fp = np.concatenate(fp_k, axis=1)[:, order]
            img = np.concatenate(img_k)[order]
            kept = tp.any(axis=0)
            n = int(kept.sum())
            if not n:
                continue  # no true positive at any threshold: this category adds zero precision
            # A skipped detection counts in the gap before the next kept one; after the last, nowhere.
            gap = np.cumsum(kept) - kept
            skipped = ~kept & (gap < n)
            every = skipped & fp.all(axis=0)
            all_img.append(img[every])
            all_gap.append(n_kept + gap[every])
            some = np.nonzero(skipped & ~every)[0]
            for t in range(n_t):
                hits = some[fp[t, some]]
                one_img.append(img[hits])
                one_t.append(np.full(hits.size, t))
                one_gap.append(n_kept + gap[hits])
            tps.append(tp[:, kept])
            fps.append(fp[:, kept])
            imgs.append(img[kept])
            seg_cat.append(k)
            lens.append(n)
            n_kept += n
        self.npig = npig
        self.n_cats = n_cats
        self.n_det = n_kept
        self.seg_cat = np.asarray(seg_cat, dtype=np.int64)
        self.lens = np.asarray(lens, dtype=np.int64)
        if not n_kept:
            return
        self.starts = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        self.tp = np.concatenate(tps, axis=1)
        self.fp = np.concatenate(fps, axis=1)
        self.img = np.concatenate(imgs)
        seg = np.repeat(np.arange(len(lens)), self.lens)
        self.det_cat = self.seg_cat[seg]
        self.is_start = np.zeros(n_kept, dtype=bool)
        self.is_start[self.starts] = True
        rows, cols = np.concatenate(all_img), np.concatenate(all_gap)
        self.gaps_all = sparse.csr_matrix((np.ones(rows.size), (cols, rows)), shape=(n_kept, n_images))
        rows = np.concatenate(one_img) if one_img else np.zeros(0, np.int64)
        cols = (np.concatenate(one_t) * n_kept + np.concatenate(one_gap)) if one_img else np.zeros(0, np.int64)
        self.gaps_some = (sparse.csr_matrix((np.ones(rows.size), (cols, rows)), shape=(n_t * n_kept, n_images))
                          if rows.size else None)

    def ap(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AP and AP75 (fractions, NaN where no category has ground truth) for each row of
        `weights` (draws x images: how many times each image was drawn)."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if weights.shape[1] != self.n_images:
            raise ValueError(f"weights have {weights.shape[1]} images, the evaluation {self.n_images}")
        n_draws = weights.shape[0]
        sums = np.zeros((n_draws, self.n_t, self.n_cats))
        if self.n_det:
            chunk = max(1, self.max_elements // (self.n_t * self.n_det))
            for lo in range(0, n_draws, chunk):
                sums[lo:lo + chunk] = self._sums(weights[lo:lo + chunk])
        npig = weights @ self.npig.T  # draws x categories
        valid = npig > 0
        n_valid = valid.sum(axis=1)
        sums = np.where(valid[:, None, :], sums, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = sums.sum(axis=(1, 2)) / (self.n_t * self.n_r * n_valid)
            ap75 = (sums[:, self.t75, :].sum(axis=1) / (self.n_r * n_valid) if self.t75 is not None
                    else np.full(n_draws, np.nan))
        ap[n_valid == 0] = np.nan
        ap75[n_valid == 0] = np.nan
        return ap, ap75

    def _sums(self, weights: np.ndarray) -> np.ndarray:
        """Sum over recall thresholds of the interpolated precision: draws x IoU x categories."""
        n_draws = weights.shape[0]
        w = weights[:, self.img][:, None, :]  # draws x 1 x kept detections
        gap_fp = np.asarray(self.gaps_all @ weights.T).T[:, None, :]  # draws x 1 x kept
        if self.gaps_some is not None:
            gap_fp = gap_fp + np.asarray(self.gaps_some @ weights.T).T.reshape(n_draws, self.n_t, self.n_det)
        tp = np.cumsum(self.tp[None] * w, axis=2)
        fp = np.cumsum(self.fp[None] * w + gap_fp, axis=2)
        # Segmented cumulative sums: subtract the running total before each category's segment
        # (weighted counts are integers, so this is exact).
        before_tp = np.zeros(tp.shape[:2] + (len(self.starts),))
        before_fp = np.zeros_like(before_tp)
        before_tp[..., 1:] = tp[..., self.starts[1:] - 1]
        before_fp[..., 1:] = fp[..., self.starts[1:] - 1]
        tp -= np.repeat(before_tp, self.lens, axis=2)
        fp -= np.repeat(before_fp, self.lens, axis=2)

        npig = weights @ self.npig.T  # draws x categories
        denom = npig[:, self.det_cat]
        denom = np.where(denom > 0, denom, 1.0)[:, None, :]
        recall = tp / denom
        precision = tp / (tp + fp + np.spacing(1))
        # Precision envelope: running max from the right within each category; the offsets
        # (larger for earlier categories, precision is in [0, 1]) keep it from leaking across.
        offset = 2.0 * (len(self.lens) - 1 - np.repeat(np.arange(len(self.lens)), self.lens))
        envelope = np.maximum.accumulate((precision + offset)[..., ::-1], axis=2)[..., ::-1] - offset
        # Recall threshold r takes the envelope at the first detection whose recall >= r, so
        # detection d serves the thresholds in [j(d-1), j(d)) with j = #thresholds <= recall.
        j = np.searchsorted(self.rec_thrs, recall, side="right")
        prev = np.empty_like(j)
        prev[..., 1:] = j[..., :-1]
        prev[..., self.is_start] = 0
        per_seg = np.add.reduceat(envelope * (j - prev), self.starts, axis=2)
        out = np.zeros(per_seg.shape[:2] + (self.n_cats,))
        out[..., self.seg_cat] = per_seg
        return out


def _resampler(ev) -> APResampler:
    return ev if isinstance(ev, APResampler) else APResampler(ev)


def resampled_metrics(ev, counts: np.ndarray) -> dict[str, np.ndarray]:
    """{'AP', 'AP75'} in percent for each row of `counts` (draws x images, in the order of the
    evaluation's sorted image ids); `ev` is a COCOeval or an APResampler."""
    ap, ap75 = _resampler(ev).ap(counts)
    return {"AP": 100.0 * ap, "AP75": 100.0 * ap75}


# -- 3. BD-rate table ----------------------------------------------------------------------

def _eval_image_ids(ev) -> list[int]:
    return list(ev.image_ids) if isinstance(ev, APResampler) else [int(i) for i in ev._paramsEval.imgIds]


def _curve(frame: pd.DataFrame, column: str):
    return frame["bpp_input"].to_numpy(float), frame[column].to_numpy(float)


def bd_table(points: pd.DataFrame, evals: dict, tasks: Sequence[str], anchor: str = "uniform",
             n_boot: int = 100, seed: int = 0, anchors: Iterable[str] | None = None,
             methods: Iterable[str] | None = None, min_points: int = 4) -> pd.DataFrame:
    """BD-rate (%) on bpp_input of every method against an anchor of the same pool mode.

    One row per (anchor, pool_mode, method, task, metric) with: bd_pchip, ci_low, ci_high
    (paired bootstrap 95% percentile interval of the pchip value), n_boot, n_finite (draws that
    gave a finite value), bd_akima, bd_cubic, non_monotonic, dropped_anchor, dropped_test
    (points off the Pareto front, see `tasks.bdrate`), points_anchor, points_test (complete points
    used), excluded_points (incomplete points left out) and reason (why a value is NaN, and
    notes).

    Bootstrap: `n_boot` draws of the test images with replacement (seed `seed`), the same draw
    for every method, point and task, so anchor and test are paired. On a draw every point's
    AP / AP75 is recomputed from its COCOeval's evalImgs and its bpp_input is the ratio of sums
    of the drawn images' bits and pixels; the BD-rate then goes through the same
    non-monotonic rule. `anchors` (e.g. ['uniform', 'uniform-vbr-rgb']) replaces `anchor` to
    make the table against several anchors at once; `methods` limits the test methods.
    """
    tasks = list(tasks)
    anchors = [anchor] if anchors is None else list(anchors)
    known = set(points["method"])
    for a in anchors:
        if a not in known:
            raise ValueError(f"anchor {a!r} is not among the methods {sorted(known)}")
    wanted = None if methods is None else set(methods)

    image_ids = None
    counts = None
    if n_boot > 0:
        any_eval = next(iter(evals.values()), None)
        if any_eval is None:
            raise ValueError("bootstrap needs the evals from score_points")
        image_ids = _eval_image_ids(any_eval)
        counts = np.stack([np.bincount(d, minlength=len(image_ids))
                           for d in _bootstrap_indices(len(image_ids), n_boot, seed)]).astype(np.float64)

    boot_cache: dict[tuple, dict[str, np.ndarray]] = {}

    def boot_curve(frame: pd.DataFrame, task: str, metric: str):
        """draws x points: bpp_input and quality, for the (complete) points of `frame`."""
        rates, quals = [], []
        for row in frame.itertuples(index=False):
            key = (row.pool_mode, row.method, int(row.point), task)
            if key not in boot_cache:
                ev = evals.get(key)
                if ev is None:
                    raise KeyError(f"no COCOeval for {key}")
                if _eval_image_ids(ev) != image_ids:
                    raise ValueError(f"evaluation of {key} is over other images than the others: not paired")
                boot_cache[key] = resampled_metrics(ev, counts)
            bits = np.asarray(row.image_bits, dtype=np.float64)
            pixels = np.asarray(row.image_input_pixels, dtype=np.float64)
            rates.append((counts @ bits) / (counts @ pixels))
            quals.append(boot_cache[key][metric])
        return np.stack(rates, axis=1), np.stack(quals, axis=1)

    out = []
    for anchor_name in anchors:
        for pool_mode in sorted(set(points["pool_mode"])):
            pool = points[points["pool_mode"] == pool_mode]
            anchor_all = pool[pool["method"] == anchor_name].sort_values("point")
            anchor_pts = anchor_all[anchor_all["complete"]]
            for method in [m for m in dict.fromkeys(pool["method"]) if m != anchor_name]:
                if wanted is not None and method not in wanted:
                    continue
                test_all = pool[pool["method"] == method].sort_values("point")
                test_pts = test_all[test_all["complete"]]
                excluded = ([f"{anchor_name}:{p}" for p in anchor_all.loc[~anchor_all["complete"], "point"]]
                            + [f"{method}:{p}" for p in test_all.loc[~test_all["complete"], "point"]])
                notes = [f"incomplete points left out: {', '.join(excluded)}"] if excluded else []
                for task in tasks:
                    for metric in METRICS:
                        column = f"{metric}_{task}"
                        row = {"anchor": anchor_name, "pool_mode": pool_mode, "method": method, "task": task,
                               "metric": metric, "bd_pchip": float("nan"), "ci_low": float("nan"),
                               "ci_high": float("nan"), "n_boot": int(n_boot), "n_finite": 0,
                               "bd_akima": float("nan"), "bd_cubic": float("nan"), "non_monotonic": False,
                               "dropped_anchor": 0, "dropped_test": 0, "points_anchor": len(anchor_pts),
                               "points_test": len(test_pts), "excluded_points": ", ".join(excluded)}
                        if anchor_all.empty:
                            row["reason"] = "; ".join(notes + [f"anchor {anchor_name!r} has no {pool_mode} rows"])
                            out.append(row)
                            continue
                        ra, qa = _curve(anchor_pts, column)
                        rt, qt = _curve(test_pts, column)
                        reasons = []
                        for interp in BD_METHODS:
                            res = bd_rate(ra, qa, rt, qt, method=interp, min_points=min_points)
                            row[f"bd_{interp}"] = res.bd_rate_percent
                            if interp == "pchip":
                                row["non_monotonic"] = res.non_monotonic
                                row["dropped_anchor"], row["dropped_test"] = res.dropped_anchor, res.dropped_test
                            if res.reason:
                                reasons.append((interp, res.reason))
                        if reasons and len({r for _, r in reasons}) == 1:
                            notes_here = notes + [reasons[0][1]]
                        else:
                            notes_here = notes + [f"{i}: {r}" for i, r in reasons]
                        if n_boot > 0 and len(anchor_pts) and len(test_pts):
                            bra, bqa = boot_curve(anchor_pts, task, metric)
                            brt, bqt = boot_curve(test_pts, task, metric)
                            values = np.array([
                                bd_rate(bra[b], bqa[b], brt[b], bqt[b], method="pchip",
                                        min_points=min_points).bd_rate_percent
                                for b in range(n_boot)])
                            finite = values[np.isfinite(values)]
                            row["n_finite"] = int(finite.size)
                            if finite.size:
                                row["ci_low"], row["ci_high"] = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
                        row["reason"] = "; ".join(notes_here)
                        out.append(row)
    columns = ["anchor", "pool_mode", "method", "task", "metric", "bd_pchip", "ci_low", "ci_high", "n_boot",
               "n_finite", "bd_akima", "bd_cubic", "non_monotonic", "dropped_anchor", "dropped_test",
               "points_anchor", "points_test", "excluded_points", "reason"]
    return pd.DataFrame(out, columns=columns)


# -- 4. RD plots ---------------------------------------------------------------------------





def rd_plots(points: pd.DataFrame, ceiling: dict | None, tasks: Sequence[str], out_dir) -> list[str]:
    """One PNG per task and metric (`rd_<task>_<metric>.png` in `out_dir`, a path or URL):
    AP (percent) against bpp_input (log axis), one line per method and pool mode (solid coded,
    dashed derived), incomplete points as crosses off the lines, the lossless ceiling as a
    horizontal line. Returns the files written."""
    plt = _pyplot()
    methods = list(dict.fromkeys(points["method"])) if not points.empty else []
    colours = {m: plt.get_cmap("tab10")(n % 10) for n, m in enumerate(methods)}
    base = str(out_dir).rstrip("/")
    files = []
    for task in tasks:
        for metric in METRICS:
            column = f"{metric}_{task}"
            fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
            for (pool_mode, method), g in points.groupby(["pool_mode", "method"], sort=False):
                g = g.sort_values("point")
                style = POOL_STYLES.get(pool_mode, ":")
                ok = g[g["complete"] & np.isfinite(g[column]) & (g["bpp_input"] > 0)]
                ax.plot(ok["bpp_input"], ok[column], style, marker="o", ms=4, lw=1.4, color=colours[method],
                        label=f"{method} ({pool_mode})")
                bad = g[~g["complete"].astype(bool)]
                if not bad.empty:
                    ax.scatter(bad["bpp_input"], bad[column], marker="x", color=colours[method], s=30,
                               label=f"{method} ({pool_mode}) incomplete")
            ref = (ceiling or {}).get(column)
            if ref is not None and math.isfinite(ref):
                ax.axhline(ref, color="black", lw=1.0, ls="-.", label=f"lossless {ref:.2f}")
            if (points["bpp_input"] > 0).any():
                ax.set_xscale("log")
            ax.set_xlabel("rate (bits per input pixel, ratio of sums)")
            ax.set_ylabel(f"{task} {'mAP@50:95' if metric == 'AP' else 'mAP@75'} (%)")
            ax.set_title(f"{task} {metric} vs rate (solid: pool coded, dashed: pool derived)", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
            files.append(_save(fig, f"{base}/rd_{task}_{metric}.png"))
    return files


# -- 5. Markdown ---------------------------------------------------------------------------





def _bd_rule() -> str:
    import tasks.bdrate as bdrate

    doc = bdrate.__doc__ or ""
    start = doc.find("Rule:")
    if start < 0:
        return "see tasks/bdrate.py"
    return " ".join(doc[start:].split())


def _tasks_of(points: pd.DataFrame, ceiling: dict | None) -> list[str]:
    found = [c[len("AP_"):] for c in points.columns if c.startswith("AP_")]
    if not found and ceiling:
        found = [k[len("AP_"):] for k in ceiling if k.startswith("AP_")]
    return [t for t in IOU_TYPES if t in found] + [t for t in found if t not in IOU_TYPES]


def markdown_report(points: pd.DataFrame, bd: pd.DataFrame, ceiling: dict | None, meta: dict) -> str:
    """The evaluation report: provenance (`meta`, shown as a list), the RD table, the lossless
    ceiling, the BD-rate tables (one per anchor), the non-monotonic rule and incomplete rows."""
    tasks = _tasks_of(points, ceiling)
    title = meta.get("title", "Evaluation report")
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    lines += ["- rates: real stream bits (headers included); `bpp_input` = bits / input pixels as a ratio of sums "
              "over the images (MPEG convention, the BD-rate unit), `bpp_input_mean` = mean per image, "
              "`bits/mosaic px` = bits over coded mosaic pixels; AP in percent (COCO mAP@50:95, AP75 = mAP@75)",
              ""]

    lines += ["## Rate-accuracy points", ""]
    if points.empty:
        lines += ["_(none)_", ""]
    for pool_mode, g in points.groupby("pool_mode", sort=True):
        cols = ["method", "point", "codec", "bpp_input", "bpp_input_mean", "bits_per_mosaic_pixel", "n_images",
                "complete"] + [f"{m}_{t}" for t in tasks for m in METRICS if f"{m}_{t}" in g.columns]
        view = g[cols].rename(columns={"bits_per_mosaic_pixel": "bits/mosaic px"})
        lines += [f"### pool {pool_mode}", "", _md_table(view, 4), ""]

    lines += ["## Lossless ceiling (uncoded features)", ""]
    if ceiling:
        rows = [{"task": t, "AP": ceiling.get(f"AP_{t}", float("nan")), "AP75": ceiling.get(f"AP75_{t}", float("nan"))}
                for t in tasks]
        lines += [_md_table(pd.DataFrame(rows), 2), ""]
        if "n_images" in ceiling:
            lines += [f"over {ceiling['n_images']} images", ""]
    else:
        lines += ["_(not given)_", ""]

    lines += ["## BD-rate (bpp_input; negative = bits saved at equal accuracy)", ""]
    if bd is None or bd.empty:
        lines += ["_(none)_", ""]
    else:
        n_boot = int(bd["n_boot"].max())
        lines += [f"pchip (JCT-VC) with a paired bootstrap 95% interval over test images ({n_boot} draws, "
                  "percentiles of the finite draws; `finite` = how many), akima and cubic (VCEG-M33) beside it. "
                  "Each method is compared with the anchor of the same pool mode.", ""]
        for anchor_name, g in bd.groupby("anchor", sort=False):
            view = pd.DataFrame({
                "pool": g["pool_mode"], "method": g["method"], "task": g["task"], "metric": g["metric"],
                "pchip %": g["bd_pchip"],
                "95% CI": [f"[{_cell(lo, 2)}, {_cell(hi, 2)}]" if math.isfinite(v) else ""
                           for v, lo, hi in zip(g["bd_pchip"], g["ci_low"], g["ci_high"])],
                "finite": [f"{f}/{n}" for f, n in zip(g["n_finite"], g["n_boot"])],
                "akima %": g["bd_akima"], "cubic %": g["bd_cubic"],
                "non-monotonic": [("yes" if nm else "no") + (f" (dropped {da}+{dt})" if nm else "")
                                  for nm, da, dt in zip(g["non_monotonic"], g["dropped_anchor"], g["dropped_test"])],
                "notes": g["reason"],
            })
            lines += [f"### against `{anchor_name}`", "", _md_table(view, 2), ""]

    lines += ["## Notes", "",
              f"- Non-monotonic curves (tasks/bdrate.py): {_bd_rule()}",
              "- The bootstrap recomputes each rate point's AP/AP75 and bpp_input on every resample of the test "
              "images (the same resample for anchor and test), then the BD-rate with the same rule; draws whose "
              "BD-rate is NaN are left out of the interval, so an interval from few finite draws describes only "
              "the resamples on which both curves kept enough monotone points (the table shows none where the "
              "BD-rate itself is NaN; `bd_table` keeps it).", ""]
    incomplete = points[~points["complete"].astype(bool)] if not points.empty else points
    lines += ["## Incomplete rows", ""]
    if incomplete is None or incomplete.empty:
        lines += ["None: every (method, point) covers every test image.", ""]
    else:
        lines += ["These (method, point) rows lack some test images. They are left out of every BD-rate; their AP "
                  "counts the missing images as images without detections.", "",
                  _md_table(incomplete[["pool_mode", "method", "point", "n_images", "missing_images",
                                        "missing_image_ids"]]), ""]
    return "\n".join(lines)


# -- the main job's report: long BD table, where the bits go, timing, figures ---------------


def long_bdrate(bd: pd.DataFrame, codec_of: dict[str, str]) -> pd.DataFrame:
    """`bd_table` in the long layout of `bdrate.csv`: task, metric, codec, method, pool, anchor,
    interpolation, bd_rate_percent (pchip rows carry the bootstrap interval beside it)."""
    rows = []
    for r in bd.itertuples(index=False):
        for interp in ("pchip", "akima", "cubic"):
            rows.append({"task": r.task, "metric": r.metric, "codec": codec_of.get(r.method, ""),
                         "method": r.method, "pool": r.pool_mode, "anchor": r.anchor, "interpolation": interp,
                         "bd_rate_percent": getattr(r, f"bd_{interp}"),
                         "ci_low": r.ci_low if interp == "pchip" else float("nan"),
                         "ci_high": r.ci_high if interp == "pchip" else float("nan"),
                         "non_monotonic": r.non_monotonic, "note": r.reason})
    return pd.DataFrame(rows)


def bits_per_scale(detections: pd.DataFrame) -> pd.DataFrame:
    """Where the bits go: mean bits per image of every stream part, per method and rate point."""
    import json as _json

    rows = []
    for (pool, method, point), g in detections.groupby(["pool_mode", "method", "point"], sort=True):
        parts = pd.DataFrame([_json.loads(x) for x in g["bits_per_scale"]]).fillna(0)
        row = {"pool": pool, "method": method, "point": int(point), "images": len(g),
               "bits_total": float(g["bits"].mean())}
        row.update({f"bits_{k}": float(v) for k, v in parts.mean().items()})
        row.update({f"share_{k}": float(v) / row["bits_total"] for k, v in parts.mean().items()})
        rows.append(row)
    return pd.DataFrame(rows)


def timing_table(stage_seconds: dict[str, list[float]]) -> pd.DataFrame:
    """Per stage, seconds per image (or per coded image), like the paper's Table 6."""
    rows = []
    for stage, values in stage_seconds.items():
        v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
        rows.append({"stage": stage, "count": int(v.size),
                     "median_s": float(np.median(v)) if v.size else float("nan"),
                     "mean_s": float(v.mean()) if v.size else float("nan")})
    return pd.DataFrame(rows)


def sensitivity_plot(sensitivity_csv: str, out_dir, iou_type: str = "bbox") -> str | None:
    """Fig. 1: AP drop per scale and object size when one scale is perturbed (the task model's
    sensitivity table, at its strongest perturbation)."""
    import os

    if not os.path.exists(sensitivity_csv):
        return None
    table = pd.read_csv(sensitivity_csv)
    table = table[(table.iou_type == iou_type) & (table.step_std == table.step_std.max())]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    areas = [a for a in ("small", "medium", "large") if a in set(table.area)]
    scales = list(dict.fromkeys(table.scale.astype(str)))
    width = 0.8 / max(1, len(areas))
    for k, area in enumerate(areas):
        g = table[table.area == area].set_index(table.scale.astype(str)[table.area == area])
        x = np.arange(len(scales)) + k * width
        ax.bar(x, [100 * g.ap_drop.get(sc, np.nan) for sc in scales], width, label=area)
    ax.set_xticks(np.arange(len(scales)) + width * (len(areas) - 1) / 2, scales)
    ax.set_xlabel("perturbed scale")
    ax.set_ylabel(f"{iou_type} AP drop (points)")
    ax.set_title(f"Sensitivity per scale and object size (Fig. 1), noise {table.step_std.max():g} std")
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(str(out_dir), "fig1_sensitivity.png"))


def run_section(run: dict) -> str:
    """What was run on what: the first thing a reader needs."""
    return "\n".join(["## What was run", ""] + [f"- {k}: {v}" for k, v in run.items()] + [""])


def tail_sections(bits: pd.DataFrame, timing: pd.DataFrame, figures: dict[str, str], caveats: list[str]) -> str:
    """Where the bits go, time per stage, the figures, the caveats."""
    lines = ["## Where the bits go (mean bits per image per stream part)", "",
             _md_table(bits[[c for c in bits.columns if not c.startswith("share_")]], 1), "",
             "## Time per stage and image (median, this run's machine; like the paper's Table 6)", "",
             _md_table(timing, 4), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()] + [""]
    if caveats:
        lines += ["## Caveats", ""] + [f"- {c}" for c in caveats] + [""]
    return "\n".join(lines)


def skipped_section(skipped: dict[int, str], selected: int) -> str:
    """The test images left out, each with the reason the features stage recorded."""
    if not skipped:
        return ""
    rows = pd.DataFrame([{"image_id": i, "reason": why.replace("|", "/")} for i, why in sorted(skipped.items())])
    return "\n".join([f"## Skipped images ({len(skipped)} of {selected} selected test images)", "",
                      "Left out of every number above; the reason is what the features stage recorded.", "",
                      _md_table(rows, 0), ""])


def compose_report(body: str, run: dict, bits: pd.DataFrame, timing: pd.DataFrame, figures: dict[str, str],
                   caveats: list[str], skipped: dict[int, str] | None = None, selected: int = 0) -> str:
    """The page a person opens: title, what was run, the tables of `markdown_report`, the
    skipped images, then where the bits go, timing, figures and caveats."""
    title, _, rest = body.partition("\n")
    return "\n".join([title, "", run_section(run), rest.lstrip("\n"), skipped_section(skipped or {}, selected),
                      tail_sections(bits, timing, figures, caveats)])
