"""Classical (standard) codecs on the packed feature mosaics: the non-learned anchors.

The paper's classical anchor is VTM 17.0, which cannot be installed here (no VVC encoder is
packaged anywhere reachable). Two stand-ins, on exactly the same packed and normalised
mosaics as the learned codecs (see `tasks.codecs.base`):

* ``"avif"`` (`AvifCodec`, the preferred anchor): AV1 intra coding (libaom through libavif,
  from the ``imagecodecs`` wheel). AV1 is a block-transform intra/video codec of the same
  family as HEVC/VVC, and its decoder is bit-exact by specification (integer only), so a
  stream decodes to the same samples on every machine. The mosaic is quantised to
  `bit_depth` bits (10 by default; 8 and 12 also work) and coded as YUV 4:4:4 with the
  *identity* matrix (the three mosaic planes are coded as-is, like VTM's RGB 4:4:4 mode):
  the channels are unrelated feature channels, so a colour transform decorrelates nothing
  and only adds rounding (measured: identity is 0.2-0.3 dB better than BT.601 at equal rate).
  ``phi`` = AVIF quality 0..100 (rounded to an integer); 100 is lossless.
* ``"jpegxl"`` (`JpegXlCodec`): libjxl at `bit_depth` bits (10 by default; JPEG XL takes
  10-bit samples directly, so no 16-bit detour is needed). ``phi`` = JPEG XL quality 0..100
  (libjxl's quality -> Butteraugli distance mapping, quality 90 = distance 1.0); 100 selects
  true lossless (modular) mode. Caveats: lossy JPEG XL codes in the perceptual XYB space,
  which suits features worse than AVIF (about 3 dB lower at equal rate on smooth synthetic
  features), and libjxl's lossy decoder is conformant within a tolerance, not bit-exact
  across CPUs/SIMD paths: decode on the same kind of machine, or use AVIF.

Convention for both: **larger phi = more bits** (like the learned codecs' lambda), phi_range
(0, 100). Sides are padded to multiples of `stride` = 8 (replicate padding, see packing).
One string per scale; ``latent_shape = (H, W, bit_depth)``.

* ``"external"`` (`ExternalCommandCodec`): any encoder/decoder pair run as subprocesses from
  command templates, e.g. VTM's EncoderApp/DecoderApp. Raw files are planar 16-bit LE; see
  the class docstring.
"""
from __future__ import annotations

import math
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from tasks.codecs.base import FeatureCodec, MosaicCode, register_codec
from tasks.codecs.errors import CodecError  # defined there; re-exported here as before

__all__ = ["CodecError", "AvifCodec", "JpegXlCodec", "ExternalCommandCodec",
           "quantise_mosaic", "dequantise_mosaic", "write_raw_planar", "read_raw_planar"]


# --------------------------------------------------------------------------- samples


