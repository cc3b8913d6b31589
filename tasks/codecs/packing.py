"""Feature scale <-> codec image: channel packing into a mosaic, and range normalisation.

A learned image codec codes 3-channel images in [0, 1] whose sides are multiples of 64.
One FPN scale is a (C, H, W) float tensor, so, as in MFIBA, its channels are split into
groups of 3 (the last group zero-padded), each group becomes one (3, H, W) tile, the tiles
are laid out row-major on a near-square grid, and the mosaic is replicate-padded to a
multiple of `stride`. `unpack` inverts this exactly: it only moves values, never changes them.

Normalisation maps feature values into [0, 1] with two numbers (`NormParams`) that the
bitstream carries and whose 8 bytes count in the rate. Quantisation to the codec's
sample precision is the codec's job, not this module's.
"""
from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from tasks.codecs.errors import NonFiniteFeaturesError

GROUP_SIZE = 3  # codec image channels (RGB)
DEFAULT_STRIDE = 64  # compressai models need sides divisible by 64
DEFAULT_CLIP_STD_K = 6.0
NORM_MODES = ("minmax", "clip_std")


# --------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackInfo:
    """Where every channel of one scale sits in its mosaic; all ints, for a bitstream header."""

    channels: int
    height: int  # of one tile = of the feature map
    width: int
    groups: int  # ceil(channels / 3) tiles
    rows: int  # tile grid
    cols: int
    mosaic_height: int  # rows * height, before padding
    mosaic_width: int  # cols * width, before padding
    padded_height: int  # mosaic_height rounded up to a multiple of stride
    padded_width: int
    stride: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PackInfo:
        """Rebuild from a header, refusing anything `pack_layout` would not have produced,
        so a corrupt or foreign header fails here rather than as a garbled reshape."""
        expected_keys = {f.name for f in fields(cls)}
        if set(data) != expected_keys:
            raise ValueError(
                f"PackInfo header keys differ: missing {sorted(expected_keys - set(data))}, "
                f"unexpected {sorted(set(data) - expected_keys)}"
            )
        for key, value in data.items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"PackInfo field {key!r} must be an int, got {value!r}")
        info = cls(**{key: int(value) for key, value in data.items()})
        expected = pack_layout(info.channels, info.height, info.width, info.stride)
        if info != expected:
            raise ValueError(f"inconsistent PackInfo {info}; the layout for its shape is {expected}")
        return info

    def tile_origin(self, group: int) -> tuple[int, int]:
        """(top, left) pixel of a group's tile in the mosaic; tiles are placed row-major."""
        if not 0 <= group < self.groups:
            raise IndexError(f"group {group} out of range 0..{self.groups - 1}")
        return (group // self.cols) * self.height, (group % self.cols) * self.width


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def pack_layout(channels: int, height: int, width: int, stride: int = DEFAULT_STRIDE) -> PackInfo:
    """The tile grid whose mosaic is closest to square.

    Candidates are every column count with the fewest rows that hold all tiles (so no
    row is entirely empty). Ties on aspect ratio go to fewer unused tiles, then to the
    wider mosaic. Aspect ratios are compared as exact fractions so the encoder and the
    decoder can never pick different grids.
    """
    for name, value in (("channels", channels), ("height", height), ("width", width), ("stride", stride)):
        _check_positive_int(name, value)
    channels, height, width, stride = int(channels), int(height), int(width), int(stride)
    groups = math.ceil(channels / GROUP_SIZE)

    def squareness_key(cols: int) -> tuple[Fraction, int, int]:
        rows = math.ceil(groups / cols)
        mosaic_h, mosaic_w = rows * height, cols * width
        aspect = Fraction(max(mosaic_h, mosaic_w), min(mosaic_h, mosaic_w))
        return aspect, rows * cols - groups, rows

    cols = min(range(1, groups + 1), key=squareness_key)
    rows = math.ceil(groups / cols)
    mosaic_height, mosaic_width = rows * height, cols * width
    return PackInfo(
        channels=channels,
        height=height,
        width=width,
        groups=groups,
        rows=rows,
        cols=cols,
        mosaic_height=mosaic_height,
        mosaic_width=mosaic_width,
        padded_height=_round_up(mosaic_height, stride),
        padded_width=_round_up(mosaic_width, stride),
        stride=stride,
    )


def _replicate_pad(image: Tensor, height: int, width: int) -> Tensor:
    """Grow (3, h, w) to (3, height, width) by repeating the last row and column.

    Done by clamped indexing rather than F.pad: it is plainly exact and works for
    every dtype on every device. Replicated edges cost the codec almost no bits,
    unlike a jump to zero."""
    _, image_h, image_w = image.shape
    row_index = torch.arange(height, device=image.device).clamp_(max=image_h - 1)
    col_index = torch.arange(width, device=image.device).clamp_(max=image_w - 1)
    return image[:, row_index][:, :, col_index]


def pack(x: Tensor, stride: int = DEFAULT_STRIDE) -> tuple[Tensor, PackInfo]:
    """(C, H, W) features -> (3, padded_height, padded_width) mosaic of the same dtype.

    Channel c goes to plane c % 3 of tile c // 3. Unused channel slots and unused
    tiles are zero; the padding beyond the mosaic replicates its edge."""
    if x.dim() != 3:
        raise ValueError(f"pack expects a (C, H, W) tensor, got shape {tuple(x.shape)}")
    channels, height, width = x.shape
    info = pack_layout(channels, height, width, stride)

    padded_channels = info.rows * info.cols * GROUP_SIZE  # every grid slot filled
    stacked = x.new_zeros((padded_channels, height, width))
    stacked[:channels] = x
    # (rows*cols*3, H, W) -> (rows, cols, 3, H, W) -> (3, rows, H, cols, W) -> (3, rows*H, cols*W)
    mosaic = (
        stacked.reshape(info.rows, info.cols, GROUP_SIZE, height, width)
        .permute(2, 0, 3, 1, 4)
        .reshape(GROUP_SIZE, info.mosaic_height, info.mosaic_width)
    )
    return _replicate_pad(mosaic, info.padded_height, info.padded_width), info


def unpack(mosaic: Tensor, info: PackInfo) -> Tensor:
    """Exact inverse of `pack`: (3, padded_height, padded_width) -> (C, H, W). The mosaic
    may also come without its padding: (3, mosaic_height, mosaic_width)."""
    shapes = {(GROUP_SIZE, info.padded_height, info.padded_width), (GROUP_SIZE, info.mosaic_height, info.mosaic_width)}
    if tuple(mosaic.shape) not in shapes:
        raise ValueError(f"mosaic shape {tuple(mosaic.shape)} does not match PackInfo "
                         f"{' or '.join(str(s) for s in sorted(shapes, reverse=True))}")
    cropped = mosaic[:, : info.mosaic_height, : info.mosaic_width]
    stacked = (
        cropped.reshape(GROUP_SIZE, info.rows, info.height, info.cols, info.width)
        .permute(1, 3, 0, 2, 4)
        .reshape(info.rows * info.cols * GROUP_SIZE, info.height, info.width)
    )
    return stacked[: info.channels].contiguous()


# --------------------------------------------------------------------- normalisation


def _float32_at_most(value: float) -> float:
    """Largest float32 <= value, so a rounded lower bound still covers the data."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _float32_at_least(value: float) -> float:
    """Smallest float32 >= value, so a rounded upper bound still covers the data."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


@dataclass(frozen=True)
class NormParams:
    """Value range mapped onto [0, 1]. Both bounds are float32-exact so that what the
    encoder used is bit-for-bit what the decoder reads back from 8 bytes."""

    low: float
    high: float

    BYTES = 8  # two little-endian float32 (a class constant, not a field)

    def __post_init__(self) -> None:
        low, high = float(np.float32(self.low)), float(np.float32(self.high))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"NormParams bounds must be finite float32 values, got {self.low!r}, {self.high!r}")
        if not high > low:
            raise ValueError(f"NormParams needs high > low after float32 rounding, got {low!r}, {high!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def to_bytes(self) -> bytes:
        return struct.pack("<ff", self.low, self.high)

    @classmethod
    def from_bytes(cls, data: bytes) -> NormParams:
        if len(data) != cls.BYTES:
            raise ValueError(f"NormParams takes {cls.BYTES} bytes, got {len(data)}")
        low, high = struct.unpack("<ff", data)
        return cls(low, high)


def _describe_non_finite(x: Tensor) -> str | None:
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):  # one pass in the common case
        return None
    nan_count = int(torch.isnan(x).sum())
    inf_count = int(torch.isinf(x).sum())
    if nan_count == 0 and inf_count == 0:
        return None
    return (f"{nan_count + inf_count} of {x.numel()} feature values are NaN/Inf "
            f"({nan_count} NaN and {inf_count} Inf values)")


