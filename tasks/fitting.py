"""Offline model fitting (Liu et al., TOMM 2024, Sec. 3.3, Tables 1 and 2).

- Task loss-rate model, Cauchy form: d = alpha * R^(-beta), fitted in log-log space
  (log d = log alpha - beta log R, least squares), against the quadratic model
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


def fit_cauchy(rate, loss, what: str = "loss-rate") -> Fit:
    r, d = _clean(rate, loss, what, 2)
    ok = (r > 0) & (d > 0)  # the log-log fit needs positive values
    if ok.sum() < 2:
        raise FitError(f"{what}: fewer than 2 points with positive rate and loss")
    slope, intercept = np.polyfit(np.log(r[ok]), np.log(d[ok]), 1)
    alpha, beta = float(np.exp(intercept)), float(-slope)
    cc, rmse = _scores(d, alpha * r ** (-beta))
    return Fit("cauchy", {"alpha": alpha, "beta": beta}, cc, rmse, int(r.size))


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
