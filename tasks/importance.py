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
