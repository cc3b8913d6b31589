"""Bitstream format v1: round trip, golden bytes, and refusal of every corrupt input.

Regenerate the golden file (only after a deliberate format change, with a version bump):
    MFIBA_REGEN_GOLDEN=1 .venv/bin/pytest -q tests/test_bitstream.py
"""
from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from storage.bitstream import (
    MAGIC,
    NO_CHECKPOINT,
    BitstreamError,
    ScalePayload,
    StreamHeader,
    decode_stream,
    encode_stream,
    part_sizes,
    read_stream,
    write_stream,
)

GOLDEN = Path(__file__).parent / "golden" / "bitstream" / "v1_example.bin"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def example_inputs() -> tuple[StreamHeader, list[ScalePayload]]:
    """Fixed inputs of the golden stream: one coded scale and one derived scale."""
    header = StreamHeader(codec="elic", checkpoint_sha256=bytes(range(32)))
    coded = ScalePayload(
        scale="3",
        feature_shape=(256, 25, 34),
        packing={"channels": 256, "group": 3, "grid_h": 9, "grid_w": 10},
        norm=struct.pack("<2f", -1.5, 2.25),
        phi=0.0035,
        strings=[bytes(range(1, 17)), b"\x80\x81\x82\x83\xfe\xff"],
        latent_shape=(320, 15, 22),
    )
    derived = ScalePayload(
        scale="pool",
        feature_shape=(256, 13, 17),
        packing={"kernel": 1, "stride": 2},
        norm=b"",
        phi=0.0,
        strings=[],
        latent_shape=(),
        derived=True,
    )
    return header, [coded, derived]


@pytest.fixture(scope="module")
def golden() -> bytes:
    if os.environ.get("MFIBA_REGEN_GOLDEN") == "1":
        write_stream(GOLDEN, encode_stream(*example_inputs()))
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; regenerate with MFIBA_REGEN_GOLDEN=1")
    return GOLDEN.read_bytes()


# --------------------------------------------------------------------------- an independent writer
# Written from the docstring's byte table, not from the module, so that it checks the
# documented layout and can build streams with valid CRCs but faulty contents.

def crc(b: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(b))


def raw_header(codec=b"elic", checkpoint=NO_CHECKPOINT, n_scales=1, version=1, magic=MAGIC) -> bytes:
    body = magic + bytes([version, len(codec)]) + codec + checkpoint + bytes([n_scales])
    return body + crc(body)


def raw_part(name=b"0", shape=(1, 2, 3), packing=b"{}", norm=b"", phi=0.0, flags=0,
             strings=(), latent=(), string_lengths=None) -> bytes:
    lengths = string_lengths or [len(s) for s in strings]
    body = (bytes([len(name)]) + name + struct.pack("<3I", *shape)
            + struct.pack("<H", len(packing)) + packing
            + struct.pack("<H", len(norm)) + norm
            + struct.pack("<dBH", phi, flags, len(lengths))
            + b"".join(struct.pack("<I", n) + s for n, s in zip(lengths, strings))
            + bytes([len(latent)]) + struct.pack(f"<{len(latent)}I", *latent))
    return body + crc(body)


def raw_stream(header: bytes, parts: list[bytes], total: int | None = None) -> bytes:
    body = header + b"".join(parts)
    trailer = struct.pack("<Q", total if total is not None else len(body) + 12)
    return body + trailer + crc(body + trailer)


def canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- round trip, golden


def test_round_trip():
    header, scales = example_inputs()
    data = encode_stream(header, scales)
    assert decode_stream(data, expected_codec="elic", expected_checkpoint=bytes(range(32))) == (header, scales)
    assert encode_stream(header, scales) == data  # deterministic


def test_golden_bytes_unchanged(golden):
    header, scales = example_inputs()
    assert encode_stream(header, scales) == golden, "format drifted: bump the version"
    assert decode_stream(golden) == (header, scales)
    assert 200 <= len(golden) <= 400


