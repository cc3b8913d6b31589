"""Per-scale sensitivity of a task model: AP by object size with one scale distorted at a time.

This is the paper's Fig. 1 measurement, and the check that the demo model is a fair testbed:
distorting a fine scale must hurt small objects, a coarse scale large ones. Distortion here is
uniform quantisation with a step of k standard deviations of that scale (per image), which
needs no codec; the codec issue adds the real codec at its lowest rate.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from tasks.evaluation.coco_eval import detections_to_coco, make_cocoeval, paired_bootstrap_delta, stats_dict
from tasks.models.registry import SCALES, TaskModel

AREAS = ("small", "medium", "large")


def quantise_scale(feats: "OrderedDict[str, torch.Tensor]", scale: str, step_std: float) -> "OrderedDict[str, torch.Tensor]":
    """Copy of feats with one scale rounded to a grid of step_std standard deviations (per image)."""
    out = OrderedDict(feats)
    x = feats[scale]
    std = x.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    step = step_std * std
    out[scale] = torch.round(x / step) * step
    return out


def sensitivity_table(
    model: TaskModel,
    images: list[torch.Tensor],
    image_ids: list[int],
    gt: dict,
    steps: Iterable[float] = (1.0, 3.0),
    scales: Iterable[str] = SCALES,
    iou_types: Iterable[str] = ("bbox",),
    batch_size: int = 8,
    n_boot: int = 200,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """One row per (iou_type, scale, step, area): AP, AP drop from lossless features, and a
    paired bootstrap 95% interval of the drop over test images (same resamples for both)."""
    steps, scales, iou_types = list(steps), list(scales), list(iou_types)
    variants = [("lossless", None, 0.0)] + [(f"{s}@{k}", s, k) for s in scales for k in steps]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for start in range(0, len(images), batch_size):
        feats, meta = model.features(images[start:start + batch_size])
        ids = image_ids[start:start + batch_size]
        for name, scale, k in variants:
            f = feats if scale is None else quantise_scale(feats, scale, k)
            for iid, det in zip(ids, model.heads(f, meta)):
                results[name] += detections_to_coco(iid, det, model.keypoint_category_ids)
        if progress:
            progress(f"sensitivity: {min(start + batch_size, len(images))}/{len(images)} images")
    rows = []
    for iou in iou_types:
        areas = AREAS if iou != "keypoints" else ("medium", "large")
        base = make_cocoeval(gt, results["lossless"], iou, image_ids=image_ids)
        base_stats = stats_dict(base)
        for name, scale, k in variants[1:]:
            ev = make_cocoeval(gt, results[name], iou, image_ids=image_ids)
            st = stats_dict(ev)
            for area in ("all",) + tuple(areas):
                key = {"all": "AP", "small": "APs", "medium": "APm", "large": "APl"}[area]
                delta = paired_bootstrap_delta(base, ev, n_boot=n_boot, seed=seed, area=area)
                rows.append({
                    "iou_type": iou, "scale": scale, "step_std": k, "area": area,
                    "ap_lossless": base_stats[key], "ap": st[key], "ap_drop": base_stats[key] - st[key],
                    "ap_drop_ci_low": float(np.nanpercentile(delta, 2.5)),
                    "ap_drop_ci_high": float(np.nanpercentile(delta, 97.5)),
                })
    return pd.DataFrame(rows)


def costliest_scale_by_area(table: pd.DataFrame, iou_type: str = "bbox", step_std: float = 3.0) -> pd.DataFrame:
    """For each size class, the scale whose distortion costs the most AP, with its interval."""
    t = table[(table.iou_type == iou_type) & (table.step_std == step_std) & (table.area != "all")]
    idx = t.groupby("area")["ap_drop"].idxmax()
    return t.loc[idx, ["area", "scale", "ap_drop", "ap_drop_ci_low", "ap_drop_ci_high"]].reset_index(drop=True)
