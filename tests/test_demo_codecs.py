"""The committed demo codecs load from the demo preset and code demo-shaped features."""
from collections import OrderedDict

import pytest
import torch

from mfiba.config import load_config
from tasks.codecs.base import build_codec_from_spec

CFG = load_config("demo")
ROLES = [("main", CFG.codecs.main)] + list(CFG.codecs.others.items())


def _demo_features():
    g = torch.Generator().manual_seed(0)
    sizes = {"0": 64, "1": 32, "2": 16, "3": 8}
    feats = OrderedDict((s, torch.randn(64, n, n, generator=g)) for s, n in sizes.items())
    feats["pool"] = feats["3"][..., ::2, ::2]
    return feats


@pytest.mark.parametrize("role, spec", ROLES, ids=[r for r, _ in ROLES])
def test_committed_codec_codes_demo_features(role, spec):
    codec = build_codec_from_spec(spec, role, CFG.resolve_path)
    feats = _demo_features()
    low, high = spec.phis[0], spec.phis[-1]
    small, large = codec.compress(feats, low), codec.compress(feats, high)
    assert len(small) < len(large)
    decoded = codec.decompress(large)
    assert {s: tuple(v.shape) for s, v in decoded.items()} == {s: tuple(v.shape) for s, v in feats.items()}
    assert all(torch.isfinite(v).all() for v in decoded.values())


def test_missing_checkpoint_names_the_field(tmp_path):
    spec = CFG.codecs.others["vbr"].model_copy(update={"checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match="codecs.main.checkpoint"):
        build_codec_from_spec(spec, "main", CFG.resolve_path)
    with pytest.raises(ValueError, match="codecs.others.x.phis is empty"):
        build_codec_from_spec(spec.model_copy(update={"phis": []}), "x", CFG.resolve_path)


@pytest.mark.parametrize("role", ["vbr", "hyperprior", "main"])
def test_reconstruct_at_all_qualities_equals_one_at_a_time(role):
    """Precoding decodes every quality at once (the VBR model's analysis runs once): the
    result must be what `reconstruct_scale` gives quality by quality, bit for bit."""
    spec = CFG.codecs.others[role] if role != "main" else CFG.codecs.main
    codec = build_codec_from_spec(spec, role, CFG.resolve_path)
    feats = _demo_features()
    phis = list(spec.phis[:4])
    for scale in ("1", "pool"):
        together = codec.reconstruct_scale_multi(scale, feats[scale], phis)
        for phi, (x, bits) in zip(phis, together):
            x1, bits1 = codec.reconstruct_scale(scale, feats[scale], phi)
            assert torch.equal(x, x1) and bits == pytest.approx(bits1, rel=1e-12, abs=0)
        # Without the rate estimate (MFIP): the same decoded features.
        for (x, bits), (x0, _) in zip(codec.reconstruct_scale_multi(scale, feats[scale], phis, bits=False), together):
            assert torch.equal(x, x0) and (bits is None) == (role == "vbr")  # only VBR skips it


@pytest.mark.parametrize("latent, region", [((20, 20), (320, 320)), ((12, 12), (160, 160)), ((8, 8), (80, 80)),
                                            ((4, 4), (40, 40)), ((4, 4), (20, 20)), ((12, 8), (150, 97)),
                                            ((3, 5), (1, 1))])
def test_synthesis_of_a_region_is_the_full_synthesis_cropped(latent, region):
    """The decoder and precoding synthesise only the region of a mosaic unpack reads (not
    its stride padding): bit for bit what the full synthesis gives there, on the first call
    of a shape (which checks the cut path) and after, at the demo scales' shapes and odd
    ones."""
    from tasks.codecs.base import reading_region
    from tasks.codecs.layers import RegionSynthesis
    from tasks.codecs.learned import _deterministic

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    g_s = codec.models[0].g_s
    assert type(g_s) is RegionSynthesis
    g = torch.Generator().manual_seed(1)
    with _deterministic(codec.threads):
        for _ in range(3):
            y_hat = torch.randn(1, g_s[0].in_channels, *latent, generator=g).mul(4).round()
            full = g_s(y_hat)
            with reading_region(*region):
                part = g_s(y_hat)
            assert part.shape[-2:] == region
            assert torch.equal(part, full[..., :region[0], :region[1]])


def test_synthesis_of_a_region_falls_back_where_the_cut_path_is_not_exact(monkeypatch):
    """A shape whose cut path sums differently (a kernel blocking it otherwise) is found on
    its first call and synthesised in full from then on."""
    from tasks.codecs.base import reading_region
    from tasks.codecs.layers import RegionSynthesis

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    g_s = codec.models[0].g_s
    cut, calls = RegionSynthesis._cut, []
    monkeypatch.setattr(RegionSynthesis, "_cut", lambda *a: calls.append(1) or cut(*a).add(1e-6))
    y_hat = torch.randn(1, g_s[0].in_channels, 5, 6).round()
    with torch.no_grad():
        full = g_s(y_hat)[..., :70, :90]
        for _ in range(2):
            with reading_region(70, 90):
                assert torch.equal(g_s(y_hat), full)
    assert len(calls) == 1  # the check, on the first call only
    assert [ok for key, ok in g_s._region_verdicts.items() if key[:3] == ((1, 96, 5, 6), 70, 90)] == [False]


def test_decoder_outputs_the_region_read_and_the_same_features():
    """decompress leaves the padding out of the synthesis; the features are those of a
    full decode."""
    from storage.bitstream import decode_stream
    from tasks.codecs.base import MosaicCode
    from tasks.codecs.packing import NormParams, PackInfo, denormalise, unpack

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    feats = _demo_features()
    data = codec.compress(feats, CFG.codecs.others["vbr"].phis[2])
    decoded = codec.decompress(data)
    for p in decode_stream(data)[1]:
        info = PackInfo.from_dict(p.packing)
        full = codec.decode_mosaic(MosaicCode(p.strings, tuple(p.latent_shape)), p.phi)
        assert full.shape[-2:] == (info.padded_height, info.padded_width)
        assert torch.equal(decoded[p.scale], denormalise(unpack(full.clamp(0, 1), info), NormParams.from_bytes(p.norm)))


def test_only_plain_transposed_convolution_syntheses_are_cut():
    from tasks.codecs.layers import RegionSynthesis, use_region_synthesis

    plain = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 3, 5, 2, 2, 1))
    other = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 3, 5, 2, 2, 1), torch.nn.Conv2d(3, 3, 3, padding=1))
    use_region_synthesis(plain)
    use_region_synthesis(other)
    assert type(plain) is RegionSynthesis and type(other) is torch.nn.Sequential