def test_layout_matches_documented_table(golden):
    header, scales = example_inputs()
    coded, derived = scales
    expected = raw_stream(
        raw_header(codec=b"elic", checkpoint=bytes(range(32)), n_scales=2),
        [raw_part(b"3", coded.feature_shape, canonical(coded.packing), coded.norm, coded.phi, 0,
                  coded.strings, coded.latent_shape),
         raw_part(b"pool", derived.feature_shape, canonical(derived.packing), b"", 0.0, 1)])
    assert expected == golden


def test_part_sizes_add_up(golden):
    sizes = part_sizes(golden)
    assert list(sizes) == ["header", "3", "pool", "trailer"]
    assert sum(sizes.values()) == len(golden)
    assert sizes["header"] == 43 + len("elic") and sizes["trailer"] == 12
    _, scales = example_inputs()
    for s in scales:
        assert sizes[s.scale] * 8 == s.bits


def test_empty_stream_round_trips():
    header = StreamHeader(codec="identity", checkpoint_sha256=NO_CHECKPOINT)
    data = encode_stream(header, [])
    assert decode_stream(data) == (header, [])
    assert part_sizes(data) == {"header": 43 + 8, "trailer": 12}


# --------------------------------------------------------------------------- corruption refused


def test_every_single_bit_flip_is_refused(golden):
    accepted = []
    for bit in range(8 * len(golden)):
        flipped = bytearray(golden)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            decode_stream(bytes(flipped))
            accepted.append(bit)
        except BitstreamError:
            pass  # any other exception type propagates and fails the test
    assert not accepted, f"bit flips accepted at bit positions {accepted[:20]}"


def test_every_truncation_is_refused(golden):
    for length in range(len(golden)):
        with pytest.raises(BitstreamError, match="truncated|not an mfiba"):
            decode_stream(golden[:length])


def test_truncation_message_names_sizes(golden):
    with pytest.raises(BitstreamError, match=rf"expected {len(golden)} bytes .*got {len(golden) - 5}"):
        decode_stream(golden[:-5])


def test_trailing_garbage_is_refused(golden):
    with pytest.raises(BitstreamError, match="trailing garbage: 3 bytes"):
        decode_stream(golden + b"abc")


def test_bad_magic_and_version(golden):
    with pytest.raises(BitstreamError, match="not an mfiba bitstream"):
        decode_stream(b"PNG\x89" + golden[4:])
    with pytest.raises(BitstreamError, match=r"unsupported .*version 2.*supports version\(s\) 1"):
        decode_stream(raw_stream(raw_header(version=2, n_scales=0), []))


def test_crc_mismatch_names_the_part(golden):
    sizes = part_sizes(golden)
    crc_of_part_1 = sizes["header"] + sizes["3"] + sizes["pool"] - 1
    broken = bytearray(golden)
    broken[crc_of_part_1] ^= 0xFF
    with pytest.raises(BitstreamError, match=r"CRC mismatch in part 1 .*bytes"):
        decode_stream(bytes(broken))


def test_wrong_codec_or_checkpoint_is_refused(golden):
    with pytest.raises(BitstreamError, match=r"codec 'elic' / checkpoint 00010203\.\.\..*this decoder has codec 'tcm'"):
        decode_stream(golden, expected_codec="tcm")
    with pytest.raises(BitstreamError, match=r"checkpoint mismatch.*00010203\.\.\..*this decoder has .*checkpoint ffffffff\.\.\."):
        decode_stream(golden, expected_codec="elic", expected_checkpoint=b"\xff" * 32)
    decode_stream(golden, expected_codec="elic", expected_checkpoint=bytes(range(32)))


