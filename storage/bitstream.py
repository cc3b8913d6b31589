"""Self-decodable bitstream for one image's coded multiscale features (format version 1).

The stream carries everything a decoder needs besides the codec weights themselves, and
its length in bytes *is* the rate: side information (shapes, packing, normalisation,
codec settings) is counted, not left out. Every part is covered by a CRC32, the stream
ends in a trailer holding its own total length, so corruption and truncation anywhere are
refused with an error that names the part and byte offset -- never decoded into garbage.

All integers are little-endian and unsigned (``struct`` formats ``<B <H <I <Q``,
``<d`` for the float64). "len8 + bytes" means a uint8 length followed by that many bytes.

Header (offsets from byte 0; L = codec name length)::

    offset   size  type          field
    0        4     bytes         magic b"MFBS"
    4        1     uint8         format version (= 1)
    5        1     uint8         L, codec name length (1..255)
    6        L     UTF-8         codec name, e.g. "elic"
    6+L      32    bytes         SHA-256 of the codec checkpoint (all zeros: no checkpoint)
    38+L     1     uint8         N, number of scale parts (0..255)
    39+L     4     uint32        CRC32 of header bytes [0, 39+L)
                                 header size = 43 + L

Scale part, repeated N times (offsets from the start of the part)::

    size      type              field
    1 + S     len8 + UTF-8      scale name, e.g. "0" or "pool" (1..255 bytes; not
                                "header"/"trailer", unique within the stream)
    12        3 x uint32        original feature shape C, H, W
    2 + P     len16 + UTF-8     packing info: JSON object of int values, sorted keys,
                                separators (",", ":") -- the one canonical form
    2 + M     len16 + bytes     normalisation parameters, opaque (packing writes 8: 2 float32)
    8         float64           phi, the codec's quality setting (finite)
    1         uint8             flags: bit 0 = derived (no payload, the decoder derives this
                                scale, e.g. 'pool' from '3'); bits 1..7 reserved, must be 0
    2         uint16            K, number of entropy-coded strings (0 when derived)
    K x (4+n) len32 + bytes     the strings
    1 + 4D    uint8 + D x uint32  latent shape needed to decode (D dims)
    4         uint32            CRC32 of the part's bytes before it
                                fixed side info = 33 + S + P + M + 4K + 4D bytes

Trailer::

    8         uint64            total stream length in bytes, trailer included
    4         uint32            CRC32 of every byte before this field

Decoding reads forward from byte 0 and checks, in order: magic, version, header CRC,
the expected codec / checkpoint, each part (bounds of every length field before any
slice, then its CRC, then its contents), the trailer. A length field pointing past the
end is reported as truncation/corruption before anything is allocated for it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass

from storage.urls import atomic_write_bytes, read_bytes


MAGIC = b"MFBS"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
NO_CHECKPOINT = bytes(32)  # codecs without learned weights
RESERVED_PART_NAMES = ("header", "trailer")  # keys part_sizes() uses for the non-scale parts

FLAG_DERIVED = 0x01
_KNOWN_FLAGS = FLAG_DERIVED

_U8, _U16, _U32, _U64, _F64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q", "<d"))
_TRAILER_SIZE = _U64.size + _U32.size
_MAX = {_U8: 0xFF, _U16: 0xFFFF, _U32: 0xFFFFFFFF}


class BitstreamError(ValueError):
    """The bytes are not a valid stream (corrupt, truncated, foreign, or for another codec)."""


@dataclass
class StreamHeader:
    codec: str
    checkpoint_sha256: bytes  # 32 raw bytes; NO_CHECKPOINT for codecs without weights
    version: int = FORMAT_VERSION


@dataclass
class ScalePayload:
    scale: str
    feature_shape: tuple[int, int, int]
    packing: dict
    norm: bytes
    phi: float
    strings: list[bytes]
    latent_shape: tuple[int, ...]
    derived: bool = False

    def __post_init__(self):
        # Normalise containers so that a payload built from lists / torch.Size compares
        # equal to the decoded one.
        self.feature_shape = tuple(int(d) for d in self.feature_shape)
        self.latent_shape = tuple(int(d) for d in self.latent_shape)
        self.strings = list(self.strings)

    @property
    def bits(self) -> int:
        """Bits this scale costs in the stream: its strings plus all its side information."""
        return 8 * len(_encode_part(self))


# --------------------------------------------------------------------------- encoding


def _length_prefixed(prefix: struct.Struct, blob: bytes, what: str) -> bytes:
    if len(blob) > _MAX[prefix]:
        raise ValueError(f"{what} is {len(blob)} bytes; at most {_MAX[prefix]} fit")
    return prefix.pack(len(blob)) + blob


def _uint32s(values: tuple[int, ...], what: str) -> bytes:
    for v in values:
        if not 0 <= v <= _MAX[_U32]:
            raise ValueError(f"{what} {values} has a value outside uint32")
    return struct.pack(f"<{len(values)}I", *values)


def _canonical_json(packing: dict) -> bytes:
    return json.dumps(packing, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_packing(packing, where: str, error=ValueError) -> None:
    if not isinstance(packing, dict):
        raise error(f"{where}: packing info must be a dict, got {type(packing).__name__}")
    for key, value in packing.items():
        # bool is an int subclass but would serialise as true/false, not as an int
        if not isinstance(key, str) or not isinstance(value, int) or isinstance(value, bool):
            raise error(f"{where}: packing info must map str to int, got {key!r}: {value!r}")


def _check_name(name, what: str) -> bytes:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} {name!r} must be 1..255 bytes of UTF-8, is {len(raw)}")
    return raw


def _encode_part(p: ScalePayload) -> bytes:
    where = f"scale {p.scale!r}"
    name = _check_name(p.scale, "scale name")
    if p.scale in RESERVED_PART_NAMES:
        raise ValueError(f"scale name {p.scale!r} is reserved")
    if len(p.feature_shape) != 3:
        raise ValueError(f"{where}: feature_shape must be (C, H, W), got {p.feature_shape}")
    _check_packing(p.packing, where)
    if not isinstance(p.norm, (bytes, bytearray)):
        raise ValueError(f"{where}: norm must be bytes, got {type(p.norm).__name__}")
    phi = float(p.phi)
    if not math.isfinite(phi):
        raise ValueError(f"{where}: phi must be finite, got {phi}")
    if p.derived and p.strings:
        raise ValueError(f"{where}: a derived scale carries no strings, got {len(p.strings)}")
    if len(p.strings) > _MAX[_U16]:
        raise ValueError(f"{where}: {len(p.strings)} strings; at most {_MAX[_U16]} fit")
    if len(p.latent_shape) > _MAX[_U8]:
        raise ValueError(f"{where}: latent shape has {len(p.latent_shape)} dims; at most 255")

    out = [
        _length_prefixed(_U8, name, "scale name"),
        _uint32s(p.feature_shape, f"{where}: feature_shape"),
        _length_prefixed(_U16, _canonical_json(p.packing), f"{where}: packing JSON"),
        _length_prefixed(_U16, bytes(p.norm), f"{where}: norm"),
        _F64.pack(phi),
        _U8.pack(FLAG_DERIVED if p.derived else 0),
        _U16.pack(len(p.strings)),
    ]
    for i, s in enumerate(p.strings):
        if not isinstance(s, (bytes, bytearray)):
            raise ValueError(f"{where}: strings[{i}] must be bytes, got {type(s).__name__}")
        out.append(_length_prefixed(_U32, bytes(s), f"{where}: strings[{i}]"))
    out.append(_U8.pack(len(p.latent_shape)) + _uint32s(p.latent_shape, f"{where}: latent_shape"))
    body = b"".join(out)
    return body + _U32.pack(zlib.crc32(body))


def _encode_header(h: StreamHeader, n_scales: int) -> bytes:
    if h.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write format version {h.version}; supported: {SUPPORTED_VERSIONS}")
    codec = _check_name(h.codec, "codec name")
    if not isinstance(h.checkpoint_sha256, (bytes, bytearray)) or len(h.checkpoint_sha256) != 32:
        raise ValueError("checkpoint_sha256 must be 32 raw bytes (use NO_CHECKPOINT for none)")
    if n_scales > _MAX[_U8]:
        raise ValueError(f"{n_scales} scales; at most 255 fit")
    body = (MAGIC + _U8.pack(h.version) + _length_prefixed(_U8, codec, "codec name")
            + bytes(h.checkpoint_sha256) + _U8.pack(n_scales))
    return body + _U32.pack(zlib.crc32(body))


def encode_stream(header: StreamHeader, scales: list[ScalePayload]) -> bytes:
    """Serialise one image's coded scales; deterministic (same inputs, same bytes)."""
    names = [s.scale for s in scales]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate scale names in {names}")
    body = _encode_header(header, len(scales)) + b"".join(_encode_part(s) for s in scales)
    total = _U64.pack(len(body) + _TRAILER_SIZE)
    return body + total + _U32.pack(zlib.crc32(body + total))