def quantise_mosaic(mosaic: torch.Tensor, bit_depth: int) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (3, H, W) uint16 in [0, 2**bit_depth - 1] (round half even)."""
    if mosaic.dim() != 3 or mosaic.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) mosaic, got shape {tuple(mosaic.shape)}")
    peak = (1 << bit_depth) - 1
    x = mosaic.detach().to("cpu", torch.float64).clamp(0.0, 1.0).numpy()
    return np.rint(x * peak).astype(np.uint16)


def dequantise_mosaic(samples: np.ndarray, bit_depth: int) -> torch.Tensor:
    """(3, H, W) integer samples -> float32 tensor in [0, 1]."""
    peak = (1 << bit_depth) - 1
    return torch.from_numpy(samples.astype(np.float32) / np.float32(peak))


def _check_bit_depth(bit_depth, allowed) -> int:
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or int(bit_depth) not in allowed:
        raise ValueError(f"bit_depth must be one of {allowed}, got {bit_depth!r}")
    return int(bit_depth)


def _unpack_latent_shape(code: MosaicCode, codec: str) -> tuple[int, int, int]:
    if len(code.latent_shape) != 3 or len(code.strings) != 1:
        raise CodecError(f"{codec}: expected one string and latent_shape (H, W, bit_depth), got "
                         f"{len(code.strings)} strings and latent_shape {tuple(code.latent_shape)}")
    h, w, bd = (int(v) for v in code.latent_shape)
    return h, w, bd


# --------------------------------------------------------------------------- imagecodecs


def _imagecodecs(feature: str):
    try:
        import imagecodecs
    except ImportError as e:  # pragma: no cover - imagecodecs is a project dependency
        raise CodecError("the classical codecs need the 'imagecodecs' package (pip install imagecodecs)") from e
    if not getattr(imagecodecs, feature).available:
        raise CodecError(f"this imagecodecs build ({imagecodecs.__version__}) lacks {feature}")
    return imagecodecs


class _ImageCodec(FeatureCodec):
    """Shared part: quantise, (3,H,W) -> (H,W,3) uint16, one image per scale, and back."""

    stride = 8
    phi_range = (0.0, 100.0)
    bit_depths: tuple[int, ...] = (8, 10, 12)

    def __init__(self, bit_depth: int = 10):
        self.bit_depth = _check_bit_depth(bit_depth, self.bit_depths)

    def quality(self, phi: float) -> int:
        low, high = self.phi_range
        phi = float(phi)
        if not (math.isfinite(phi) and low <= phi <= high):
            raise ValueError(f"codec {self.name!r}: phi={phi} is outside [{low}, {high}]")
        return int(round(phi))

    def _encode_image(self, image: np.ndarray, quality: int) -> bytes:
        raise NotImplementedError

    def _decode_image(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def encode_mosaic(self, mosaic: torch.Tensor, phi: float) -> MosaicCode:
        quality = self.quality(phi)
        samples = quantise_mosaic(mosaic, self.bit_depth)
        _, h, w = samples.shape
        image = np.ascontiguousarray(samples.transpose(1, 2, 0))
        if self.bit_depth == 8:
            image = image.astype(np.uint8)
        return MosaicCode([bytes(self._encode_image(image, quality))], (h, w, self.bit_depth))

    def decode_mosaic(self, code: MosaicCode, phi: float) -> torch.Tensor:
        h, w, bd = _unpack_latent_shape(code, self.name)
        if bd not in self.bit_depths:
            raise CodecError(f"{self.name}: unsupported bit depth {bd} in latent_shape")
        try:
            image = self._decode_image(code.strings[0])
        except RuntimeError as e:  # AvifError / JpegxlError
            raise CodecError(f"{self.name}: cannot decode the {len(code.strings[0])}-byte string: {e}") from e
        if image.shape != (h, w, 3):
            raise CodecError(f"{self.name}: decoded image has shape {image.shape}, expected {(h, w, 3)}")
        if int(image.max(initial=0)) > (1 << bd) - 1:
            raise CodecError(f"{self.name}: decoded samples exceed {bd} bits")
        return dequantise_mosaic(np.ascontiguousarray(image.transpose(2, 0, 1)), bd)


@register_codec("avif")
class AvifCodec(_ImageCodec):
    """AV1 intra (AVIF), YUV 4:4:4 with the identity matrix, libaom; phi = quality 0..100.

    `speed` is libaom's speed preset (0 slowest .. 10 fastest; libavif's default is about
    60x slower than 6 for 1% fewer bytes); `threads` the encoder/decoder threads (1 keeps
    runs reproducible and cheap on shared machines)."""

    name = "avif"

    def __init__(self, bit_depth: int = 10, speed: int = 6, threads: int = 1):
        super().__init__(bit_depth)
        self.ic = _imagecodecs("AVIF")
        if not 0 <= int(speed) <= 10:
            raise ValueError(f"speed must be in 0..10, got {speed}")
        self.speed = int(speed)
        self.threads = int(threads)

    def _encode_image(self, image: np.ndarray, quality: int) -> bytes:
        A = self.ic.AVIF
        return self.ic.avif_encode(
            image, level=quality, speed=self.speed, bitspersample=self.bit_depth,
            pixelformat=A.PIXEL_FORMAT.YUV444, matrix=A.MATRIX_COEFFICIENTS.IDENTITY,
            codec=A.CODEC_CHOICE.AOM, numthreads=self.threads)

    def _decode_image(self, data: bytes) -> np.ndarray:
        return self.ic.avif_decode(data, numthreads=self.threads)


@register_codec("jpegxl")
class JpegXlCodec(_ImageCodec):
    """JPEG XL (libjxl); phi = quality 0..100, 100 = lossless. `effort` 1..10 (libjxl default 7).
    Lossy decoding is not guaranteed bit-exact across CPU types (see the module docstring)."""

    name = "jpegxl"

    def __init__(self, bit_depth: int = 10, effort: int = 7, threads: int = 1):
        super().__init__(bit_depth)
        self.ic = _imagecodecs("JPEGXL")
        if not 1 <= int(effort) <= 10:
            raise ValueError(f"effort must be in 1..10, got {effort}")
        self.effort = int(effort)
        self.threads = int(threads)

    def _encode_image(self, image: np.ndarray, quality: int) -> bytes:
        if quality >= 100:  # libjxl's quality 100 is distance 0 but still lossy VarDCT
            return self.ic.jpegxl_encode(image, lossless=True, effort=self.effort,
                                         bitspersample=self.bit_depth, numthreads=self.threads)
        return self.ic.jpegxl_encode(image, level=quality, effort=self.effort,
                                     bitspersample=self.bit_depth, numthreads=self.threads)

    def _decode_image(self, data: bytes) -> np.ndarray:
        return self.ic.jpegxl_decode(data, numthreads=self.threads)


# --------------------------------------------------------------------------- external


def write_raw_planar(path: str | Path, samples: np.ndarray) -> None:
    """(3, H, W) samples -> planar uint16 little-endian file (plane 0, then 1, then 2)."""
    Path(path).write_bytes(np.ascontiguousarray(samples, dtype="<u2").tobytes())


def read_raw_planar(path: str | Path, height: int, width: int) -> np.ndarray:
    """Inverse of `write_raw_planar`; the size must be exactly 3 * H * W * 2 bytes."""
    data = Path(path).read_bytes()
    expected = 3 * height * width * 2
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} (3 x {height} x {width} uint16)")
    return np.frombuffer(data, dtype="<u2").reshape(3, height, width).astype(np.uint16)


_PLACEHOLDERS = ("input", "output", "width", "height", "bit_depth", "qp")


@register_codec("external")
class ExternalCommandCodec(FeatureCodec):
    """A codec run as external commands, e.g. VTM::

        ExternalCommandCodec(
            encode_cmd="EncoderApp -c encoder_intra_vtm.cfg -i {input} -b {output} -o /dev/null "
                       "-wdt {width} -hgt {height} -fr 1 -f 1 -q {qp} --InputBitDepth={bit_depth} "
                       "--InternalBitDepth={bit_depth} --OutputBitDepth={bit_depth} "
                       "--InputChromaFormat=444 --ChromaFormatIDC=444",
            decode_cmd="DecoderApp -b {input} -o {output} -d {bit_depth}",
            name="vtm")

    Templates are split with `shlex.split` and each word is then filled with
    ``str.format`` (so a path with spaces stays one argument; write a literal brace as
    ``{{``/``}}``), and run without a shell, in a fresh temporary directory (its cwd), with
    `timeout_s`. Placeholders: {input} {output} (absolute paths), {width} {height} (of the
    padded mosaic), {bit_depth}, {qp}.

    Files: the encoder's {input} and the decoder's {output} are raw planar images: 3 planes
    (mosaic channel 0, 1, 2 -- i.e. Y, Cb, Cr of a YUV 4:4:4 file, or R, G, B), each H*W
    samples in row-major order, each sample uint16 little-endian with a value in
    [0, 2**bit_depth - 1] (VTM's layout for bit depths above 8). The encoder's {output} is the
    bitstream, stored verbatim as the scale's one string; the decoder's {input} is that string.

    phi -> QP: ``qp = round(phi)`` by default, so for QP-driven encoders *larger phi = fewer
    bits*. Pass ``qp_max`` to use ``qp = qp_max - round(phi)`` instead, which restores the
    project convention (larger phi = more bits) e.g. with qp_max=51 and phi_range (0, 51).

    Failures (executable not found, non-zero exit, timeout, missing or wrongly sized output,
    out-of-range samples) raise `CodecError` naming the command, its exit code and the tail
    of its stderr.
    """

    name = "external"
    stride = 8

    def __init__(self, encode_cmd: str, decode_cmd: str, bit_depth: int = 10,
                 phi_range: tuple[float, float] = (0.0, 51.0), timeout_s: float = 600.0,
                 qp_max: int | None = None, name: str = "external", stride: int = 8):
        self.encode_cmd = str(encode_cmd)
        self.decode_cmd = str(decode_cmd)
        for which, tpl in (("encode_cmd", self.encode_cmd), ("decode_cmd", self.decode_cmd)):
            # fail early on a bad template (unknown placeholder, unbalanced quotes or braces)
            self._render(tpl, dict(input="in", output="out", width=64, height=64, bit_depth=10, qp=32), which)
        self.bit_depth = _check_bit_depth(bit_depth, tuple(range(1, 17)))
        low, high = (float(v) for v in phi_range)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"bad phi_range {phi_range!r}")
        self.phi_range = (low, high)
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.qp_max = None if qp_max is None else int(qp_max)
        self.name = str(name)
        if int(stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = int(stride)

    # -- helpers -------------------------------------------------------------------
    @staticmethod
    def _render(template: str, values: dict, which: str) -> list[str]:
        try:
            words = shlex.split(template)
            argv = [w.format(**values) for w in words]
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"bad {which} template {template!r}: {type(e).__name__}: {e}; "
                             f"placeholders are {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}") from None
        if not argv:
            raise ValueError(f"{which} template is empty")
        return argv

    def qp(self, phi: float) -> int:
        q = int(round(float(phi)))
        return q if self.qp_max is None else self.qp_max - q

    def _run(self, argv: list[str], cwd: str, what: str) -> bytes:
        """Run one command; return its stderr (for later messages) or raise CodecError."""
        cmd = shlex.join(argv)
        try:
            proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except FileNotFoundError as e:
            raise CodecError(f"{self.name} {what}: executable not found: {argv[0]!r} (command: {cmd}): {e}") from None
        except PermissionError as e:
            raise CodecError(f"{self.name} {what}: cannot execute {argv[0]!r} (command: {cmd}): {e}") from None
        except subprocess.TimeoutExpired as e:
            raise CodecError(f"{self.name} {what}: timed out after {self.timeout_s:g} s (command: {cmd}); "
                             f"stderr tail: {_tail(e.stderr)!r}") from None
        if proc.returncode != 0:
            raise CodecError(f"{self.name} {what}: exit code {proc.returncode} (command: {cmd}); "
                             f"stderr tail: {_tail(proc.stderr)!r}")
        return proc.stderr

    def _fail(self, what: str, argv: list[str], stderr: bytes, problem: str) -> CodecError:
        return CodecError(f"{self.name} {what}: {problem} (command: {shlex.join(argv)}, exit code 0); "
                          f"stderr tail: {_tail(stderr)!r}")

    # -- contract ------------------------------------------------------------------
    def encode_mosaic(self, mosaic: torch.Tensor, phi: float) -> MosaicCode:
        samples = quantise_mosaic(mosaic, self.bit_depth)
        _, h, w = samples.shape
        with tempfile.TemporaryDirectory(prefix="mfiba-ext-") as tmp:
            raw, bit = Path(tmp, "input.raw"), Path(tmp, "output.bin")
            write_raw_planar(raw, samples)
            argv = self._render(self.encode_cmd, dict(input=str(raw), output=str(bit), width=w, height=h,
                                                      bit_depth=self.bit_depth, qp=self.qp(phi)), "encode_cmd")
            stderr = self._run(argv, tmp, "encoder")
            if not bit.is_file():
                raise self._fail("encoder", argv, stderr, f"produced no output file {bit}")
            data = bit.read_bytes()
            if not data:
                raise self._fail("encoder", argv, stderr, "produced an empty bitstream")
        return MosaicCode([data], (h, w, self.bit_depth))

    def decode_mosaic(self, code: MosaicCode, phi: float) -> torch.Tensor:
        h, w, bd = _unpack_latent_shape(code, self.name)
        if not 1 <= bd <= 16:
            raise CodecError(f"{self.name}: bit depth {bd} in latent_shape is outside 1..16")
        with tempfile.TemporaryDirectory(prefix="mfiba-ext-") as tmp:
            bit, raw = Path(tmp, "input.bin"), Path(tmp, "output.raw")
            bit.write_bytes(code.strings[0])
            argv = self._render(self.decode_cmd, dict(input=str(bit), output=str(raw), width=w, height=h,
                                                      bit_depth=bd, qp=self.qp(phi)), "decode_cmd")
            stderr = self._run(argv, tmp, "decoder")
            if not raw.is_file():
                raise self._fail("decoder", argv, stderr, f"produced no output file {raw}")
            size, expected = raw.stat().st_size, 3 * h * w * 2
            if size != expected:
                raise self._fail("decoder", argv, stderr, f"output is {size} bytes, expected {expected} "
                                                  f"(3 planes x {h} x {w} x uint16 LE)")
            samples = read_raw_planar(raw, h, w)
        if int(samples.max(initial=0)) > (1 << bd) - 1:
            raise CodecError(f"{self.name} decoder: output samples reach {int(samples.max())}, "
                             f"above the {bd}-bit maximum {(1 << bd) - 1} (command: {shlex.join(argv)})")
        return dequantise_mosaic(samples, bd)


def _tail(stderr, limit: int = 800) -> str:
    if not stderr:
        return ""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, (bytes, bytearray)) else str(stderr)
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