def test_absurd_length_is_caught_before_allocation():
    claims_4gib = raw_part(b"0", strings=[b"xy"], string_lengths=[0xFFFFFFFF])
    data = raw_stream(raw_header(n_scales=1), [claims_4gib])
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError, match=r"part 0 .*strings\[0\] .*says 4294967295 bytes"):
            decode_stream(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# Streams whose CRCs are all valid but whose contents a correct writer never produces.
FAULTY_WRITER_CASES = {
    "codec name not UTF-8": (raw_header(codec=b"\xff\xfe", n_scales=0), [], "codec name"),
    "empty codec name": (raw_header(codec=b"", n_scales=0), [], "codec name .* empty"),
    "scale name not UTF-8": (raw_header(), [raw_part(name=b"\xc3")], "scale name is not UTF-8"),
    "reserved scale name": (raw_header(), [raw_part(name=b"trailer")], "invalid scale name"),
    "empty scale name": (raw_header(), [raw_part(name=b"")], "invalid scale name"),
    "duplicate scale": (raw_header(n_scales=2), [raw_part(), raw_part()], "duplicate scale name '0'"),
    "packing not JSON": (raw_header(), [raw_part(packing=b"{")], "not valid JSON"),
    "packing deeply nested": (raw_header(), [raw_part(packing=b"[" * 60000)], "not valid JSON|must be a dict"),
    "packing a list": (raw_header(), [raw_part(packing=b"[1]")], "must be a dict"),
    "packing float": (raw_header(), [raw_part(packing=b'{"a":1.5}')], "str to int"),
    "packing bool": (raw_header(), [raw_part(packing=b'{"a":true}')], "str to int"),
    "packing not canonical": (raw_header(), [raw_part(packing=b'{"b":1, "a":2}')], "canonical"),
    "phi NaN": (raw_header(), [raw_part(phi=float("nan"))], "phi is nan"),
    "phi inf": (raw_header(), [raw_part(phi=float("inf"))], "phi is inf"),
    "reserved flag bits": (raw_header(), [raw_part(flags=0x02)], "unknown flag bits 0x02"),
    "derived with strings": (raw_header(), [raw_part(flags=1, strings=[b"x"])], "derived scale carries 1"),
    "too few parts": (raw_header(n_scales=2), [raw_part()], "truncated or corrupt|CRC mismatch"),
}


@pytest.mark.parametrize("case", FAULTY_WRITER_CASES)
def test_faulty_writer_contents_are_refused(case):
    header, parts, message = FAULTY_WRITER_CASES[case]
    with pytest.raises(BitstreamError, match=message):
        decode_stream(raw_stream(header, parts))


def test_wrong_total_length_with_valid_crc_is_refused():
    header, parts = raw_header(), [raw_part()]
    real_total = len(header) + len(parts[0]) + 12
    with pytest.raises(BitstreamError, match=f"says {real_total + 1} bytes"):
        decode_stream(raw_stream(header, parts, total=real_total + 1))


# --------------------------------------------------------------------------- encoder refuses bad inputs


def _payload(**changes) -> ScalePayload:
    fields = dict(scale="0", feature_shape=(256, 8, 8), packing={"group": 3}, norm=b"\0" * 8,
                  phi=1.0, strings=[b"s"], latent_shape=(4, 2, 2))
    return ScalePayload(**{**fields, **changes})


@pytest.mark.parametrize("header, scales, message", [
    (StreamHeader("x" * 256, NO_CHECKPOINT), [], "codec name"),
    (StreamHeader("", NO_CHECKPOINT), [], "codec name"),
    (StreamHeader("elic", b"short"), [], "32 raw bytes"),
    (StreamHeader("elic", NO_CHECKPOINT, version=2), [], "version 2"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(), _payload()], "duplicate"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(scale="header")], "reserved"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(packing={"a": 0.5})], "str to int"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(packing={"a": True})], "str to int"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(phi=float("nan"))], "finite"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(derived=True)], "derived"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(feature_shape=(1, 2))], r"\(C, H, W\)"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(feature_shape=(1, 2, -3))], "uint32"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(norm=b"\0" * 70000)], "at most 65535"),
    (StreamHeader("elic", NO_CHECKPOINT), [_payload(strings=["text"])], r"strings\[0\] must be bytes"),
])
def test_encoder_refuses_invalid_inputs(header, scales, message):
    with pytest.raises(ValueError, match=message):
        encode_stream(header, scales)


# --------------------------------------------------------------------------- files


