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


def _category_precision(gt_boxes, gt_crowd, dt_boxes, dt_scores) -> np.ndarray | None:
    """(T, R) interpolated precision of one category, or None where COCOeval leaves -1."""
    order = np.argsort(-dt_scores, kind="mergesort")[:MAX_DETS]
    dt_boxes, dt_scores = dt_boxes[order], dt_scores[order]
    gt_order = np.argsort(gt_crowd.astype(int), kind="mergesort")  # ignored (crowd) ground truth last
    gt_boxes, gt_crowd = gt_boxes[gt_order], gt_crowd[gt_order]
    n_gt_kept = int(np.count_nonzero(~gt_crowd))
    if n_gt_kept == 0:
        return None
    n_t, n_d, n_g = len(IOU_THRESHOLDS), len(dt_scores), len(gt_crowd)
    ious = _box_iou(dt_boxes, gt_boxes, gt_crowd) if n_d and n_g else np.zeros((n_d, n_g))
    matched = np.zeros((n_t, n_d), bool)
    ignored = np.zeros((n_t, n_d), bool)
    # COCOeval's greedy matching with the loops swapped (each threshold keeps its own taken
    # set, so the order does not matter): detections in score order, each at the thresholds
    # it can reach. Under a threshold, its best IoU matches nothing there or above, so those
    # are skipped (most of a weak pass's detections skip all ten).
    starts = [min(t, 1 - 1e-10) for t in IOU_THRESHOLDS]
    reachable = np.searchsorted(starts, ious.max(1) if n_g else np.zeros(n_d), side="right").tolist()
    crowd = gt_crowd.tolist()
    gt_taken = [[False] * n_g for _ in range(n_t)]
    for d, row in enumerate(ious.tolist()):
        for t in range(reachable[d]):
            taken = gt_taken[t]
            best, m = starts[t], -1
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
    tps = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fps = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    if n_d == 0:
        return np.zeros((n_t, len(RECALL_THRESHOLDS)))
    recall = tps / n_gt_kept
    # COCOeval's backward loop precision[i-1] = max(precision[i-1], precision[i]): the
    # running maximum from the end (max is exact, so the same floats)
    precision = np.maximum.accumulate((tps / (fps + tps + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
    # searchsorted(recall[t], RECALL_THRESHOLDS, 'left') for every t: the recalls under each
    # threshold, counted. A pick past the end gives 0: COCOeval fills q until the first one.
    picks = (recall[:, :, None] < RECALL_THRESHOLDS[None, None, :]).sum(1)
    return np.where(picks < n_d, np.take_along_axis(precision, np.minimum(picks, n_d - 1), 1), 0.0)


def bbox_ap_one_image(gt_annotations: list[dict], results: list[dict], category_ids) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.75) of one image's box results against its ground truth, as
    COCOeval's stats[0] and stats[2] for area 'all' (NaN where COCOeval gives -1).

    gt_annotations: COCO annotations (bbox xywh, category_id, optional iscrowd) of the image;
    results: COCO result dicts (bbox, category_id, score) in the order they were produced."""
    per_category = []
    for c in sorted(int(k) for k in category_ids):
        g = [a for a in gt_annotations if int(a["category_id"]) == c]
        d = [r for r in results if int(r["category_id"]) == c]
        if not g and not d:
            per_category.append(None)
            continue
        per_category.append(_category_precision(
            np.array([a["bbox"] for a in g], float).reshape(-1, 4),
            np.array([bool(a.get("iscrowd", 0)) for a in g], bool),
            np.array([r["bbox"] for r in d], float).reshape(-1, 4),
            np.array([r["score"] for r in d], float)))
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(per_category))
    precision = -np.ones(shape)
    for k, p in enumerate(per_category):
        if p is not None:
            precision[:, :, k] = p
    return _mean_valid(precision), _mean_valid(precision[_T75:_T75 + 1])


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else float("nan")
