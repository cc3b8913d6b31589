"""Classical anchors (AVIF / JPEG XL via imagecodecs) and the external-command codec."""
from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storage.bitstream import BitstreamError
from tasks.codecs.base import MosaicCode, available_codecs, build_codec
from tasks.codecs.classical import (CodecError, ExternalCommandCodec, dequantise_mosaic, quantise_mosaic,
                                    read_raw_planar, write_raw_planar)

CLASSICAL = ["avif", "jpegxl"]


def smooth_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two small FPN-like scales: smooth random fields with a per-channel offset and scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for scale, (c, s) in {"0": (64, 16), "1": (64, 8)}.items():
        noise = torch.randn(1, c, s + 4, s + 4, generator=g)
        x = F.avg_pool2d(noise, 5, 1)[0]
        x = x * (1 + torch.rand(c, 1, 1, generator=g)) + torch.randn(c, 1, 1, generator=g)
        out[scale] = x.contiguous()
    return out


def mse(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum(a[k].numel() for k in a))


def test_registered():
    assert {"avif", "jpegxl", "external"} <= set(available_codecs())
    for name in CLASSICAL:
        codec = build_codec(name)
        assert codec.name == name and codec.phi_range == (0.0, 100.0) and codec.stride == 8
        assert codec.bit_depth == 10


