"""MFIP importance weights from precoding losses (Liu et al., TOMM 2024, Sec. 3.2).

For one image, `losses[q, i]` is the task loss when only scale i is replaced by its decoded
version at quality q (all other scales lossless). Per quality the losses are normalised over
scales, then averaged over qualities, then normalised to sum 1:

- `sum` (default): loss_i / sum_j loss_j per quality, with a small floor so that no scale
  gets weight exactly 0 (a zero weight means R = 0 in the allocation's closed form);
- `minmax` (the authors' code): (loss_i - min) / (max - min) per quality, which sets the
  least-harmed scale to 0 at every quality.

An image whose losses are all zero (nothing it detects is hurt, or an empty reference) gets
uniform weights and is flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Importance:
    weights: np.ndarray  # (scales,), sums to 1
    degenerate: bool  # all losses zero: uniform weights


def mfip_weights(losses, mode: str = "sum", floor: float = 0.01) -> Importance:
    """losses: (qualities, scales) array of task losses in [0, 1]."""
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"losses must be a (qualities, scales) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("losses contain NaN or Inf")
    if mode not in ("sum", "minmax"):
        raise ValueError(f"mode must be 'sum' or 'minmax', got {mode!r}")
    n = x.shape[1]
    x = np.clip(x, 0.0, None)
    if not np.any(x > 0):
        return Importance(np.full(n, 1.0 / n), True)
    if mode == "sum":
        totals = x.sum(axis=1, keepdims=True)
        per_quality = np.where(totals > 0, x / np.where(totals > 0, totals, 1.0), 1.0 / n)
    else:
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        span = high - low
        per_quality = np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.0)
    d = per_quality.mean(axis=0)
    if mode == "sum":
        d = np.maximum(d, floor)
    if d.sum() <= 0:
        return Importance(np.full(n, 1.0 / n), True)
    return Importance(d / d.sum(), False)


def mfip_table(table, tasks, mode: str = "sum", floor: float = 0.01):
    """MFIP weights for every image of a precode table, per task, from the encoder-side loss
    and (labelled) from the oracle: one row per (image, task, source, scale).

    A (quality, scale) grid with a missing cell or a NaN oracle (the image has no annotation
    of that kind) gives uniform weights flagged `degenerate`, never NaN."""
    import pandas as pd

    from tasks.models.registry import SCALES

    rows = []
    if table.empty:
        return pd.DataFrame(columns=["image_id", "split", "task", "source", "scale", "weight", "degenerate"])
    for image_id, per_image in table.groupby("image_id", sort=True):
        split = per_image["split"].iloc[0]
        for task in tasks:
            for source in ("loss", "oracle"):
                column = f"{source}_{task}"
                if column not in per_image:
                    continue
                grid = per_image.pivot(index="quality", columns="scale", values=column)
                grid = grid[[s for s in SCALES if s in grid.columns]]
                values = grid.to_numpy(dtype=float)
                if np.isnan(values).any():
                    imp = Importance(np.full(values.shape[1], 1.0 / values.shape[1]), True)
                else:
                    imp = mfip_weights(values, mode=mode, floor=floor)
                for scale, w in zip(grid.columns, imp.weights):
                    rows.append({"image_id": int(image_id), "split": split, "task": task, "source": source,
                                 "scale": scale, "weight": float(w), "degenerate": imp.degenerate})
    return pd.DataFrame(rows)
