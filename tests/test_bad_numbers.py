"""Bad numbers never reach a bitstream, a fit parameter or a phi.

(a) NaN / Inf features are refused by every codec, before anything is coded, as the codecs'
    error type, naming the scale and how many values are bad;
(b) all-zero and constant scales code and decode to finite values equal to the constant
    (exactly where the codec is exact, within its error otherwise);
(c) degenerate precoding data gives fit rows whose status names the reason, never a usable
    NaN, and `rate_models_from_fit` refuses such a fit naming the model;
(d) NaN or non-positive importance weights never give NaN phis.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from storage.bitstream import decode_stream
from tasks.codecs.base import CodecError, FeatureCodec, MosaicCode, NonFiniteFeaturesError, build_codec
from tasks.codecs.packing import NormParams, normalise
from tasks.fitting import (FitError, failed_fit_rows, fit_loss_rate, fit_rate_phi_table, loss_rate_points,
                           rate_phi_points)
from tasks.methods import (RateModels, UniformWeightsWarning, allocate_phis, method_weights,
                           rate_models_from_fit)
from test_fit import power_law_table  # tests/ is on sys.path (rootdir conftest, prepend import mode)

SCALES = ("0", "1", "2", "3", "pool")
LEARNED = "mbt2018-mean"  # a tiny random-init compressai model, as tests/test_learned_codecs.py builds them
PHI = {"avif": 10.0, "jpegxl": 10.0, LEARNED: 0.013, "stub": 0.5}


class _RecordingCodec(FeatureCodec):
    """Codes the mosaic as its raw bytes and records every call: proves nothing was coded."""

    name = "stub"
    stride = 8

    def __init__(self):
        self.calls = 0

    def encode_mosaic(self, mosaic, phi):
        self.calls += 1
        return MosaicCode([mosaic.numpy().tobytes()], tuple(mosaic.shape))

    def decode_mosaic(self, code, phi):
        return torch.from_numpy(np.frombuffer(code.strings[0], dtype=np.float32).copy()).reshape(code.latent_shape)


@pytest.fixture(scope="module")
def learned():
    return build_codec(LEARNED, N=16, M=24, lmbda=PHI[LEARNED])


def _codec(name, learned):
    if name == LEARNED:
        return learned
    if name == "stub":
        return _RecordingCodec()
    pytest.importorskip("imagecodecs")
    return build_codec(name)


def _features(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"2": torch.randn(12, 32, 32, generator=g), "3": torch.randn(6, 16, 16, generator=g)}


# -- (a) NaN / Inf features ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["stub", "avif", "jpegxl", LEARNED])
def test_non_finite_features_are_refused_naming_scale_and_count(name, learned):
    codec = _codec(name, learned)
    feats = _features()
    flat = feats["2"].view(-1)
    flat[:12] = float("nan")
    flat[100:105] = float("inf")
    flat[200] = float("-inf")
    total = feats["2"].numel()
    with pytest.raises(NonFiniteFeaturesError) as e:
        codec.compress(feats, PHI[name])
    msg = str(e.value)
    assert f"scale '2': 18 of {total} feature values are NaN/Inf (12 NaN and 6 Inf values)" in msg
    assert "refusing to code them" in msg and "'3'" not in msg
    assert isinstance(e.value, CodecError) and isinstance(e.value, ValueError)
    if name == "stub":
        assert codec.calls == 0  # checked before any scale is coded, '3' (clean) included
    # One scale at a time too (the precoding and RD paths).
    with pytest.raises(CodecError, match=f"scale '2': 18 of {total}"):
        codec.compress_scale("2", feats["2"], PHI[name])
    with pytest.raises(CodecError, match=f"scale '2': 18 of {total}"):
        codec.reconstruct_scale("2", feats["2"], PHI[name])


def test_every_bad_scale_is_named_and_derived_scales_are_not_checked():
    codec = _RecordingCodec()
    feats = _features()
    feats["2"][0, 0, 0] = float("nan")
    feats["3"][1] = float("inf")  # a whole channel: 256 values
    feats["pool"] = torch.full((6, 8, 8), float("nan"))  # derived: never coded, rebuilt from '3'
    with pytest.raises(NonFiniteFeaturesError) as e:
        codec.compress(feats, 0.5, derived=("pool",))
    msg = str(e.value)
    assert msg.startswith("2 scales cannot be coded")
    assert "scale '2': 1 of 12288" in msg and "scale '3': 256 of 1536" in msg and "'pool'" not in msg
    assert codec.calls == 0
    clean = _features()
    clean["pool"] = torch.full((6, 8, 8), float("nan"))
    codec.compress(clean, 0.5, derived=("pool",))  # the derived scale's values do not matter


def test_normalise_refuses_non_finite_as_the_codec_error():
    x = torch.zeros(3, 4, 4)
    x[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="1 of 48 feature values are NaN/Inf"):
        normalise(x)
    normalise(torch.zeros(3, 4, 4, dtype=torch.int32))  # integers cannot be NaN


@pytest.mark.parametrize("name", ["stub", "avif", LEARNED])
@pytest.mark.parametrize("phi", [float("nan"), float("inf")])
def test_non_finite_phi_is_refused(name, phi, learned):
    codec = _codec(name, learned)
    with pytest.raises(ValueError, match="phi=(nan|inf)"):
        codec.compress(_features(), phi)


# -- (b) all-zero and constant scales ----------------------------------------------------------
@pytest.mark.parametrize("name", ["avif", "jpegxl", LEARNED])
@pytest.mark.parametrize("value", [0.0, 3.25, -1e4])
def test_constant_scale_codes_and_decodes_finite_and_equal(name, value, learned):
    codec = _codec(name, learned)
    feats = _features()
    feats["2"] = torch.full((12, 32, 32), value)  # constant; 0.0: all zeros
    data = codec.compress(feats, PHI[name])
    _header, parts = decode_stream(data)
    for p in parts:  # nothing non-finite in the stream
        norm = NormParams.from_bytes(p.norm)
        assert math.isfinite(norm.low) and math.isfinite(norm.high) and math.isfinite(p.phi)
    constant = next(p for p in parts if p.scale == "2")
    assert NormParams.from_bytes(constant.norm).low == value  # the constant maps to sample 0
    decoded = codec.decompress(data)
    for s, x in decoded.items():
        assert x.shape == feats[s].shape and bool(torch.isfinite(x).all()), s
    error = float((decoded["2"] - value).abs().max())
    if name == "jpegxl":
        assert error == 0.0
    else:
        # AV1 at low quality puts a flat zero plane a few 10-bit code values above 0 (measured
        # 4/1023 at quality 10, 0 from quality 70 up); the random-init model is off by ~0.02.
        # Either way far below the unit normalisation range of a constant scale.
        assert error <= 0.05, error
    if name == "avif":
        exact = codec.decompress(codec.compress(feats, 90.0))["2"]
        assert bool((exact == value).all())


# -- (c) degenerate precoding data for fitting ----------------------------------------------------
def _fit_dict(table, version="v-test", task="bbox"):
    """The fit as `flows.fit.load_current_fit` hands it to allocation (NaN -> null, as the
    fit JSON stores it), built from the same fitting functions the fit flow calls."""
    weights = {s: 0.2 for s in SCALES}
    try:
        fits = fit_loss_rate(loss_rate_points(table, task, "AP"), weights)
    except FitError as e:  # nothing finite at all: the fit flow writes failed rows
        fits = failed_fit_rows(task, "AP", "loss", str(e))
    rp = fit_rate_phi_table(rate_phi_points(table))
    null = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    ab = lambda r: {"alpha": null(r["alpha"]), "beta": null(r["beta"]), "status": r["status"]}  # noqa: E731
    pooled = fits[fits["scale"] == "pooled"]
    return fits, rp, {
        "version": version,
        "tasks": {task: {
            "pooled": ab(pooled.iloc[0]) if len(pooled) else None,
            "per_scale": {r["scale"]: ab(r) for _, r in fits[(fits["model"] == "cauchy")
                                                           & fits["scale"].isin(SCALES)].iterrows()},
            "rate_phi": {r["scale"]: {"a": null(r["a"]), "b": null(r["b"]), "status": r["status"]}
                         for _, r in rp.iterrows()},
            "static_weights": weights}},
        "rate_phi_points": {s: [g.phi.tolist(), g.rate.tolist()] for s, g in rate_phi_points(table).groupby("scale")},
    }


def _no_usable_nan(fits, rp):
    """Every row marked ok has finite parameters; every row with a NaN parameter names why."""
    for _, r in fits.iterrows():
        keys = ["c0", "c1", "c2"] if r["model"] == "quadratic" else ["alpha", "beta"]
        if r["scale"] == "all":
            continue  # a score row, no parameters
        if r["status"] == "ok":
            assert all(np.isfinite(r[k]) for k in keys), r.to_dict()
        if not all(np.isfinite(r[k]) for k in keys):
            assert r["status"].split(":")[0] in ("error", "flat", "unusable") and ":" in r["status"], r.to_dict()
    for _, r in rp.iterrows():
        if r["status"] == "ok":
            assert np.isfinite(r["a"]) and np.isfinite(r["b"]) and r["a"] > 0


def test_one_point_per_scale_is_flagged_and_refused_by_allocation():
    table = power_law_table()
    fits, rp, fit = _fit_dict(table[table["quality"] == 0])  # one quality: one point per scale
    _no_usable_nan(fits, rp)
    per_scale = fits[fits["scale"].isin(SCALES)]
    assert per_scale["status"].str.contains(r"scale \w+ (?:cauchy|quadratic): 1 usable points, need at least").all()
    assert rp["status"].str.contains("rate-phi scale .*: 1 usable points, need at least 2").all()
    # (The pooled Cauchy pair still fits: it shares alpha, beta across the scales' points.)
    with pytest.raises(ValueError, match=r"task 'bbox': no usable model for \['rate-phi 0', 'rate-phi 1'"):
        rate_models_from_fit(fit, "bbox", SCALES)
    with pytest.raises(ValueError, match=r"no usable model for \['scale 0', 'scale 1'"):
        rate_models_from_fit(fit, "bbox", SCALES, loss_rate_model="per-scale")


def test_flat_curve_is_flagged_and_refused_naming_the_scale():
    table = power_law_table()
    table.loc[table["scale"] == "2", "loss_bbox"] = 0.3  # the loss does not change with rate
    fits, rp, fit = _fit_dict(table)
    _no_usable_nan(fits, rp)
    flat = fits[(fits["scale"] == "2") & (fits["model"] == "cauchy")].iloc[0]
    assert flat["status"].startswith("flat: loss is 30 at every rate")  # mAP points
    with pytest.raises(ValueError, match=r"no usable model for \['scale 2'\]"):
        rate_models_from_fit(fit, "bbox", SCALES, loss_rate_model="per-scale")
    # The pooled model does not depend on one scale's curve: it stays usable, with finite numbers.
    models = rate_models_from_fit(fit, "bbox", SCALES)
    assert all(np.isfinite(models.alpha + models.beta))


def test_all_nan_losses_give_error_rows_and_are_refused():
    table = power_law_table()
    table["loss_bbox"] = np.nan
    with pytest.raises(FitError, match="bbox AP \\(loss\\): column loss_bbox has no finite value"):
        loss_rate_points(table, "bbox", "AP")
    fits, rp, fit = _fit_dict(table)
    _no_usable_nan(fits, rp)
    assert fits["status"].str.startswith("error: bbox AP (loss)").all()
    assert fit["tasks"]["bbox"]["pooled"] is None
    with pytest.raises(ValueError, match=r"no usable model for \['pooled'\]"):
        rate_models_from_fit(fit, "bbox", SCALES)


def test_one_scale_all_nan_has_no_model_and_per_scale_allocation_refuses_it():
    table = power_law_table()
    table.loc[table["scale"] == "1", "loss_bbox"] = np.nan
    fits, rp, fit = _fit_dict(table)
    _no_usable_nan(fits, rp)
    assert "1" not in fit["tasks"]["bbox"]["per_scale"]
    with pytest.raises(ValueError, match=r"no usable model for \['scale 1'\]"):
        rate_models_from_fit(fit, "bbox", SCALES, loss_rate_model="per-scale")


@pytest.mark.parametrize("model, key, value", [
    ("pooled", "alpha", None), ("pooled", "beta", float("nan")), ("pooled", "beta", -0.5),
    ("rate_phi", "a", None), ("rate_phi", "b", float("inf")),
])
def test_a_fit_marked_ok_with_a_non_finite_parameter_is_refused_naming_it(model, key, value):
    _fits, _rp, fit = _fit_dict(power_law_table())
    rate_models_from_fit(fit, "bbox", SCALES)  # the clean fit is usable
    entry = fit["tasks"]["bbox"]["pooled"] if model == "pooled" else fit["tasks"]["bbox"]["rate_phi"]["2"]
    entry[key] = value  # e.g. a hand-edited or corrupt fit.json
    name = "pooled" if model == "pooled" else "rate-phi 2"
    with pytest.raises(ValueError, match=f"model '{name}' has {key} = {value!r} although its status is ok"):
        rate_models_from_fit(fit, "bbox", SCALES)


def test_interpolated_rate_phi_refuses_non_finite_points():
    _fits, _rp, fit = _fit_dict(power_law_table())
    fit["rate_phi_points"]["3"][1][2] = float("nan")
    rate_models_from_fit(fit, "bbox", SCALES)  # the linear mode does not use the points
    with pytest.raises(ValueError, match="rate-phi points of scale '3'.*needs at least 2, all finite"):
        rate_models_from_fit(fit, "bbox", SCALES, rate_phi_mode="interpolated")


# -- (d) NaN / negative importance weights ------------------------------------------------------
def _models(**kw):
    return RateModels(SCALES, (2.0,), (0.7,), {s: (10.0, 0.01) for s in SCALES},
                      static_weights={s: 0.2 for s in SCALES}, **kw)


PIXELS = np.array([64 * 64, 32 * 32, 16 * 16, 8 * 8, 4 * 4])
RANGE = (0.0018, 0.18)


@pytest.mark.parametrize("method, arg", [("mfiba", "mfip"), ("oracle", "oracle"), ("mfiba-finetuned", "mfip")])
@pytest.mark.parametrize("values", [[np.nan] * 5, [0.3, np.nan, 0.2, 0.2, 0.3], [0.3, np.inf, 0.2, 0.2, 0.3]])
def test_nan_weights_are_refused_naming_the_image(method, arg, values):
    m = _models(weight_correction={s: 0.0 for s in SCALES})
    w = dict(zip(SCALES, values))
    named = rf"{method} weights of image 42: .*weights: scale\(s\) \[.*'1'.*\] are NaN/Inf"
    with pytest.raises(ValueError, match=named):
        method_weights(method, m, **{arg: w}, image=42)
    with pytest.raises(ValueError, match="are NaN/Inf"):  # without the image too
        method_weights(method, m, **{arg: w})


def test_nan_static_weights_and_missing_weights_are_refused():
    m = _models()
    bad = RateModels(**{**m.__dict__, "static_weights": {**m.static_weights, "3": float("nan")}})
    with pytest.raises(ValueError, match=r"static weights: scale\(s\) \['3'\] are NaN/Inf"):
        method_weights("static", bad, image=7)
    with pytest.raises(ValueError, match="static weights of image 7: .*'3'"):
        method_weights("static", bad, image=7)
    with pytest.raises(ValueError, match="image 7: no MFIP weights given"):
        method_weights("mfiba", m, None, image=7)


@pytest.mark.parametrize("values", [[-0.1] * 5, [0.0] * 5, [-1.0, 0.0, -0.2, 0.0, -3.0]])
def test_no_positive_weight_falls_back_to_uniform_with_a_warning(values):
    m = _models()
    with pytest.warns(UniformWeightsWarning, match="mfiba weights of image 3: no weight is positive; using uniform"):
        w = method_weights("mfiba", m, dict(zip(SCALES, values)), image=3)
    np.testing.assert_array_equal(w, np.full(5, 0.2))
    phis, rates = allocate_phis(w, m, PIXELS, 1.0, RANGE)
    assert all(RANGE[0] <= p <= RANGE[1] for p in phis.values()) and np.isfinite(rates).all()


def test_some_negative_weights_count_as_zero_without_a_warning():
    m = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = method_weights("mfiba", m, dict(zip(SCALES, [0.5, -0.2, 0.25, 0.25, -1.0])))
    np.testing.assert_allclose(w, [0.5, 0.0, 0.25, 0.25, 0.0])
    phis, _ = allocate_phis(w, m, PIXELS, 1.0, RANGE)
    assert all(np.isfinite(p) and RANGE[0] <= p <= RANGE[1] for p in phis.values())


@pytest.mark.parametrize("values", [[np.nan] * 5, [0.2, 0.2, np.nan, 0.2, 0.2], [-0.1, 0.3, 0.3, 0.3, 0.2]])
def test_allocate_phis_refuses_nan_or_negative_weights(values):
    with pytest.raises(ValueError, match="importance weights must be finite and >= 0"):
        allocate_phis(np.array(values), _models(), PIXELS, 1.0, RANGE)


def test_all_zero_weights_allocate_the_lowest_setting():
    phis, rates = allocate_phis(np.zeros(5), _models(), PIXELS, 1.0, RANGE)
    assert phis == {s: RANGE[0] for s in SCALES} and np.isfinite(rates).all()


def test_learned_codecs_refuse_a_zero_lambda_as_the_config_does():
    """mfiba.config refuses phis <= 0 for learned codecs (LEARNED_CODEC_NAMES); the codec agrees."""
    from mfiba.config import LEARNED_CODEC_NAMES

    assert LEARNED in LEARNED_CODEC_NAMES
    with pytest.raises(ValueError, match="lambdas must be finite and positive"):
        build_codec(LEARNED, N=16, M=24, lmbda=0.0)
