"""Bit-allocation methods: from one image's importance weights and a rate point to one codec
setting (phi) per coded scale. Registered by name, like the codecs.

- `uniform`: the paper's anchor; the rate point is one phi shared by every scale.
- `mfiba`: the image's MFIP weights -> closed-form rates (tasks/allocation.py) at one lambda'
  -> phi per scale through the rate-phi model, clamped to the codec's range.
- `mfiba-finetuned`: the same with a per-scale correction of the weights found by the line
  search on the calibration split (tasks/finetune.py).
- `static`: the calibration split's mean MFIP weights for every image (what per-image
  precoding buys is MFIBA minus this).
- `saba`: per-scale weights from channel-group sensitivities measured on the calibration
  split (tasks/saba.py), then the same allocation.
- `oracle`: MFIP weights from the ground-truth mAP drop (not available to an encoder;
  reported as an upper bound, labelled oracle).

For an allocating method the rate point is lambda', shared by all images of a run; the RD
curve is traced by sweeping it. `lambda_grid` picks lambda' values whose mean predicted
total bits on the calibration images match the uniform anchor's rate points, so curves
cover the same rate range.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from tasks.allocation import AUTHORS_DIVISORS, PAPER_DIVISORS, LossRateModel, allocate, rate_to_phi

ALLOCATING = ("mfiba", "mfiba-finetuned", "static", "saba", "oracle")
TUNED = frozenset({"mfiba-finetuned", "saba"})  # methods that need `mfiba tune`'s calibration searches
METHODS = ("uniform", *ALLOCATING)


@dataclass(frozen=True)
class RateModels:
    """The fitted models of one task (from `mfiba fit`) that allocation needs."""

    scales: tuple[str, ...]
    alpha: tuple[float, ...]  # one per scale, or one pooled value
    beta: tuple[float, ...]
    rate_phi: dict[str, tuple[float, float]]  # scale -> (a, b): R = a * phi + b, R in bits per scale pixel
    static_weights: dict[str, float] = field(default_factory=dict)
    weight_correction: dict[str, float] = field(default_factory=dict)  # finetuned MFIBA
    saba_weights: dict[str, float] = field(default_factory=dict)
    divisors: str = "paper"  # "paper" (4^i) or "authors" (1, 4, 16, 60, 60)
    # The measured calibration means per scale, (phis, rates), increasing: with
    # rate_phi_mode "interpolated" phi <-> R goes through them piecewise linearly (exact at
    # the precoded points; a codec whose rate is convex in phi, like AVIF's quality, is
    # poorly served by one line), "linear" is the paper's R = a phi + b.
    rate_phi_points: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    rate_phi_mode: str = "linear"

    def loss_rate(self) -> LossRateModel:
        return LossRateModel(tuple(self.alpha), tuple(self.beta))

    def divisor_values(self) -> tuple[float, ...]:
        table = PAPER_DIVISORS if self.divisors == "paper" else AUTHORS_DIVISORS
        index = {"0": 0, "1": 1, "2": 2, "3": 3, "pool": 4}
        return tuple(table[index[s]] for s in self.scales)

    def _points(self, scale: str):
        phis, rates = self.rate_phi_points[scale]
        # Rates must rise with phi for the inverse; a dip in the means is flattened.
        return np.asarray(phis, float), np.maximum.accumulate(np.asarray(rates, float))

    def rate_of(self, scale: str, phi: float) -> float:
        if self.rate_phi_mode == "interpolated":
            phis, rates = self._points(scale)
            return float(np.interp(phi, phis, rates))
        a, b = self.rate_phi[scale]
        return a * phi + b

    def phi_of(self, scale: str, rate: float, phi_range, levels=None) -> float:
        if self.rate_phi_mode == "interpolated":
            phis, rates = self._points(scale)
            phi = float(np.clip(np.interp(rate, rates, phis), *phi_range))
            if levels:
                lv = np.asarray(levels, float)
                phi = float(lv[np.argmin(np.abs(lv - phi))])
            return phi
        a, b = self.rate_phi[scale]
        return rate_to_phi(rate, a, b, phi_range, levels)


class UniformWeightsWarning(UserWarning):
    """An allocating method fell back to uniform weights for an image (all its weights <= 0)."""


def _vector(mapping: dict[str, float] | None, scales, what: str) -> np.ndarray:
    if mapping is None:
        raise ValueError(f"no {what} given")
    missing = [s for s in scales if s not in mapping]
    if missing:
        raise ValueError(f"{what} has no entry for scale(s) {missing}")
    values = np.array([np.nan if mapping[s] is None else float(mapping[s]) for s in scales])
    bad = [s for s, v in zip(scales, values) if not np.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: scale(s) {bad} are NaN/Inf ({dict(zip(scales, values.tolist()))}); "
                         "refusing to allocate with them")
    return values


def method_weights(method: str, models: RateModels, mfip: dict[str, float] | None = None,
                   oracle: dict[str, float] | None = None, image=None) -> np.ndarray:
    """The importance weights an allocating method uses for one image (sum 1).

    NaN or Inf weights are refused (ValueError naming the method, the image when `image` is
    given, and the scales): no NaN phi can come out of them. Negative weights count as 0 (a
    finetuning correction can push one below 0); when none is left positive the image gets
    uniform weights and an `UniformWeightsWarning` says so."""
    scales = models.scales
    where = f"{method} weights" + (f" of image {image}" if image is not None else "")
    try:
        if method == "mfiba":
            w = _vector(mfip, scales, "MFIP weights")
        elif method == "mfiba-finetuned":
            # The paper's search works on weights quantised to 0.01.
            w = np.round(_vector(mfip, scales, "MFIP weights") + _vector(models.weight_correction, scales,
                                                                           "weight correction"), 2)
        elif method == "static":
            w = _vector(models.static_weights, scales, "static weights")
        elif method == "saba":
            w = _vector(models.saba_weights, scales, "SABA weights")
        elif method == "oracle":
            w = _vector(oracle, scales, "oracle weights")
        else:
            raise ValueError(f"unknown allocating method {method!r}; known: {list(ALLOCATING)}")
    except ValueError as e:
        if image is None:
            raise
        raise ValueError(f"{where}: {e}") from None
    w = np.clip(w, 0.0, None)
    if w.sum() > 0:
        return w / w.sum()
    warnings.warn(f"{where}: no weight is positive; using uniform weights", UniformWeightsWarning, stacklevel=2)
    return np.full(len(scales), 1.0 / len(scales))


def allocate_phis(weights, models: RateModels, scale_pixels, lambda_prime: float, phi_range, levels=None
                  ) -> tuple[dict[str, float], np.ndarray]:
    """Closed-form rates for one image at lambda', mapped to phi per scale. Returns
    (phi per scale, predicted rates in bits per scale pixel)."""
    low, high = phi_range
    lo = np.array([models.rate_of(s, low) for s in models.scales])
    hi = np.array([models.rate_of(s, high) for s in models.scales])
    # The codec's reachable rates bound the closed form (a zero weight gets the lowest rate).
    r_lo, r_hi = np.maximum(np.minimum(lo, hi), 1e-6), np.maximum(np.maximum(lo, hi), 2e-6)
    alloc = allocate(weights, models.loss_rate(), scale_pixels, lambda_prime, models.divisor_values(),
                     r_min=r_lo, r_max=r_hi)
    phis = {s: models.phi_of(s, float(r), phi_range, levels) for s, r in zip(models.scales, alloc.rates)}
    # Where the lowest rate is clamped, the codec's lowest setting is meant (not where a line
    # fitted to higher rates happens to cross zero).
    for i, s in enumerate(models.scales):
        if alloc.rates[i] <= r_lo[i]:
            phis[s] = float(low if not levels else min(levels))
    return phis, alloc.rates


def uniform_phis(scales, phi: float) -> dict[str, float]:
    return {s: float(phi) for s in scales}


def predicted_bits(models: RateModels, phis: dict[str, float], scale_pixels) -> float:
    return float(sum(max(models.rate_of(s, phis[s]), 0.0) * px for s, px in zip(models.scales, scale_pixels)))


def lambda_grid(weights_per_image: list[np.ndarray], models: RateModels, pixels_per_image: list[np.ndarray],
                target_mean_bits: list[float], phi_range, levels=None) -> list[float]:
    """For each target, the lambda' whose mean predicted total bits over the images equals it
    (bisection on log lambda'; total bits fall as lambda' grows)."""
    def mean_bits(lam: float) -> float:
        total = 0.0
        for w, px in zip(weights_per_image, pixels_per_image):
            phis, _ = allocate_phis(w, models, px, lam, phi_range, levels)
            total += predicted_bits(models, phis, px)
        return total / max(1, len(weights_per_image))

    grid = []
    for target in target_mean_bits:
        lo, hi = -12.0, 12.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if mean_bits(10.0 ** mid) > target:
                lo = mid
            else:
                hi = mid
        grid.append(float(10.0 ** (0.5 * (lo + hi))))
    return grid


def rate_models_from_fit(fit: dict, task: str, scales, loss_rate_model: str = "pooled",
                         divisors: str = "paper", rate_phi_mode: str = "linear") -> RateModels:
    """The models of one task from `mfiba fit`'s output (flows.fit.load_current_fit); a fit
    flagged unusable (degenerate data) is refused with its name."""
    if task not in fit["tasks"]:
        raise ValueError(f"the fit {fit.get('version')} has no models for task {task!r} "
                         f"(has {sorted(fit['tasks'])})")
    per_task = fit["tasks"][task]
    fits = {"pooled": per_task["pooled"]} if loss_rate_model == "pooled" else \
        {f"scale {s}": per_task["per_scale"].get(s) for s in scales}
    fits.update({f"rate-phi {s}": per_task["rate_phi"].get(s) for s in scales})
    bad = [name for name, f in fits.items() if not f or f.get("status", "ok") != "ok"]
    if bad:
        hint = ("more calibration images or more qualities (codecs.main.phis)" if loss_rate_model == "pooled" else
                "allocation.loss_rate_model=pooled, or more calibration images")
        raise ValueError(f"fit {fit.get('version')}, task {task!r}: no usable model for {bad} "
                         f"(see the fit report); try {hint}")
    # A model marked ok must still carry usable numbers (a fit file's NaN is JSON null): refuse
    # any that is not, naming it, rather than let a NaN become a phi.
    params = {name: {k: f.get(k) for k in (("a", "b") if name.startswith("rate-phi") else ("alpha", "beta"))}
              for name, f in fits.items()}
    for name, ps in params.items():
        for k, v in ps.items():
            if not _finite_number(v) or (k != "b" and not v > 0):
                raise ValueError(f"fit {fit.get('version')}, task {task!r}: model {name!r} has {k} = {v!r} "
                                 f"although its status is ok; {k} must be a finite number"
                                 + ("" if k == "b" else " > 0") + " (refit: `mfiba fit`)")
    points = {}
    if "rate_phi_points" in fit:
        points = {s: tuple(map(tuple, fit["rate_phi_points"][s])) for s in scales if s in fit["rate_phi_points"]}
    if rate_phi_mode == "interpolated":
        for s in scales:
            phis, rates = points.get(s, ((), ()))
            ok = [p for p, r in zip(phis, rates) if _finite_number(p) and _finite_number(r)]
            if len(ok) < 2 or len(ok) != len(phis) or len(phis) != len(rates):
                raise ValueError(f"fit {fit.get('version')}, task {task!r}: rate-phi points of scale {s!r} are "
                                 f"{list(zip(phis, rates))}; allocation.rate_phi_mode=interpolated needs at least "
                                 "2, all finite")
    if loss_rate_model == "pooled":
        alpha, beta = (per_task["pooled"]["alpha"],), (per_task["pooled"]["beta"],)
    else:
        alpha = tuple(per_task["per_scale"][s]["alpha"] for s in scales)
        beta = tuple(per_task["per_scale"][s]["beta"] for s in scales)
    return RateModels(tuple(scales), alpha, beta,
                      {s: (per_task["rate_phi"][s]["a"], per_task["rate_phi"][s]["b"]) for s in scales},
                      static_weights=dict(per_task["static_weights"]), divisors=divisors,
                      rate_phi_points=points, rate_phi_mode=rate_phi_mode)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
