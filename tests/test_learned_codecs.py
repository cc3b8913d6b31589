"""Learned codecs (tasks/codecs/learned.py): tiny random-init compressai models.

One module fixture codes a small feature dict with every registered learned codec, saves
each codec and stream, and decodes them all in ONE fresh Python process (compressai's
import costs seconds), so the cross-process checks share that cost.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storage.bitstream import BitstreamError, decode_stream
from tasks.codecs.base import available_codecs, build_codec, derive_pool
from tasks.codecs.learned import ARCHITECTURES, LearnedCodec, load_codec, save_codec
from tasks.codecs.packing import NormParams, denormalise, normalise, pack, unpack

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"

ELIC_TINY = dict(N=16, M=32, groups=[4, 4, 8, 16])
CONFIGS = {
    "bmshj2018-hyperprior": dict(N=16, M=24, lmbda=[0.0067, 0.013]),  # a two-model family
    "mbt2018-mean": dict(N=16, M=24, lmbda=0.013),
    "mean-scale-vbr": dict(N=16, M=24),
    "elic": ELIC_TINY,
    "elic-chandelier": ELIC_TINY,
}
PHIS = {  # per scale; the VBR '2' sits between two anchors (0.0035, 0.0067)
    "bmshj2018-hyperprior": {"2": 0.0067, "3": 0.013},
    "mbt2018-mean": {"2": 0.013, "3": 0.013},
    "mean-scale-vbr": {"2": 0.005, "3": 0.0483},
    "elic": {"2": 0.013, "3": 0.013},
    "elic-chandelier": {"2": 0.013, "3": 0.013},
}
for _phis in PHIS.values():  # base.compress looks phi up for derived scales too (unused there)
    _phis["pool"] = _phis["3"]
NAMES = list(CONFIGS)


def make_features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    level3 = torch.randn(6, 16, 16, generator=g) + 1.0  # 2 tiles -> 64x64 mosaic
    return {
        "2": torch.randn(12, 32, 32, generator=g) * 3,  # 4 tiles 2x2 -> 64x64 mosaic
        "3": level3,
        "pool": derive_pool(level3),
    }


DECODER = r"""
import sys, time
import torch
torch.set_num_threads(2)  # the codec pins its own thread count; this must not matter
import tasks.codecs.learned as L
lazy = "compressai" not in sys.modules
work = sys.argv[1]
out = {"lazy_import": lazy}
for name in sys.argv[2:]:
    t = time.time()
    codec = L.load_codec(f"{work}/{name}.codec")
    data = open(f"{work}/{name}.mfbs", "rb").read()
    out[name] = dict(codec.decompress(data))
    out[name + ":sha"] = codec.checkpoint_sha256
    out[name + ":s"] = time.time() - t
