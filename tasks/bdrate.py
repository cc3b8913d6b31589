"""BD-rate through the `bjontegaard` package, with an explicit rule for non-monotonic curves.

PCHIP (the JCT-VC spreadsheet's interpolation) is the default; Akima and cubic (VCEG-M33)
are reported beside it. PCHIP and Akima assume quality rising with rate, and cubic silently
returns a number on any input, so every curve first goes through `monotone_front`:

Rule: points are sorted by rate; a point whose quality does not exceed the best quality at
a lower rate is dominated (spending more bits bought nothing) and is dropped. The result is
the curve's Pareto front, strictly increasing in both rate and quality. The row is flagged
`non_monotonic` when a point was dropped, and BD-rate is NaN with a reason when fewer than
`min_points` points remain or the rate ranges overlap too little.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

METHODS = ("pchip", "akima", "cubic")


@dataclass
class BDResult:
    bd_rate_percent: float
    method: str
    non_monotonic: bool
    dropped_anchor: int
    dropped_test: int
    reason: str = ""


def monotone_front(rate, quality) -> tuple[np.ndarray, np.ndarray, int]:
    """The curve's Pareto front (see module docstring) and how many points were dropped."""
    rate, quality = np.asarray(rate, float), np.asarray(quality, float)
    keep = np.isfinite(rate) & np.isfinite(quality) & (rate > 0)
    rate, quality = rate[keep], quality[keep]
    order = np.lexsort((-quality, rate))
    rate, quality = rate[order], quality[order]
    front_r, front_q, best = [], [], -np.inf
    for r, q in zip(rate, quality):
        if q > best and (not front_r or r > front_r[-1]):
            front_r.append(r)
            front_q.append(q)
            best = q
    dropped = int(len(rate) - len(front_r) + (~keep).sum())
    return np.array(front_r), np.array(front_q), dropped


def bd_rate(rate_anchor, quality_anchor, rate_test, quality_test, method: str = "pchip",
            min_points: int = 4, min_overlap: float = 0.5) -> BDResult:
    """Average rate difference (%) of test against anchor at equal quality; negative saves bits."""
    import bjontegaard

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    ra, qa, da = monotone_front(rate_anchor, quality_anchor)
    rt, qt, dt = monotone_front(rate_test, quality_test)
    flagged = bool(da or dt)
    if len(ra) < min_points or len(rt) < min_points:
        return BDResult(float("nan"), method, flagged, da, dt,
                        f"fewer than {min_points} monotone points (anchor {len(ra)}, test {len(rt)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Curves do not overlap": reported as the reason below
            value = float(bjontegaard.bd_rate(ra, qa, rt, qt, method=method, require_matching_points=False,
                                              min_overlap=min_overlap))
    except Exception as e:  # the package raises on too little overlap
        return BDResult(float("nan"), method, flagged, da, dt, f"bjontegaard: {e}")
    if not np.isfinite(value):
        return BDResult(float("nan"), method, flagged, da, dt, "quality ranges of the curves do not overlap")
    return BDResult(value, method, flagged, da, dt)
