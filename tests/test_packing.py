"""Channel packing into codec mosaics, and range normalisation (tasks/codecs/packing.py)."""
from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.codecs.packing import (
    NormParams,
    PackInfo,
    denormalise,
    normalise,
    pack,
    pack_layout,
    unpack,
)

SHAPES = [(13, 17), (25, 34), (200, 272), (4, 4)]
CHANNELS = [1, 2, 3, 64, 256]


def random_features(channels: int, height: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(channels, height, width, generator=generator) * 3).to(dtype)


def aspect(height: int, width: int) -> Fraction:
    return Fraction(max(height, width), min(height, width))


# ----------------------------------------------------------------------------- pack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_pack_unpack_is_bit_exact(channels, height, width, dtype):
    x = random_features(channels, height, width, dtype)
    mosaic, info = pack(x)
    assert mosaic.dtype == dtype
    assert mosaic.shape == (3, info.padded_height, info.padded_width)
    restored = unpack(mosaic, info)
    assert restored.dtype == dtype and restored.shape == x.shape
    assert torch.equal(restored, x)


def test_layout_for_256_channels_is_near_square_and_padded():
    info = pack_layout(256, 64, 64)
    assert info.groups == 86
    assert (info.rows, info.cols) == (9, 10)  # 90 slots; 10x10 or 86x1 would be worse
    assert (info.mosaic_height, info.mosaic_width) == (576, 640)
    assert (info.padded_height, info.padded_width) == (576, 640)


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_layout_is_the_squarest_grid_and_padded_to_stride(channels, height, width):
    info = pack_layout(channels, height, width)
    assert info.groups == math.ceil(channels / 3)
    assert info.rows * info.cols >= info.groups > (info.rows - 1) * info.cols  # no empty row
    assert (info.mosaic_height, info.mosaic_width) == (info.rows * height, info.cols * width)
    best = min(aspect(math.ceil(info.groups / cols) * height, cols * width) for cols in range(1, info.groups + 1))
    assert aspect(info.mosaic_height, info.mosaic_width) == best
    assert info.padded_height % 64 == 0 and info.padded_width % 64 == 0
    assert 0 <= info.padded_height - info.mosaic_height < 64
    assert 0 <= info.padded_width - info.mosaic_width < 64


def test_stride_one_means_no_padding():
    x = random_features(64, 25, 34)
    mosaic, info = pack(x, stride=1)
    assert (info.padded_height, info.padded_width) == (info.mosaic_height, info.mosaic_width)
    assert mosaic.shape == (3, info.mosaic_height, info.mosaic_width)
    assert torch.equal(unpack(mosaic, info), x)


def test_padding_replicates_last_row_and_column():
    x = random_features(5, 13, 17)
    mosaic, info = pack(x)
    mh, mw = info.mosaic_height, info.mosaic_width
    assert info.padded_height > mh and info.padded_width > mw
    last_row = mosaic[:, mh - 1 : mh, :mw]
    last_col = mosaic[:, :mh, mw - 1 : mw]
    assert torch.equal(mosaic[:, mh:, :mw], last_row.expand(-1, info.padded_height - mh, -1))
    assert torch.equal(mosaic[:, :mh, mw:], last_col.expand(-1, -1, info.padded_width - mw))
    corner = mosaic[:, mh - 1, mw - 1]
    assert torch.equal(mosaic[:, mh:, mw:], corner[:, None, None].expand(-1, info.padded_height - mh, info.padded_width - mw))