torch.save(out, f"{work}/decoded.pt")
"""


def build(name: str, **overrides) -> LearnedCodec:
    """The registered codec, with the hyperprior models' analysis output amplified:
    random-init hyperprior latents are so small that every one quantises to zero
    (0 bits), which would leave the entropy coder nothing to do."""
    codec = build_codec(name, **{**CONFIGS[name], **overrides})
    if codec.layout != "hyperprior":
        return codec
    for model in codec.models:
        model.g_a[6].weight.data *= 100
    return LearnedCodec(codec.models, codec.lambdas, name=codec.name, architecture=codec.architecture,
                        kwargs=codec.kwargs, source=codec.source + ", g_a output x100")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    work = tmp_path_factory.mktemp("learned")
    features = make_features()
    result = {"features": features, "work": work, "times": {}}
    for name in NAMES:
        t = time.time()
        codec = build(name)
        data = codec.compress(features, PHIS[name], derived=("pool",))
        decoded = codec.decompress(data)
        result["times"][name] = time.time() - t
        save_codec(work / f"{name}.codec", codec)
        (work / f"{name}.mfbs").write_bytes(data)
        result[name] = (codec, data, decoded)
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    t = time.time()
    proc = subprocess.run([python, "-c", DECODER, str(work), *NAMES], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result["subprocess_s"] = time.time() - t
    result["remote"] = torch.load(work / "decoded.pt", weights_only=True)
    return result


# ----------------------------------------------------------------------------- registry


def test_all_learned_codecs_registered_and_module_imports_lazily(coded):
    assert set(ARCHITECTURES) <= set(available_codecs())
    assert coded["remote"]["lazy_import"], "importing tasks.codecs.learned imported compressai"


def test_random_init_is_labelled():
    codec = build_codec("mbt2018-mean", N=16, M=24)
    d = codec.describe()
    assert d["source"].startswith("random-init")
    assert d["kwargs"] == {"N": 16, "M": 24} and d["lambdas"] == [0.013]
    assert len(codec.checkpoint_sha256) == 32


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_shapes_and_derived_pool(coded, name):
    _codec, data, decoded = coded[name]
    features = coded["features"]
    assert list(decoded) == list(features)
    for scale, x in features.items():
        assert decoded[scale].shape == x.shape, scale
        assert decoded[scale].dtype == torch.float32
    assert torch.equal(decoded["pool"], derive_pool(decoded["3"]))
    _, parts = decode_stream(data)
    assert [p.derived for p in parts] == [False, False, True]


@pytest.mark.parametrize("name", NAMES)
def test_encode_is_deterministic_in_process(coded, name):
    codec, data, _ = coded[name]
    assert codec.compress(coded["features"], PHIS[name], derived=("pool",)) == data


def test_deterministic_context_skips_the_nan_fill_and_restores_torch_state():
    """Inside, deterministic algorithms without the NaN fill of new tensors (a cost, not a
    guarantee: decoding is bit exact without it, pinned above); outside, torch as it was."""
    from tasks.codecs.learned import _deterministic

    fill, deterministic = torch.utils.deterministic.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    with _deterministic(1):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert torch.utils.deterministic.fill_uninitialized_memory == fill
    assert torch.are_deterministic_algorithms_enabled() == deterministic


@pytest.mark.parametrize("name", NAMES)
def test_separate_process_decode_is_bit_exact(coded, name):
    codec, _data, decoded = coded[name]
    remote = coded["remote"]
    assert remote[name + ":sha"] == codec.checkpoint_sha256  # save/load keeps the identity
    for scale, x in decoded.items():
        assert torch.equal(remote[name][scale], x), f"{name} scale {scale} differs across processes"


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_eval_forward(coded, name):
    """The rANS round trip reproduces the synthesis of the quantised latent (forward x_hat)."""
    codec, data, decoded = coded[name]
    _, parts = decode_stream(data)
    for p in parts:
        if p.derived:
            continue
        x = coded["features"][p.scale]
        y, norm = normalise(x.float(), mode=codec.norm_mode)
        mosaic, info = pack(y, stride=codec.stride)
        assert norm.to_bytes() == p.norm
        x_hat, _bits = codec.forward_mosaic(mosaic, p.phi)
        code = codec.encode_mosaic(mosaic, p.phi)
        assert (codec.decode_mosaic(code, p.phi) - x_hat).abs().max() <= 1e-5
        via_forward = denormalise(unpack(x_hat, info), NormParams.from_bytes(p.norm))
        span = max(1.0, norm.high - norm.low)
        assert (decoded[p.scale] - via_forward).abs().max() <= 1e-5 * span, p.scale


@pytest.mark.parametrize("name", NAMES)
def test_real_bits_vs_estimate(coded, name, record_property):
    codec, data, _ = coded[name]
    _, parts = decode_stream(data)
    for p in parts:
        if p.derived:
            continue
        y, _ = normalise(coded["features"][p.scale].float(), mode=codec.norm_mode)
        mosaic, _ = pack(y, stride=codec.stride)
        real = 8 * sum(len(s) for s in p.strings)
        est = codec.estimate_bits(mosaic, p.phi)
        record_property(f"{name}:{p.scale}", {"real_bits": real, "estimated_bits": round(est, 1)})
        print(f"{name} scale {p.scale}: real {real} bits, estimated {est:.1f} bits")
        assert real > 0 and est > 0
        assert 0.2 < real / est < 20  # loose: tiny latents, random weights, rANS flush bytes


def test_timings_recorded(coded, record_property):
    record_property("encode+decode_s", {k: round(v, 3) for k, v in coded["times"].items()})
    record_property("subprocess_s", round(coded["subprocess_s"], 2))
    print("in-process s:", coded["times"], "subprocess s:", round(coded["subprocess_s"], 2))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", NAMES)
def test_flipped_bit_raises(coded, name):
    codec, data, _ = coded[name]
    for pos in (3, len(data) // 2, len(data) - 20, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(BitstreamError):
            codec.decompress(bytes(bad))


@pytest.mark.parametrize("name", NAMES)
def test_other_weights_refused(coded, name):
    _codec, data, _ = coded[name]
    other = build(name, seed=7)
    with pytest.raises(BitstreamError, match="checkpoint mismatch"):
        other.decompress(data)


def test_phi_outside_range_refused(coded):
    family = coded["bmshj2018-hyperprior"][0]
    assert family.phi_range == (0.0067, 0.013)
    for bad in (0.5, 0.001):
        with pytest.raises(ValueError, match=r"outside \[0.0067, 0.013\]"):
            family.compress({"3": coded["features"]["3"]}, bad)
    with pytest.raises(ValueError, match="not one of .*lambdas: 0.0067, 0.013"):
        family.compress({"3": coded["features"]["3"]}, 0.01)
    vbr = coded["mean-scale-vbr"][0]
    assert vbr.phi_range == (0.0018, 0.18)
    with pytest.raises(ValueError, match=r"outside \[0.0018, 0.18\]"):
        vbr.compress({"3": coded["features"]["3"]}, 0.2)
    with pytest.raises(ValueError, match="outside"):
        vbr.check_phi("3", float("nan"))


def test_codec_file_tamper_detected(coded, tmp_path):
    data = torch.load(coded["work"] / "mbt2018-mean.codec", weights_only=True)
    data["rate_points"][0]["state_dict"]["g_s.0.bias"][0] += 1.0
    torch.save(data, tmp_path / "bad.codec")
    with pytest.raises(ValueError, match="corrupt or was edited"):
        load_codec(tmp_path / "bad.codec")


# ----------------------------------------------------------------------------- VBR knob


def test_vbr_gain_interpolates_between_anchors(coded):
    vbr: LearnedCodec = coded["mean-scale-vbr"][0]
    gains = vbr.models[0].Gain.detach().abs()
    for lam, g in zip(vbr.lambdas, gains):
        assert vbr.gain_for(lam) == float(g)  # anchors: exactly compressai's s= setting
    phis = [0.0018, 0.003, 0.005, 0.0067, 0.02, 0.1, 0.18]
    gs = [vbr.gain_for(p) for p in phis]
    assert gs == sorted(gs) and len(set(gs)) == len(gs)
    loud = vbr  # amplified analysis output, see build()
    y, _ = normalise(coded["features"]["2"])
    mosaic, _ = pack(y)
    phis = (0.0018, 0.003, 0.0067, 0.02, 0.18)
    estimated = [loud.estimate_bits(mosaic, p) for p in phis]
    real = [8 * sum(len(s) for s in loud.encode_mosaic(mosaic, p).strings) for p in phis]
    print("VBR phi", phis, "estimated bits", [round(b) for b in estimated], "real bits", real)
    assert estimated == sorted(estimated) and estimated[0] < estimated[-1]
    assert real[0] < real[-1]


def test_vbr_anchor_matches_compressai_quality_index(coded):
    """At an anchor lambda our inputscale path codes exactly like compressai's s=."""
    vbr: LearnedCodec = coded["mean-scale-vbr"][0]
    y, _ = normalise(coded["features"]["2"])
    x = pack(y)[0][None]
    model = vbr.models[0]
    with torch.no_grad():
        ref = model.compress(x, stage=2, s=5)
    code = vbr.encode_mosaic(x[0], vbr.lambdas[5])
    assert code.strings == [s[0] for s in ref["strings"]]