@pytest.mark.parametrize("name", CLASSICAL)
def test_roundtrip_rate_and_distortion(name):
    codec = build_codec(name)
    feats = smooth_features()
    sizes, errors = [], []
    for phi in (30, 90):
        data = codec.compress(feats, phi)
        rec = codec.decompress(data)
        assert list(rec) == list(feats)
        for k in feats:
            assert rec[k].shape == feats[k].shape and rec[k].dtype == torch.float32
            assert torch.isfinite(rec[k]).all()
        sizes.append(len(data))
        errors.append(mse(feats, rec))
    assert sizes[1] > sizes[0], sizes  # larger phi = more bits ...
    assert errors[1] < errors[0], errors  # ... and less distortion
    # Per-scale phi dict, and a truncated or damaged stream is refused.
    data = codec.compress(feats, {"0": 50, "1": 70})
    assert codec.decompress(data)["1"].shape == feats["1"].shape
    for bad in (data[:-1], data[: len(data) // 2], data[:-20] + bytes(20)):
        with pytest.raises(BitstreamError):
            codec.decompress(bad)
    with pytest.raises(ValueError, match="outside"):
        codec.compress(feats, 101)


@pytest.mark.parametrize("name", CLASSICAL)
def test_reconstruct_at_several_phis_equals_real_round_trips(name):
    """Precoding reconstructs a scale at every quality from one normalisation and packing;
    each result must be the real stream's decode, bit for bit, and its bits the payload's."""
    codec = build_codec(name)
    x = smooth_features()["0"]
    phis = [20, 50, 90]
    for phi, (decoded, bits) in zip(phis, codec.reconstruct_scale_multi("0", x, phis)):
        payload = codec.compress_scale("0", x, phi)
        assert torch.equal(decoded, codec.decompress_scale(payload))
        assert bits == 8 * sum(len(s) for s in payload.strings)
    single, bits = codec.reconstruct_scale("0", x, 50)
    assert torch.equal(single, codec.decompress_scale(codec.compress_scale("0", x, 50)))


@pytest.mark.parametrize("name,bit_depth", [("avif", 10), ("avif", 12), ("avif", 8), ("jpegxl", 10)])
def test_lossless_at_phi_100(name, bit_depth):
    codec = build_codec(name, bit_depth=bit_depth)
    peak = (1 << bit_depth) - 1
    g = torch.Generator().manual_seed(1)
    mosaic = torch.randint(0, peak + 1, (3, 24, 40), generator=g).float() / peak
    code = codec.encode_mosaic(mosaic, 100)
    assert len(code.strings) == 1 and code.latent_shape == (24, 40, bit_depth)
    out = codec.decode_mosaic(code, 100)
    assert np.array_equal(quantise_mosaic(out, bit_depth), quantise_mosaic(mosaic, bit_depth))
    assert torch.equal(out, dequantise_mosaic(quantise_mosaic(mosaic, bit_depth), bit_depth))


def test_decode_garbage_raises_codec_error():
    codec = build_codec("avif")
    with pytest.raises(CodecError, match="cannot decode"):
        codec.decode_mosaic(MosaicCode([b"\0" * 64], (8, 8, 10)), 50)
    good = codec.encode_mosaic(torch.rand(3, 8, 16), 50)
    with pytest.raises(CodecError, match="shape"):
        codec.decode_mosaic(MosaicCode(good.strings, (16, 8, 10)), 50)


def test_decode_in_fresh_process_is_bit_exact(tmp_path):
    feats = smooth_features(seed=3)
    expected = {}
    for name in CLASSICAL:
        codec = build_codec(name)
        data = codec.compress(feats, 60)
        (tmp_path / f"{name}.bin").write_bytes(data)
        expected[name] = codec.decompress(data)
    script = textwrap.dedent(f"""
        import numpy as np
        import tasks.codecs.classical
        from tasks.codecs.base import build_codec
        for name in {CLASSICAL!r}:
            rec = build_codec(name).decompress(open({str(tmp_path)!r} + f"/{{name}}.bin", "rb").read())
            np.savez({str(tmp_path)!r} + f"/{{name}}.npz", **{{k: v.numpy() for k, v in rec.items()}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    for name in CLASSICAL:
        other = np.load(tmp_path / f"{name}.npz")
        assert sorted(other.files) == sorted(expected[name])
        for k, v in expected[name].items():
            assert np.array_equal(other[k], v.numpy()), (name, k)


# --------------------------------------------------------------------------- external

TOY_CODEC = r'''
import sys, zlib, struct, time
import numpy as np

mode = sys.argv[1]
if mode == "enc":  # enc INPUT OUTPUT QP WIDTH HEIGHT BIT_DEPTH
    src, dst, qp, w, h, bd = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8])
    x = np.fromfile(src, dtype="<u2")
    assert x.size == 3 * w * h, (x.size, w, h)
    assert int(x.max()) < (1 << bd)
    shift = max(0, min(qp, bd - 1))
    open(dst, "wb").write(struct.pack("<BHH", shift, w, h) + zlib.compress((x >> shift).astype("<u2").tobytes(), 9))
elif mode == "dec":  # dec INPUT OUTPUT
    data = open(sys.argv[2], "rb").read()
    shift, w, h = struct.unpack("<BHH", data[:5])
    y = np.frombuffer(zlib.decompress(data[5:]), dtype="<u2").astype(np.uint32) << shift
    if shift:
        y = y + (1 << (shift - 1))
    y.astype("<u2").tofile(sys.argv[3])
elif mode == "fail":
    sys.stderr.write("toy codec: reading config...\nerror: boom, unsupported option\n")
    sys.exit(3)
elif mode == "short":
    open(sys.argv[3], "wb").write(b"\0" * 10)
elif mode == "sleep":
    time.sleep(30)
'''


@pytest.fixture
def toy(tmp_path):
    script = tmp_path / "toy codec.py"  # a space in the path: arguments must survive quoting
    script.write_text(TOY_CODEC)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def toy_codec(toy, **kw) -> ExternalCommandCodec:
    kw.setdefault("encode_cmd", f"{toy} enc {{input}} {{output}} {{qp}} {{width}} {{height}} {{bit_depth}}")
    kw.setdefault("decode_cmd", f"{toy} dec {{input}} {{output}}")
    kw.setdefault("phi_range", (0, 9))
    return ExternalCommandCodec(**kw)


def test_external_roundtrip(toy):
    codec = toy_codec(toy)
    assert isinstance(build_codec("external", encode_cmd="a {input}", decode_cmd="b"), ExternalCommandCodec)
    feats = smooth_features()
    sizes, errors = [], []
    for phi in (0, 4):  # qp = round(phi): larger qp -> fewer bits
        data = codec.compress(feats, phi)
        rec = codec.decompress(data)
        assert {k: v.shape for k, v in rec.items()} == {k: v.shape for k, v in feats.items()}
        sizes.append(len(data))
        errors.append(mse(feats, rec))
    assert sizes[0] > sizes[1] and errors[0] < errors[1]
    # qp 0 is lossless: the mosaic comes back exactly at 10 bits.
    mosaic = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(2))
    out = codec.decode_mosaic(codec.encode_mosaic(mosaic, 0), 0)
    assert torch.equal(out, dequantise_mosaic(quantise_mosaic(mosaic, 10), 10))
    # qp_max restores "larger phi = more bits".
    inverted = toy_codec(toy, qp_max=9)
    assert inverted.qp(9) == 0 and inverted.qp(0) == 9
    assert len(inverted.compress(feats, 9)) > len(inverted.compress(feats, 5))
    with pytest.raises(BitstreamError):
        codec.decompress(data[:-3])


def test_external_raw_layout(tmp_path, toy):
    codec = toy_codec(toy, bit_depth=12)
    mosaic = torch.stack([torch.full((8, 16), v) for v in (0.0, 0.5, 1.0)])
    mosaic[0, 1, 2] = 1.0
    code = codec.encode_mosaic(mosaic, 0)
    assert code.latent_shape == (8, 16, 12)
    raw = np.frombuffer(zlib.decompress(code.strings[0][5:]), dtype="<u2").reshape(3, 8, 16)
    assert raw[0, 1, 2] == 4095 and raw[0].sum() == 4095  # planar, row-major
    assert (raw[1] == 2048).all() and (raw[2] == 4095).all()
    samples = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    write_raw_planar(tmp_path / "x.raw", samples)
    assert (tmp_path / "x.raw").read_bytes()[:4] == b"\x00\x00\x01\x00"  # little-endian
    assert np.array_equal(read_raw_planar(tmp_path / "x.raw", 4, 5), samples)


def test_external_errors(toy):
    mosaic = torch.rand(3, 8, 8)
    missing = ExternalCommandCodec("/nonexistent/EncoderApp -i {input} -b {output}", "DecoderApp")
    with pytest.raises(CodecError, match="not found.*/nonexistent/EncoderApp"):
        missing.encode_mosaic(mosaic, 30)

    failing = toy_codec(toy, encode_cmd=f"{toy} fail {{input}} {{output}}")
    with pytest.raises(CodecError, match="exit code 3") as err:
        failing.encode_mosaic(mosaic, 3)
    assert "boom, unsupported option" in str(err.value) and "fail" in str(err.value)

    short = toy_codec(toy, decode_cmd=f"{toy} short {{input}} {{output}}")
    code = short.encode_mosaic(mosaic, 2)
    with pytest.raises(CodecError, match="10 bytes, expected 384"):
        short.decode_mosaic(code, 2)

    no_output = toy_codec(toy, encode_cmd=f"{toy} fail-not {{input}} {{output}}")
    with pytest.raises(CodecError, match="no output file"):
        no_output.encode_mosaic(mosaic, 2)

    slow = toy_codec(toy, encode_cmd=f"{toy} sleep {{input}} {{output}}", timeout_s=1)
    with pytest.raises(CodecError, match="timed out"):
        slow.encode_mosaic(mosaic, 2)

    with pytest.raises(ValueError, match="placeholder"):
        ExternalCommandCodec("enc {input} {quality}", "dec {input} {output}")
