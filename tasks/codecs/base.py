"""The feature-codec contract and registry.

Every codec turns one image's multiscale features into one self-decodable bitstream and
back, in the same steps (compressai-style: small parts behind one compress/decompress):

    per scale:  normalise -> pack into one 3-channel mosaic -> encode_mosaic (codec-specific)
    decode:     decode_mosaic -> unpack -> denormalise

A codec subclass implements only `encode_mosaic` / `decode_mosaic` (and says its phi range);
packing, normalisation, derived 'pool' and the bitstream format are shared here.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from storage.bitstream import NO_CHECKPOINT, ScalePayload, StreamHeader, decode_stream, encode_stream
from tasks.codecs.errors import CodecError, NonFiniteFeaturesError  # noqa: F401  (the codecs' error types)
from tasks.codecs.packing import NormParams, PackInfo, check_finite, denormalise, normalise, pack, unpack

_CODECS: dict[str, Callable[..., "FeatureCodec"]] = {}


def register_codec(name: str):
    """Class or factory decorator: `@register_codec("elic")`."""

    def deco(obj):
        if name in _CODECS:
            raise ValueError(f"codec {name!r} is already registered")
        _CODECS[name] = obj
        return obj

    return deco


def _register_builtin_codecs() -> None:
    """Import the modules whose decorators register the built-in codecs (both import their
    heavy backends, compressai and imagecodecs, lazily)."""
    import tasks.codecs.classical  # noqa: F401
    import tasks.codecs.learned  # noqa: F401
    import tasks.codecs.tcm  # noqa: F401


def available_codecs() -> list[str]:
    _register_builtin_codecs()
    return sorted(_CODECS)


def build_codec(name: str, **kwargs) -> "FeatureCodec":
    _register_builtin_codecs()
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; registered: {available_codecs()}")
    return _CODECS[name](**kwargs)


CLASSICAL_CODECS = ("avif", "jpegxl", "external")  # no weights: nothing to train or load


def build_codec_from_spec(spec, role: str, resolve_path=lambda p: p) -> "FeatureCodec":
    """The codec a configuration's CodecSpec names, with errors that name the config field.

    Learned codecs need their trained weights: a missing checkpoint is an error, not a
    silent random-init codec."""
    field = f"codecs.{role}" if role == "main" else f"codecs.others.{role}"
    if not spec.phis:
        raise ValueError(f"{field}.phis is empty: give the rate points (lambdas or qualities) to code at")
    kwargs = dict(spec.options.get("codec", {})) if isinstance(spec.options, dict) else {}
    if spec.name not in CLASSICAL_CODECS:
        if not spec.checkpoint:
            raise ValueError(f"{field}.checkpoint is not set: a learned codec needs trained weights "
                             "(run `mfiba train-codec`, then point the checkpoint at its codec.pt)")
        path = resolve_path(spec.checkpoint)
        if not Path(path).exists():
            raise FileNotFoundError(f"{field}.checkpoint: {path} does not exist (run `mfiba train-codec`; "
                                    "it writes <train_codec.work_dir>/<codec>-<trained_on>/codec.pt)")
        kwargs["checkpoint"] = str(path)
    return build_codec(spec.name, **kwargs)


def derive_pool(level3: torch.Tensor) -> torch.Tensor:
    """torchvision's 'pool' is max_pool2d(P5, kernel 1, stride 2): an exact subsample of '3'."""
    return level3[..., ::2, ::2]


# The top-left (height, width) of a mosaic its caller reads (the packed features, not the
# stride padding), set around decode_mosaic and forward_mosaic*: a codec may leave the rest
# out of its output (the learned ones' synthesis: `layers.RegionSynthesis`); `unpack` takes
# the mosaic with or without it.
_mosaic_region: ContextVar[tuple[int, int] | None] = ContextVar("mosaic_region", default=None)


def mosaic_region() -> tuple[int, int] | None:
    return _mosaic_region.get()


@contextlib.contextmanager
def reading_region(height: int, width: int) -> Iterator[None]:
    token = _mosaic_region.set((height, width))
    try:
        yield
    finally:
        _mosaic_region.reset(token)


@dataclass(frozen=True)
class MosaicCode:
    strings: list[bytes]
    latent_shape: tuple[int, ...]


