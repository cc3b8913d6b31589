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