# ----------------------------------------------------------------------------- checkpoints


def test_plain_state_dict_checkpoints_load(tmp_path):
    ref = build_codec("elic-chandelier", seed=3, **ELIC_TINY)
    state = ref.models[0].state_dict()
    torch.save(state, tmp_path / "plain.pth")
    # compressai-trainer style, DataParallel prefix and the newer latent-codec key layout
    newer = {}
    for k, v in state.items():
        k = k.replace("latent_codec.hyper.h_a.", "latent_codec.h_a.").replace(
            "latent_codec.hyper.h_s.", "latent_codec.h_s.").replace(
            "latent_codec.hyper.entropy_bottleneck.", "latent_codec.z.entropy_bottleneck.")
        newer["module." + k] = v
    torch.save({"epoch": 3, "state_dict": newer, "loss": 1.0}, tmp_path / "trainer.pth.tar")
    for path in ("plain.pth", "trainer.pth.tar"):
        codec = build_codec("elic-chandelier", checkpoint=str(tmp_path / path), lmbda=0.013)
        assert codec.kwargs == {"N": 16, "M": 32, "groups": [4, 4, 8, 16]}
        assert codec.checkpoint_sha256 == ref.checkpoint_sha256
        assert path in codec.describe()["source"] and "random-init" not in codec.describe()["source"]
    with pytest.raises(ValueError, match="lmbda"):
        build_codec("elic-chandelier", checkpoint=str(tmp_path / "plain.pth"))
    with pytest.raises(ValueError, match="N=32 given"):
        build_codec("elic-chandelier", checkpoint=str(tmp_path / "plain.pth"), N=32, lmbda=0.013)
    # a codec file goes through the same factory
    save_codec(tmp_path / "c.codec", ref)
    assert build_codec("elic-chandelier", checkpoint=str(tmp_path / "c.codec")).checkpoint_sha256 == ref.checkpoint_sha256
    with pytest.raises(ValueError, match="holds codec"):
        build_codec("elic", checkpoint=str(tmp_path / "c.codec"))


