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
def test_synthesis_of_region_is_the_full_synthesis_cropped(latent, region):
    """Precoding synthesises only the packed region of a mosaic (not its stride padding):
    bit for bit what the full synthesis (the decoder's) gives there, on the first call of a
    shape (which checks the cut path) and after, at the demo scales' shapes and odd ones."""
    from tasks.codecs.layers import synthesis_of_region
    from tasks.codecs.learned import _deterministic

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    g_s = codec.models[0].g_s
    g = torch.Generator().manual_seed(1)
    with _deterministic(codec.threads):
        for _ in range(3):
            y_hat = torch.randn(1, g_s[0].in_channels, *latent, generator=g).mul(4).round()
            part = synthesis_of_region(g_s, y_hat, *region)
            assert part.shape[-2:] == region
            assert torch.equal(part, g_s(y_hat)[..., :region[0], :region[1]])


def test_synthesis_of_region_falls_back_where_the_cut_path_is_not_exact(monkeypatch):
    """A shape whose cut path sums differently (a kernel blocking it otherwise) is found on
    its first call and synthesised in full from then on."""
    from tasks.codecs import layers

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    g_s = codec.models[0].g_s
    cut = layers._cut_synthesis
    calls = []
    monkeypatch.setattr(layers, "_cut_synthesis", lambda *a: calls.append(1) or cut(*a).add(1e-6))
    y_hat = torch.randn(1, g_s[0].in_channels, 5, 6).round()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(layers.synthesis_of_region(g_s, y_hat, 70, 90), g_s(y_hat)[..., :70, :90])
    assert len(calls) == 1  # the check, on the first call only
    assert [v for k, v in layers._region_verdicts[g_s].items() if k[:3] == (tuple(y_hat.shape), 70, 90)] == [False]


def test_synthesis_of_region_runs_other_transforms_in_full():
    from tasks.codecs.layers import synthesis_of_region

    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1))  # reads its right neighbours
    y = torch.randn(1, 2, 9, 9)
    with torch.no_grad():
        assert torch.equal(synthesis_of_region(conv, y, 4, 5), conv(y)[..., :4, :5])