def check_finite(x: Tensor, scale: str | None = None) -> None:
    """Refuse features with NaN or Inf values (`NonFiniteFeaturesError`, a `CodecError` and
    a `ValueError`), naming the scale and how many values are bad; nothing is coded then."""
    problem = _describe_non_finite(x)
    if problem:
        where = f"scale {scale!r}: " if scale is not None else ""
        raise NonFiniteFeaturesError(f"{where}{problem}; refusing to code them")


def normalise(x: Tensor, mode: str = "minmax", k: float = DEFAULT_CLIP_STD_K) -> tuple[Tensor, NormParams]:
    """Map features into [0, 1] for the codec; returns float32 (float64 stays float64).

    'minmax'   : the tensor's min and max (the authors' choice); lossless in range.
    'clip_std' : mean +- k * std, narrowed to [min, max]; values outside are clipped.
                 Rare outliers then no longer squeeze the bulk of the values into a few
                 codec levels.
    A constant tensor gets the range [v, v + 1]: no division by zero, and its samples
    are all exactly 0, which any quantiser reproduces, so a lossless or exact coding
    decodes it to exactly v (JPEG XL, AVIF from quality ~70 up); a lossy codec may put the
    flat plane a little above 0 (AVIF at quality 10: 4/1023, so v + 0.004), never further
    than the unit range (tests/test_bad_numbers.py).
    NaN or Inf values are refused (`check_finite`), never mapped into the range.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {NORM_MODES}")
    if x.numel() == 0:
        raise ValueError("cannot normalise an empty tensor")
    check_finite(x)

    # Statistics and arithmetic in float64: exact for float16/float32 inputs and immune
    # to float32 overflow of (high - low).
    values = x.detach().to(torch.float64)
    minimum, maximum = float(values.min()), float(values.max())
    if mode == "minmax":
        low, high = minimum, maximum
    else:
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"clip_std needs a finite k > 0, got {k!r}")
        mean, std = float(values.mean()), float(values.std(unbiased=False))
        low, high = max(mean - k * std, minimum), min(mean + k * std, maximum)

    if high > low:
        # Round outwards to float32 so the stored range still covers [low, high].
        params = NormParams(_float32_at_most(low), _float32_at_least(high))
    else:
        constant = _float32_at_most(minimum)  # data is constant: minimum is the value
        upper = _float32_at_least(constant + 1.0)
        if upper <= constant:  # |constant| so large that + 1 is lost to rounding
            upper = float(np.nextafter(np.float32(constant), np.float32(np.inf)))
        params = NormParams(constant, upper)

    scaled = (values - params.low) / (params.high - params.low)
    output_dtype = torch.promote_types(x.dtype, torch.float32)
    return scaled.clamp_(0.0, 1.0).to(output_dtype), params


def denormalise(y: Tensor, params: NormParams, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `normalise`: low + y * (high - low), computed in float64, returned as `dtype`."""
    values = y.to(torch.float64)
    return (values * (params.high - params.low) + params.low).to(dtype)