class FeatureCodec:
    """Base class. Subclasses set `name` and implement encode_mosaic / decode_mosaic."""

    name: str = "abstract"
    stride: int = 64  # mosaics are padded to a multiple of this
    phi_range: tuple[float, float] = (0.0, 1.0)
    norm_mode: str = "minmax"

    @property
    def checkpoint_sha256(self) -> bytes:
        """32 bytes identifying the weights (zeros for codecs without weights)."""
        return NO_CHECKPOINT

    # -- codec-specific ------------------------------------------------------------
    def encode_mosaic(self, mosaic: torch.Tensor, phi: float) -> MosaicCode:
        """mosaic: (3, H, W) in [0, 1], H and W multiples of `stride`."""
        raise NotImplementedError

    def decode_mosaic(self, code: MosaicCode, phi: float) -> torch.Tensor:
        """(3, H, W), or only its top-left `mosaic_region()` where one is set and the codec
        can leave the rest out."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------
    def check_phi(self, scale: str, phi: float) -> None:
        low, high = self.phi_range
        if not (low <= phi <= high):
            raise ValueError(f"codec {self.name!r}: phi={phi} for scale {scale!r} is outside [{low}, {high}]")

    def _mosaic(self, scale: str, x: torch.Tensor, phis) -> tuple[torch.Tensor, PackInfo, NormParams]:
        """The checked, normalised and packed mosaic of one scale, for coding at `phis`."""
        check_finite(x, scale)
        for phi in phis:
            self.check_phi(scale, phi)
        y, norm = normalise(x.float(), mode=self.norm_mode)
        mosaic, info = pack(y, stride=self.stride)
        return mosaic, info, norm

    def compress_scale(self, scale: str, x: torch.Tensor, phi: float) -> ScalePayload:
        mosaic, info, norm = self._mosaic(scale, x, [phi])
        code = self.encode_mosaic(mosaic, phi)
        return ScalePayload(scale=scale, feature_shape=tuple(x.shape), packing=info.to_dict(),
                            norm=norm.to_bytes(), phi=float(phi), strings=list(code.strings),
                            latent_shape=tuple(code.latent_shape))

    def decompress_scale(self, payload: ScalePayload) -> torch.Tensor:
        info = PackInfo.from_dict(payload.packing)
        with reading_region(info.mosaic_height, info.mosaic_width):
            mosaic = self.decode_mosaic(MosaicCode(payload.strings, tuple(payload.latent_shape)), payload.phi)
        return denormalise(unpack(mosaic.clamp(0, 1), info), NormParams.from_bytes(payload.norm))

    def reconstruct_scale(self, scale: str, x: torch.Tensor, phi: float) -> tuple[torch.Tensor, float | None]:
        """What the decoder would output for this scale, and the estimated bits, without
        writing a stream. Learned codecs run their synthesis on the quantised latent (equal
        to what a rANS round trip decodes; tested); others code for real (bits then exact)."""
        return self.reconstruct_scale_multi(scale, x, [phi])[0]

    def reconstruct_scale_multi(self, scale: str, x: torch.Tensor, phis,
                                bits: bool = True) -> list[tuple[torch.Tensor, float | None]]:
        """`reconstruct_scale` at several phis: one check, normalisation and packing for all
        of them, and, for a codec with `forward_mosaic_multi` (variable-rate learned ones),
        what does not depend on phi computed once. `bits=False`: a codec that can skip its
        rate estimate (the likelihoods) returns None for the bits (MFIP needs only the
        decoded features)."""
        mosaic, info, norm = self._mosaic(scale, x, phis)

        def features(x_hat: torch.Tensor) -> torch.Tensor:
            return denormalise(unpack(x_hat.clamp(0, 1), info), norm)

        with reading_region(info.mosaic_height, info.mosaic_width):  # unpack reads no padding
            if hasattr(self, "forward_mosaic_multi"):
                return [(features(x_hat), estimate)
                        for x_hat, estimate in self.forward_mosaic_multi(mosaic, phis, bits=bits)]
            if hasattr(self, "forward_mosaic"):
                return [(features(x_hat), bits) for x_hat, bits in (self.forward_mosaic(mosaic, p) for p in phis)]
            out = []
            for phi in phis:  # a real round trip through the codec: the bits are exact
                code = self.encode_mosaic(mosaic, phi)
                out.append((features(self.decode_mosaic(code, phi)), float(8 * sum(len(s) for s in code.strings))))
            return out

    def compress(self, features: Mapping[str, torch.Tensor], phi: Mapping[str, float] | float,
                 derived: Iterable[str] = (), payloads: dict | None = None) -> bytes:
        """One image: features {scale: (C, H, W)} -> bitstream bytes. Scales in `derived`
        (only 'pool' today) cost no payload and are rebuilt by the decoder. `payloads`: a
        dict kept by the caller across streams of the same features, so a scale coded at the
        same phi again (the uniform anchor in both pool modes) reuses its payload (codecs are
        deterministic: the same bytes).

        Every coded scale is checked before any is coded: NaN or Inf values raise
        `NonFiniteFeaturesError` (a `CodecError`) naming each bad scale and its count."""
        derived = set(derived)
        if derived - {"pool"}:
            raise ValueError(f"only 'pool' can be derived, got {sorted(derived)}")
        problems = []
        for scale, x in features.items():
            if scale not in derived:
                try:
                    check_finite(x, scale)
                except NonFiniteFeaturesError as e:
                    problems.append(str(e))
        if problems:
            raise NonFiniteFeaturesError("; ".join(problems) if len(problems) == 1 else
                                         f"{len(problems)} scales cannot be coded: " + "; ".join(problems))
        parts = []
        for scale, x in features.items():
            if scale in derived:
                parts.append(ScalePayload(scale=scale, feature_shape=tuple(x.shape), packing={}, norm=b"",
                                          phi=0.0, strings=[], latent_shape=(), derived=True))
            else:
                p = float(phi if isinstance(phi, (int, float)) else phi[scale])
                if payloads is None:
                    parts.append(self.compress_scale(scale, x, p))
                else:
                    if (scale, p) not in payloads:
                        payloads[(scale, p)] = self.compress_scale(scale, x, p)
                    parts.append(payloads[(scale, p)])
        return encode_stream(StreamHeader(codec=self.name, checkpoint_sha256=self.checkpoint_sha256), parts)

    def decompress(self, data: bytes) -> "OrderedDict[str, torch.Tensor]":
        _header, parts = decode_stream(data, expected_codec=self.name, expected_checkpoint=self.checkpoint_sha256)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for p in parts:
            if p.derived:
                if "3" not in out:
                    raise ValueError(f"scale {p.scale!r} is derived from '3', which the stream lacks")
                out[p.scale] = derive_pool(out["3"])
            else:
                out[p.scale] = self.decompress_scale(p)
        return out