def test_tiles_land_where_packinfo_says():
    channels, height, width = 64, 13, 17
    x = random_features(channels, height, width)
    mosaic, info = pack(x)
    for channel in (0, 1, 2, 3, 40, 63):
        group, plane = divmod(channel, 3)
        top, left = info.tile_origin(group)
        assert (top, left) == ((group // info.cols) * height, (group % info.cols) * width)
        assert torch.equal(mosaic[plane, top : top + height, left : left + width], x[channel])
    # 64 channels = 21 full groups + 1 channel: the rest of the last group is zero,
    # and so are the grid slots after the last group.
    top, left = info.tile_origin(info.groups - 1)
    assert torch.count_nonzero(mosaic[1:, top : top + height, left : left + width]) == 0
    for unused in range(info.groups, info.rows * info.cols):
        top, left = (unused // info.cols) * height, (unused % info.cols) * width
        assert torch.count_nonzero(mosaic[:, top : top + height, left : left + width]) == 0


def test_packinfo_dict_round_trip_and_validation():
    info = pack_layout(256, 25, 34)
    data = info.to_dict()
    assert all(type(value) is int for value in data.values())
    assert PackInfo.from_dict(data) == info
    with pytest.raises(ValueError, match="inconsistent"):
        PackInfo.from_dict({**data, "rows": info.rows + 1})
    with pytest.raises(ValueError, match="keys"):
        PackInfo.from_dict({key: value for key, value in data.items() if key != "stride"})
    with pytest.raises(ValueError, match="int"):
        PackInfo.from_dict({**data, "channels": 256.0})


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="C, H, W"):
        pack(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        pack(torch.zeros(3, 4, 4), stride=0)
    x = random_features(3, 4, 4)
    mosaic, info = pack(x)
    with pytest.raises(ValueError, match="does not match"):
        unpack(mosaic[:, :-1], info)


def test_unpack_reads_a_mosaic_with_or_without_its_padding():
    x = random_features(64, 32, 32)
    mosaic, info = pack(x, stride=64)
    assert mosaic.shape[1:] != (info.mosaic_height, info.mosaic_width)  # 160 px padded to 192
    assert torch.equal(unpack(mosaic[:, :info.mosaic_height, :info.mosaic_width], info), x)
    with pytest.raises(ValueError, match=r"\(3, 192, 192\) or \(3, 160, 160\)"):
        unpack(mosaic[:, :170, :170], info)


@settings(max_examples=30, deadline=None)
@given(
    channels=st.integers(1, 300),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    stride=st.sampled_from([1, 8, 64]),
    half=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_property(channels, height, width, stride, half, seed):
    dtype = torch.float16 if half else torch.float32
    x = random_features(channels, height, width, dtype, seed)
    mosaic, info = pack(x, stride=stride)
    assert info.padded_height % stride == 0 and info.padded_width % stride == 0
    assert PackInfo.from_dict(info.to_dict()) == info
    assert torch.equal(unpack(mosaic, info), x)


# ------------------------------------------------------------------------ normalise


@pytest.mark.parametrize("mode", ["minmax", "clip_std"])
def test_normalise_round_trip(mode):
    x = random_features(64, 25, 34)
    y, params = normalise(x, mode=mode)
    assert y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    restored = denormalise(y, params)
    tolerance = (params.high - params.low) * 2e-7
    inside = (x >= params.low) & (x <= params.high)
    assert torch.allclose(restored[inside], x[inside], rtol=0, atol=tolerance)
    # Clipped outliers come back as the nearest bound.
    assert torch.allclose(restored[~inside], x[~inside].clamp(params.low, params.high), rtol=0, atol=tolerance)


def test_minmax_uses_full_range_and_clip_std_clips_outliers():
    x = random_features(16, 20, 20)
    x[0, 0, 0] = 1000.0  # one outlier
    y, params = normalise(x, mode="minmax")
    assert params.low == float(x.min()) and params.high == 1000.0
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0

    y, params = normalise(x, mode="clip_std", k=6)
    values = x.double()
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    assert params.high == pytest.approx(mean + 6 * std, rel=1e-6) and params.high < 1000.0
    assert params.low == pytest.approx(max(mean - 6 * std, float(x.min())), rel=1e-6)
    assert float(y[0, 0, 0]) == 1.0


def test_normalise_float16_input():
    x = random_features(8, 13, 17, torch.float16)
    y, params = normalise(x)
    assert y.dtype == torch.float32
    restored = denormalise(y, params, dtype=torch.float16)
    assert torch.allclose(restored.float(), x.float(), rtol=0, atol=(params.high - params.low) * 1e-3)


def test_norm_params_are_float32_exact_and_bytes_round_trip():
    params = NormParams(-1.1, 2.3)  # not float32-representable as given
    assert params.low == float(np.float32(-1.1)) and params.high == float(np.float32(2.3))
    data = params.to_bytes()
    assert len(data) == 8 and data == struct.pack("<ff", params.low, params.high)
    assert NormParams.from_bytes(data) == params
    _, fitted = normalise(random_features(4, 5, 6, torch.float64))
    assert NormParams.from_bytes(fitted.to_bytes()) == fitted


def test_norm_params_validation():
    with pytest.raises(ValueError, match="high > low"):
        NormParams(1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        NormParams(0.0, float("inf"))
    with pytest.raises(ValueError, match="bytes"):
        NormParams.from_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="finite"):
        NormParams.from_bytes(struct.pack("<ff", float("nan"), 1.0))


@pytest.mark.parametrize("mode", ["minmax", "clip_std"])
@pytest.mark.parametrize("value", [0.0, -3.25, 7.1, 1e30])
def test_constant_scale_round_trips_exactly(mode, value):
    x = torch.full((256, 4, 4), value, dtype=torch.float32)
    y, params = normalise(x, mode=mode)
    assert params.high > params.low
    assert torch.count_nonzero(y) == 0  # all samples at 0: any quantiser keeps them
    assert torch.equal(denormalise(y, params), x)


def test_single_value_tensor():
    x = torch.tensor([[[2.5]]])
    for mode in ("minmax", "clip_std"):
        y, params = normalise(x, mode=mode)
        assert torch.equal(denormalise(y, params), x)


@pytest.mark.parametrize(
    "bad,found",
    [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf"), (float("-inf"), "0 NaN and 1 Inf")],
)
def test_non_finite_input_is_refused(bad, found):
    x = random_features(3, 4, 4)
    x[1, 2, 3] = bad
    with pytest.raises(ValueError, match=found):
        normalise(x)


def test_bad_mode_and_k_are_refused():
    x = random_features(3, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        normalise(x, mode="zscore")
    with pytest.raises(ValueError, match="k > 0"):
        normalise(x, mode="clip_std", k=0)