@pytest.mark.parametrize("name", ["mean-scale-vbr", "elic"])
def test_transforms_run_on_channels_last_input(name):
    """The codec feeds its analysis and synthesis NHWC input (oneDNN's faster layout on
    CPU), keeps the hyper networks on their own layout (the entropy parameters must not
    move), and hands back a contiguous x_hat; a second codec over the same models does not
    stack the hooks."""
    codec = build(name)
    net = codec.models[0]
    seen = {}

    def record(label, module):
        module.register_forward_pre_hook(lambda m, args: seen.__setitem__(
            label, args[0].stride(1) == 1))  # NHWC: channels adjacent in memory

    def first_conv(module):
        return next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))

    record("g_a", first_conv(net.g_a))
    record("g_s", first_conv(net.g_s))
    hyper = net.latent_codec["hyper"].h_s if hasattr(net, "latent_codec") else net.h_s
    record("h_s", first_conv(hyper))
    mosaic = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))  # z is 4x4: layouts differ
    x_hat, _ = codec.forward_mosaic(mosaic, PHIS[name]["2"])
    assert seen == {"g_a": True, "g_s": True, "h_s": False}
    assert x_hat.is_contiguous()
    hooks = len(net.g_s._forward_pre_hooks), len(net.g_a._forward_pre_hooks)
    LearnedCodec(codec.models, codec.lambdas, architecture=codec.architecture, update=False)
    assert (len(net.g_s._forward_pre_hooks), len(net.g_a._forward_pre_hooks)) == hooks


@pytest.mark.parametrize("inverse", [False, True])
def test_channels_last_gdn_matches_compressai_and_keeps_the_weights(inverse):
    """The GDN of the codecs' transforms: compressai's arithmetic on channels-last input as
    one matrix product (its 1x1 convolution otherwise takes torch's one-thread slow path),
    compressai's own forward on any other layout, and the same state_dict keys."""
    from compressai.layers import GDN

    from tasks.codecs.layers import ChannelsLastGDN, use_channels_last_gdn

    torch.manual_seed(0)
    reference = GDN(16, inverse=inverse)
    with torch.no_grad():  # away from the initial identity-like gamma, so a wrong transpose shows
        reference.gamma.add_(0.05 * torch.rand(16, 16))
        reference.beta.add_(0.1 * torch.rand(16))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), reference)
    keys = list(net.state_dict())
    x = torch.rand(2, 16, 9, 7)
    with torch.no_grad():
        want = reference(x)
        use_channels_last_gdn(net)
        assert type(net[1]) is ChannelsLastGDN and list(net.state_dict()) == keys
        got = net[1](x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net[1](x), want, rtol=0, atol=0)  # NCHW: compressai's forward
        # the reparametrised beta and gamma are cached without autograd: a weight change, in
        # place (as load_state_dict makes it) or by replacement, must reach the output
        for change in (lambda: reference.gamma.mul_(1.5),
                       lambda: setattr(reference, "beta", torch.nn.Parameter(reference.beta + 0.2))):
            change()
            want = GDN.forward(reference, x)
            torch.testing.assert_close(net[1](x.contiguous(memory_format=torch.channels_last)), want,
                                       rtol=1e-6, atol=1e-6)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    net[1](x_cl).sum().backward()  # trainable: no in-place step autograd needs
    assert x_cl.grad is not None and torch.isfinite(x_cl.grad).all()
    codec = build("mean-scale-vbr")
    assert {type(m) for m in codec.models[0].g_s.modules()} & {GDN, ChannelsLastGDN} == {ChannelsLastGDN}
