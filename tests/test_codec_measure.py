"""Rate units and codec measurement: rates come from bitstream files, in three named units."""
import numpy as np
import pytest
import torch

from storage.feature_store import FeatureStore
from tasks.codecs.base import build_codec, derive_pool
from tasks.codecs.measure import CodedImage, code_image, measure_codec, rate_summary, summarise

SCALES = {"0": 16, "1": 8, "2": 4, "3": 2, "pool": 1}


def _features(seed, side=64):
    g = torch.Generator().manual_seed(seed)
    feats = {s: torch.randn(8, side // 4 // (2 ** i), side // 4 // (2 ** i), generator=g)
             for i, s in enumerate(["0", "1", "2", "3"])}
    feats["pool"] = derive_pool(feats["3"])
    return feats


def _coded(image_id, bytes_total, pixels, mosaic):
    return CodedImage(image_id, "", bytes_total, {}, {}, {"0": mosaic}, pixels, 0.0, 0.0, {})


def test_rate_units_ratio_of_sums_vs_mean():
    images = [_coded(1, 100, 1000, 500), _coded(2, 100, 4000, 500)]
    r = rate_summary(images)
    assert r["bpp_input"] == pytest.approx(1600 / 5000)
    assert r["bpp_input_mean"] == pytest.approx((0.8 + 0.2) / 2)
    assert r["bits_per_mosaic_pixel"] == pytest.approx(1600 / 1000)


def test_code_image_counts_the_file_and_derived_pool_is_free(tmp_path):
    codec = build_codec("avif")
    feats = _features(0)
    coded = code_image(codec, feats, 60, tmp_path / "a.mfbs", 64 * 64, 1)
    derived = code_image(codec, feats, 60, tmp_path / "b.mfbs", 64 * 64, 1, derived=("pool",))
    assert coded.bytes_total == (tmp_path / "a.mfbs").stat().st_size
    assert derived.bytes_total < coded.bytes_total
    assert derived.mosaic_pixels["pool"] == 0
    assert sum(coded.bits_per_scale.values()) < 8 * coded.bytes_total  # header and trailer are not per scale


def test_measure_and_summarise_on_a_store(tmp_path):
    store = FeatureStore(str(tmp_path / "f.zarr"))
    for iid in (1, 2):
        feats = {k: v.numpy() for k, v in _features(iid).items()}
        store.write_image(iid, feats, {"split": "test", "file_name": f"{iid}.jpg", "input_size": [64, 64],
                                       "model_input_size": [64, 64], "strides": SCALES})
    table = measure_codec(build_codec("avif"), store, [1, 2], [30, 80], tmp_path / "streams")
    assert len(table) == 2 * 2 * 5
    summary = summarise(table).set_index("phi")
    assert summary.loc[80, "bpp_input"] > summary.loc[30, "bpp_input"]
    assert summary.loc[80, "mse_0"] < summary.loc[30, "mse_0"]
    assert np.isnan(summary.loc[30, "bpp_input_estimated"])  # classical codecs have no likelihoods
    files = list((tmp_path / "streams").rglob("*.mfbs"))
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) == table.groupby(["phi", "image_id"]).bytes_total.first().sum()
