"""Box AP of one image, bit for bit what pycocotools' COCOeval reports, without building two
COCO indexes per call.

Precoding scores m x (scales) head passes per image against one reference; COCOeval costs
about 10 ms a call in index building and Python bookkeeping, more than the heads of a pass.
This is the same algorithm for the one case those passes need (one image, boxes, area range
'all', maxDets 100): detections sorted by score (stable), greedy matching per IoU threshold
in COCOeval's order with its crowd and ignore rules, 101-point interpolated precision, and
the mean over the same (IoU, recall, category) array. Equality with COCOeval is tested on
random cases (ties, crowds, empty sides, more than 100 detections).
"""
from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = 100
_T75 = int(np.where(IOU_THRESHOLDS == 0.75)[0][0])


def _box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskUtils.iou for xywh boxes (its bbIou, same float64 arithmetic): a crowd ground
    truth's union is the detection's own area."""
    dx, dy, dw, dh = (dt[:, k:k + 1] for k in range(4))
    gx, gy, gw, gh = (gt[None, :, k] for k in range(4))
    w = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    h = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    inter = w * h
    union = np.where(crowd[None, :], np.broadcast_to(dw * dh, inter.shape), dw * dh + gw * gh - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w <= 0) | (h <= 0), 0.0, iou)


def _greedy_matches(ious: np.ndarray, gt_crowd: np.ndarray, reachable: list[int], matched: np.ndarray,
                    ignored: np.ndarray) -> None:
    """COCOeval's greedy matching of one category, with the loops swapped (each threshold
    keeps its own taken set, so the order does not matter): detections (rows of `ious`) in
    score order, each at the thresholds it can reach (`reachable[d]`: under a threshold, its
    best IoU matches nothing there or above, so most of a weak pass's detections skip all
    ten). Ground truth columns: not ignored first. Fills `matched` and `ignored` (T, D)."""
    n_g = len(gt_crowd)
    crowd = gt_crowd.tolist()
    gt_taken = [[False] * n_g for _ in range(len(IOU_THRESHOLDS))]
    for d, row in enumerate(ious.tolist()):
        for t in range(reachable[d]):
            taken = gt_taken[t]
            best, m = _STARTS[t], -1
            for g in range(n_g):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:
                    break
                if row[g] < best:
                    continue
                best, m = row[g], g
            if m == -1:
                continue
            ignored[t, d], matched[t, d], taken[m] = crowd[m], True, True


_STARTS = [min(t, 1 - 1e-10) for t in IOU_THRESHOLDS]


def bbox_ap_one_image(gt_annotations: list[dict], results: list[dict], category_ids) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.75) of one image's box results against its ground truth, as
    COCOeval's stats[0] and stats[2] for area 'all' (NaN where COCOeval gives -1).

    gt_annotations: COCO annotations (bbox xywh, category_id, optional iscrowd) of the image;
    results: COCO result dicts (bbox, category_id, score) in the order they were produced.

    All categories at once (precoding scores m x scales passes per image, each with a few
    objects in several categories: per-category array work cost more than the matching):
    per category, detections sorted by score (stable) and cut at maxDets, ground truth with
    the ignored (crowd) last, then one (category, threshold, detection) array, padded."""
    categories = sorted(int(k) for k in category_ids)
    index = {c: k for k, c in enumerate(categories)}
    n_cat, n_t = len(categories), len(IOU_THRESHOLDS)
    gt = [(index[int(a["category_id"])], bool(a.get("iscrowd", 0)), a["bbox"]) for a in gt_annotations
          if int(a["category_id"]) in index]
    dt = [(index[int(r["category_id"])], r["score"], r["bbox"]) for r in results if int(r["category_id"]) in index]
    gt_cat = np.array([g[0] for g in gt], int)
    gt_crowd = np.array([g[1] for g in gt], bool)
    gt_order = np.lexsort((gt_crowd, gt_cat))  # by category, not ignored first, stable
    gt_cat, gt_crowd = gt_cat[gt_order], gt_crowd[gt_order]
    gt_boxes = np.array([g[2] for g in gt], float).reshape(-1, 4)[gt_order]
    gt_start = np.searchsorted(gt_cat, np.arange(n_cat + 1))  # category k's columns: gt_start[k]:gt_start[k + 1]
    n_gt_kept = np.bincount(gt_cat[~gt_crowd], minlength=n_cat)
    dt_cat = np.array([d[0] for d in dt], int)
    dt_scores = np.array([d[1] for d in dt], float)
    order = np.lexsort((-dt_scores, dt_cat))  # by category, then score descending, stable
    dt_cat = dt_cat[order]
    rank = np.arange(len(order)) - np.searchsorted(dt_cat, dt_cat)  # position within the category
    order, dt_cat, rank = order[rank < MAX_DETS], dt_cat[rank < MAX_DETS], rank[rank < MAX_DETS]
    dt_boxes = np.array([d[2] for d in dt], float).reshape(-1, 4)[order]
    n_dt = np.bincount(dt_cat, minlength=n_cat)
    d_max = int(n_dt.max(initial=0))

    matched = np.zeros((n_cat, n_t, d_max), bool)
    ignored = np.zeros((n_cat, n_t, d_max), bool)
    if len(dt_cat) and len(gt_cat):
        ious = _box_iou(dt_boxes, gt_boxes, gt_crowd)
        same = dt_cat[:, None] == gt_cat[None, :]
        best = np.where(same, ious, 0.0).max(1)
        reachable = np.searchsorted(_STARTS, best, side="right")
        dt_start = np.searchsorted(dt_cat, np.arange(n_cat + 1))
        for k in np.flatnonzero((n_dt > 0) & (gt_start[1:] > gt_start[:-1])).tolist():
            rows, cols = slice(dt_start[k], dt_start[k + 1]), slice(gt_start[k], gt_start[k + 1])
            _greedy_matches(ious[rows, cols], gt_crowd[cols], reachable[rows].tolist(), matched[k], ignored[k])
    padding = np.arange(d_max)[None, None, :] >= n_dt[:, None, None]  # past a category's detections
    tps = np.cumsum(matched & ~ignored, axis=2).astype(float)
    fps = np.cumsum(~matched & ~ignored & ~padding, axis=2).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(padding, np.inf, tps / n_gt_kept[:, None, None])
    # COCOeval's backward loop precision[i-1] = max(precision[i-1], precision[i]): the
    # running maximum from the end (max is exact, so the same floats; padding adds zeros)
    precision = np.where(padding, 0.0, tps / (fps + tps + np.spacing(1)))
    precision = np.maximum.accumulate(precision[:, :, ::-1], axis=2)[:, :, ::-1]
    # searchsorted(recall[t], RECALL_THRESHOLDS, 'left') for every t: the recalls under each
    # threshold, counted. A pick past the end gives 0: COCOeval fills q until the first one.
    picks = (recall[:, :, :, None] < RECALL_THRESHOLDS).sum(2)  # (K, T, R)
    if d_max:
        values = np.take_along_axis(precision, np.minimum(picks, np.maximum(n_dt - 1, 0)[:, None, None]), 2)
    else:
        values = np.zeros(picks.shape)
    per_category = np.where(picks < n_dt[:, None, None], values, 0.0)
    # -1 (left out of the mean) where COCOeval has no precision: no ground truth kept
    per_category[n_gt_kept == 0] = -1.0
    precision = np.ascontiguousarray(per_category.transpose(1, 2, 0))  # COCOeval's (T, R, K) order
    return _mean_valid(precision), _mean_valid(precision[_T75:_T75 + 1])


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else float("nan")
