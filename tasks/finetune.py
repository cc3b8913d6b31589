"""Finetuned MFIBA: the paper's line search on the importance weights, on calibration images only.

Each scale's weight correction moves in steps of +-0.01 (weights are quantised to 0.01) and a
step is kept while RD efficiency improves; RD efficiency is the BD-rate of MFIBA with the
corrected weights against the uniform anchor on the calibration split (lower is better).
What carries over to test images is the per-scale correction, added to each test image's own
MFIP weights. Coordinate-wise: for each scale, try +step; while it improves keep going; else
try -step likewise; repeat rounds over the scales until a round improves nothing or the
evaluation budget is spent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SearchResult:
    correction: dict[str, float]
    bd_rate: float  # of the best correction
    start_bd_rate: float  # of plain MFIBA (zero correction)
    evaluations: int
    history: list[dict] = field(default_factory=list)  # every evaluated correction


def line_search(evaluate: Callable[[dict[str, float]], float], scales, step: float = 0.01,
                max_evaluations: int = 40, max_rounds: int = 3, log=None) -> SearchResult:
    """`evaluate(correction) -> BD-rate %`; NaN counts as no improvement."""
    history: list[dict] = []
    cache: dict[tuple, float] = {}

    def score(corr: dict[str, float]) -> float:
        key = tuple(round(corr[s], 4) for s in scales)
        if key not in cache:
            value = evaluate(dict(corr))
            cache[key] = value if math.isfinite(value) else math.inf
            history.append({**{f"correction_{s}": corr[s] for s in scales}, "bd_rate": value})
            if log:
                log(f"line search: correction {[round(corr[s], 2) for s in scales]} -> BD-rate {value:.3f}%")
        return cache[key]

    best = {s: 0.0 for s in scales}
    best_score = start = score(best)
    for _ in range(max_rounds):
        improved_round = False
        for s in scales:
            for direction in (+1, -1):
                moved = False
                while len(cache) < max_evaluations:
                    trial = dict(best)
                    trial[s] = round(best[s] + direction * step, 4)
                    value = score(trial)
                    if value < best_score:
                        best, best_score, moved, improved_round = trial, value, True, True
                    else:
                        break
                if moved:  # the other direction cannot help once this one did
                    break
        if not improved_round or len(cache) >= max_evaluations:
            break
    return SearchResult(best, best_score if math.isfinite(best_score) else float("nan"),
                        start if math.isfinite(start) else float("nan"), len(cache), history)
