"""MFIBA bit allocation (Liu et al., TOMM 2024, Eq. 3-6), as pure functions.

Per image, minimise  J = sum_i w_i * alpha_i * R_i^(-beta_i) + lambda' * sum_i R_i / div_i
where R_i is the rate of scale i per pixel *of that scale* and div_i = S_0 / pixels_i
(k^i = 4^i for an FPN, the paper; the authors' code uses 1, 4, 16, 60, 60). Setting the
derivative to zero gives the closed form

    R_i = (w_i * alpha_i * beta_i * div_i / lambda') ** (1 / (beta_i + 1)).

Units (REFERENCE.md, 'Units'): the total bits are sum_i R_i * pixels_i, which is what a
budget constrains. A scale with zero weight gets the codec's lowest rate, never no bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_DIVISORS = (1.0, 4.0, 16.0, 64.0, 256.0)  # k^i with k = 4, 'pool' as i = 4
AUTHORS_DIVISORS = (1.0, 4.0, 16.0, 60.0, 60.0)  # the authors' code ('pool' as '3')


@dataclass(frozen=True)
class LossRateModel:
    """d_i = w_i * alpha_i * R_i^(-beta_i), one (alpha, beta) per scale (or one pooled pair)."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]

    def __post_init__(self):
        a, b = np.asarray(self.alpha, float), np.asarray(self.beta, float)
        if a.shape != b.shape or np.any(a <= 0) or np.any(b <= 0) or not np.all(np.isfinite(a * b)):
            raise ValueError(f"loss-rate model needs positive finite alpha and beta of one length, "
                             f"got alpha={self.alpha}, beta={self.beta}")


@dataclass(frozen=True)
class Allocation:
    rates: np.ndarray  # R_i, bits per pixel of scale i
    bits: np.ndarray  # R_i * pixels_i
    lambda_prime: float
    clamped: np.ndarray  # True where the closed form was clamped to [r_min, r_max]

    @property
    def total_bits(self) -> float:
        return float(self.bits.sum())


def _check(weights, model: LossRateModel, pixels, divisors):
    w = np.asarray(weights, float)
    n = len(w)
    alpha = np.broadcast_to(np.asarray(model.alpha, float), (n,)) if len(model.alpha) in (1, n) else None
    if alpha is None:
        raise ValueError(f"loss-rate model has {len(model.alpha)} scales, weights have {n}")
    beta = np.broadcast_to(np.asarray(model.beta, float), (n,))
    px = np.asarray(pixels, float)
    div = np.asarray(divisors, float)
    if px.shape != (n,) or div.shape != (n,):
        raise ValueError(f"pixels {px.shape} and divisors {div.shape} must have one entry per scale ({n})")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"importance weights must be finite and >= 0, got {w}")
    if np.any(px <= 0) or np.any(div <= 0):
        raise ValueError("pixels and divisors must be positive")
    return w, alpha, beta, px, div


def allocate(weights, model: LossRateModel, pixels, lambda_prime: float, divisors=PAPER_DIVISORS,
             r_min: float = 0.0, r_max: float = np.inf) -> Allocation:
    """The closed-form rates for one lambda' (the RD-curve mode: one lambda' for all images)."""
    if not lambda_prime > 0:
        raise ValueError(f"lambda' must be > 0, got {lambda_prime}")
    w, alpha, beta, px, div = _check(weights, model, pixels, divisors)
    with np.errstate(divide="ignore"):
        raw = (w * alpha * beta * div / lambda_prime) ** (1.0 / (beta + 1.0))
    rates = np.clip(raw, r_min, r_max)
    return Allocation(rates, rates * px, float(lambda_prime), (raw < r_min) | (raw > r_max))


def allocate_budget(weights, model: LossRateModel, pixels, budget_bits: float, divisors=PAPER_DIVISORS,
                    r_min: float = 0.0, r_max: float = np.inf, rel_tol: float = 1e-4,
                    max_iter: int = 200) -> Allocation:
    """Rates meeting a total-bit budget: bisection on log lambda' (total bits fall as it grows).

    A budget below what the lowest rates cost, or above what the highest cost, returns that
    bound (all scales clamped) rather than failing."""
    w, alpha, beta, px, div = _check(weights, model, pixels, divisors)
    floor_bits, ceil_bits = float(np.sum(r_min * px)), float(np.sum(r_max * px))
    if budget_bits <= floor_bits or not np.any(w > 0):
        return allocate(w, model, px, 1e300, divisors, r_min, r_max)
    if budget_bits >= ceil_bits:
        return allocate(w, model, px, 1e-300, divisors, r_min, r_max)
    lo, hi = -300.0, 300.0  # log10 lambda'
    best = None
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        a = allocate(w, model, px, 10.0 ** mid, divisors, r_min, r_max)
        best = a
        if abs(a.total_bits - budget_bits) <= rel_tol * budget_bits:
            break
        if a.total_bits > budget_bits:
            lo = mid
        else:
            hi = mid
    return best


def rate_to_phi(rate: float, a: float, b: float, phi_range: tuple[float, float], levels=None) -> float:
    """The rate-phi model R = a * phi + b inverted, clamped to the codec's range; for a codec
    with fixed levels (separate models per lambda), the nearest level."""
    if a == 0:
        raise ValueError("rate-phi slope a must be non-zero")
    phi = float(np.clip((rate - b) / a, *phi_range))
    if levels:
        levels = np.asarray(levels, float)
        phi = float(levels[np.argmin(np.abs(levels - phi))])
    return phi