# --------------------------------------------------------------------------- decoding


class _Reader:
    """Forward cursor over the stream; every read is bounds-checked first, so a corrupt
    length can only produce a BitstreamError, never an oversized slice or allocation."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.where = "header"  # used in messages: which part is being read

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise BitstreamError(
                f"truncated or corrupt stream: {self.where}, {what} at byte {self.pos} needs "
                f"{n} bytes (expected at least {end} bytes), got {len(self.data)}")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, fmt: struct.Struct, what: str):
        return fmt.unpack(self.take(fmt.size, what))[0]

    def prefixed(self, prefix: struct.Struct, what: str) -> bytes:
        length_at = self.pos
        n = self.number(prefix, f"length of {what}")
        if self.pos + n > len(self.data):
            raise BitstreamError(
                f"truncated or corrupt stream: {self.where}, length field of {what} at byte "
                f"{length_at} says {n} bytes (expected at least {self.pos + n} bytes), "
                f"got {len(self.data)}")
        return self.take(n, what)

    def check_crc(self, start: int, what: str) -> None:
        crc_at = self.pos
        stored = self.number(_U32, f"CRC32 of {what}")
        computed = zlib.crc32(self.data[start:crc_at])
        if stored != computed:
            raise BitstreamError(
                f"CRC mismatch in {what} (bytes {start}..{crc_at}, CRC at byte {crc_at}): "
                f"stored {stored:08x}, computed {computed:08x}")


def _short_hash(h: bytes) -> str:
    return h.hex()[:8] + "..."


def _read_header(r: _Reader) -> tuple[StreamHeader, int]:
    data = r.data
    if data[:len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise BitstreamError(f"truncated stream: expected at least {len(MAGIC)} bytes "
                                 f"of magic, got {len(data)}")
        raise BitstreamError(f"not an mfiba bitstream: bytes 0..4 are {bytes(data[:4])!r}, "
                             f"expected magic {MAGIC!r}")
    r.take(len(MAGIC), "magic")
    version = r.number(_U8, "format version")
    if version not in SUPPORTED_VERSIONS:
        raise BitstreamError(f"unsupported bitstream format version {version} at byte 4; "
                             f"this decoder supports version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    codec_raw = r.prefixed(_U8, "codec name")
    checkpoint = r.take(32, "checkpoint SHA-256")
    n_scales = r.number(_U8, "number of scales")
    r.check_crc(0, "header")
    try:
        codec = codec_raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BitstreamError(f"header: codec name at byte 6 is not UTF-8 ({e})") from None
    if not codec:
        raise BitstreamError("header: codec name at byte 6 is empty")
    return StreamHeader(codec=codec, checkpoint_sha256=bytes(checkpoint), version=version), n_scales


def _check_expected(h: StreamHeader, expected_codec, expected_checkpoint) -> None:
    if expected_checkpoint is not None and (
            not isinstance(expected_checkpoint, (bytes, bytearray)) or len(expected_checkpoint) != 32):
        raise ValueError("expected_checkpoint must be 32 raw bytes")
    codec_ok = expected_codec is None or h.codec == expected_codec
    ckpt_ok = expected_checkpoint is None or h.checkpoint_sha256 == bytes(expected_checkpoint)
    if codec_ok and ckpt_ok:
        return
    ours = []
    if expected_codec is not None:
        ours.append(f"codec {expected_codec!r}")
    if expected_checkpoint is not None:
        ours.append(f"checkpoint {_short_hash(bytes(expected_checkpoint))}")
    raise BitstreamError(
        f"{'codec' if not codec_ok else 'checkpoint'} mismatch: stream was coded with codec "
        f"{h.codec!r} / checkpoint {_short_hash(h.checkpoint_sha256)}, "
        f"this decoder has {' / '.join(ours)}")


def _read_part(r: _Reader, index: int) -> ScalePayload:
    start = r.pos
    r.where = f"part {index}"
    # 1. Structure only (raw slices, bounds-checked), so the CRC is verified before any
    #    field is interpreted.
    name_raw = r.prefixed(_U8, "scale name")
    r.where = f"part {index} (scale {name_raw.decode('utf-8', 'replace')!r}, unverified)"
    feature_shape = struct.unpack("<3I", r.take(12, "feature shape"))
    packing_raw = r.prefixed(_U16, "packing JSON")
    norm = r.prefixed(_U16, "normalisation parameters")
    phi = r.number(_F64, "phi")
    flags_at = r.pos
    flags = r.number(_U8, "flags")
    n_strings = r.number(_U16, "string count")
    strings = [bytes(r.prefixed(_U32, f"strings[{i}]")) for i in range(n_strings)]
    n_dims = r.number(_U8, "latent ndim")
    latent_shape = struct.unpack(f"<{n_dims}I", r.take(4 * n_dims, "latent shape"))
    r.check_crc(start, f"part {index}")

    # 2. Contents. Past the CRC these fire only for a faulty writer, not for line noise.
    where = f"part {index} (bytes {start}..{r.pos})"
    try:
        scale = name_raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BitstreamError(f"{where}: scale name is not UTF-8 ({e})") from None
    where = f"part {index} (scale {scale!r}, bytes {start}..{r.pos})"
    if not name_raw or scale in RESERVED_PART_NAMES:
        raise BitstreamError(f"{where}: invalid scale name {scale!r}")
    try:
        packing = json.loads(packing_raw)
    except Exception as e:  # JSONDecodeError, UnicodeDecodeError, RecursionError on deep nesting
        raise BitstreamError(f"{where}: packing info is not valid JSON ({type(e).__name__})") from None
    _check_packing(packing, where, error=BitstreamError)
    if _canonical_json(packing) != packing_raw:
        raise BitstreamError(f"{where}: packing JSON is not in canonical form")
    if not math.isfinite(phi):
        raise BitstreamError(f"{where}: phi is {phi}, must be finite")
    if flags & ~_KNOWN_FLAGS:
        raise BitstreamError(f"{where}: unknown flag bits {flags:#04x} at byte {flags_at}")
    derived = bool(flags & FLAG_DERIVED)
    if derived and strings:
        raise BitstreamError(f"{where}: derived scale carries {len(strings)} strings, expected none")
    return ScalePayload(scale=scale, feature_shape=feature_shape, packing=packing,
                        norm=bytes(norm), phi=phi, strings=strings,
                        latent_shape=latent_shape, derived=derived)


def _read_trailer(r: _Reader) -> None:
    r.where = "trailer"
    body_end = r.pos
    expected_total = body_end + _TRAILER_SIZE
    if len(r.data) < expected_total:
        raise BitstreamError(f"truncated stream: expected {expected_total} bytes "
                             f"(trailer at byte {body_end}), got {len(r.data)}")
    total = r.number(_U64, "total length")
    r.check_crc(0, "trailer (whole stream)")
    if total != expected_total:
        raise BitstreamError(f"trailer at byte {body_end}: total length field says {total} "
                             f"bytes, the parts end at {expected_total}")
    if len(r.data) > expected_total:
        raise BitstreamError(f"trailing garbage: {len(r.data) - expected_total} bytes after "
                             f"the end of the stream at byte {expected_total}")


def _parse(data, expected_codec=None, expected_checkpoint=None):
    """(header, scales, part sizes in bytes) of a fully verified stream."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    header, n_scales = _read_header(r)
    _check_expected(header, expected_codec, expected_checkpoint)
    sizes = {"header": r.pos}
    scales = []
    for i in range(n_scales):
        start = r.pos
        part = _read_part(r, i)
        if part.scale in sizes:
            raise BitstreamError(f"part {i} at byte {start}: duplicate scale name {part.scale!r}")
        sizes[part.scale] = r.pos - start
        scales.append(part)
    _read_trailer(r)
    sizes["trailer"] = _TRAILER_SIZE
    return header, scales, sizes


def decode_stream(data: bytes, expected_codec: str | None = None,
                  expected_checkpoint: bytes | None = None) -> tuple[StreamHeader, list[ScalePayload]]:
    """Verify and decode a stream; raise BitstreamError for anything short of a valid one.

    Give ``expected_codec`` / ``expected_checkpoint`` (32 raw bytes) to refuse streams
    coded by another codec or another set of weights, which would otherwise decode into
    silently wrong features."""
    header, scales, _ = _parse(data, expected_codec, expected_checkpoint)
    return header, scales


def part_sizes(data: bytes) -> dict[str, int]:
    """Bytes per part of a (verified) stream: 'header', one key per scale, 'trailer'.
    A scale's entry is what that scale costs, strings and side information together."""
    return _parse(data)[2]


# --------------------------------------------------------------------------- files


def write_stream(path_or_url: str | os.PathLike, data: bytes) -> str:
    """Write a stream atomically (a reader never sees a partial stream)."""
    return atomic_write_bytes(path_or_url, data)


def read_stream(path_or_url: str | os.PathLike) -> bytes:
    return read_bytes(path_or_url)