def test_write_read_local_is_atomic(tmp_path, golden):
    target = tmp_path / "streams" / "000000000139.mfbs"
    write_stream(target, golden)
    assert read_stream(target) == golden
    assert read_stream(f"file://{target}") == golden
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left


def test_write_read_fsspec_url(golden):
    url = "memory://mfiba-test/streams/000000000139.mfbs"
    write_stream(url, golden)
    assert read_stream(url) == golden


# --------------------------------------------------------------------------- fuzz


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: MAGIC + b"\x01" + b)))
def test_fuzz_random_bytes_raise_only_bitstream_error(data):
    with pytest.raises(BitstreamError):
        decode_stream(data)


_mutation = st.one_of(
    st.tuples(st.just("xor"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
)


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, position, arg in mutations:
        at = position % (len(out) + 1)
        if kind == "xor" and at < len(out):
            out[at] ^= arg
        elif kind == "insert":
            out[at:at] = arg
        elif kind == "delete":
            del out[at:at + arg]
        elif kind == "overwrite":
            out[at:at + len(arg)] = arg
    return bytes(out)


@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_streams_raise_only_bitstream_error(golden, mutations):
    mutated = _mutate(golden, mutations)
    assume(mutated != golden)
    with pytest.raises(BitstreamError):
        decode_stream(mutated)


_raw_parts = st.builds(
    raw_part,
    name=st.one_of(st.binary(max_size=6), st.sampled_from([b"0", b"1", b"pool", b"header"])),
    packing=st.one_of(st.binary(max_size=20),
                      st.dictionaries(st.text(max_size=4), st.integers(-2**40, 2**40), max_size=3).map(canonical),
                      st.sampled_from([b'{"a":1.0}', b'{"a":null}', b'{"b":1,"a":2}', b"[]"])),
    norm=st.binary(max_size=10),
    phi=st.floats(allow_nan=True, allow_infinity=True),
    flags=st.integers(0, 255),
    strings=st.lists(st.binary(max_size=8), max_size=3),
    latent=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)


@FUZZ
@given(codec=st.binary(max_size=6), parts=st.lists(_raw_parts, max_size=3),
       n_scales_offset=st.sampled_from([0, 0, 0, 1, -1]))
def test_fuzz_valid_crcs_faulty_fields(codec, parts, n_scales_offset):
    """CRCs all valid, field contents arbitrary: either a clean refusal, or a stream that
    decodes faithfully (re-encoding gives back exactly the same bytes)."""
    n_scales = max(0, len(parts) + n_scales_offset)
    data = raw_stream(raw_header(codec=codec, n_scales=n_scales), parts)
    try:
        header, scales = decode_stream(data)
    except BitstreamError:
        return
    assert encode_stream(header, scales) == data


_names = st.text(min_size=1, max_size=8).filter(lambda s: s not in ("header", "trailer"))


@FUZZ
@given(codec=st.text(min_size=1, max_size=20), checkpoint=st.binary(min_size=32, max_size=32),
       scales=st.lists(st.builds(
           ScalePayload,
           scale=_names,
           feature_shape=st.tuples(*[st.integers(0, 2**32 - 1)] * 3),
           packing=st.dictionaries(st.text(max_size=6), st.integers(-2**63, 2**63), max_size=4),
           norm=st.binary(max_size=8),
           phi=st.floats(allow_nan=False, allow_infinity=False),
           strings=st.lists(st.binary(max_size=20), max_size=4),
           latent_shape=st.lists(st.integers(0, 2**32 - 1), max_size=4).map(tuple),
       ), max_size=5, unique_by=lambda s: s.scale))
def test_fuzz_round_trip_of_valid_inputs(codec, checkpoint, scales):
    header = StreamHeader(codec=codec, checkpoint_sha256=checkpoint)
    data = encode_stream(header, scales)
    assert decode_stream(data, expected_codec=codec, expected_checkpoint=checkpoint) == (header, scales)
    sizes = part_sizes(data)
    assert sum(sizes.values()) == len(data)
    assert all(sizes[s.scale] * 8 == s.bits for s in scales)
