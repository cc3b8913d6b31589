"""LIC-TCM (tasks/codecs/tcm.py): window attention, the model, and codec "lic-tcm".

The model tests use a tiny configuration (TINY_KWARGS) on 64x64 inputs; the registered
codec codes a small feature dict and one fresh Python process decodes it (pattern of
tests/test_learned_codecs.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.bitstream import decode_stream
from tasks.codecs import tcm as T
from tasks.codecs.base import available_codecs, build_codec, derive_pool
from tasks.codecs.learned import LearnedCodec, _deterministic, load_codec, save_codec
from tasks.codecs.packing import normalise, pack

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
TINY = dict(T.TINY_KWARGS)
PHIS = {"2": 0.013, "3": 0.013, "pool": 0.013}


def amplify(model) -> None:
    """Random-init analysis outputs are so small that nearly every latent quantises to its
    mean; scale the last conv of g_a and h_a so the entropy coder has symbols to code."""
    model.g_a[-1].weight.data *= 30
    model.h_a[-1].weight.data *= 30


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = T.TCM(**TINY)
    amplify(model)
    return model


# ----------------------------------------------------------------------------- window attention


def _reference_attention(m: T.WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """O((HW)^2) definition: token (i, j) attends to the tokens of its window on the grid
    offset by the shift (no wrap-around), with bias indexed by the relative offset."""
    B, H, W, C = x.shape
    ws, s, heads, hd = m.window_size, m.shift, m.num_heads, m.head_dim
    q, k, v = m.embedding_layer(x).view(B, H * W, 3, heads, hd).unbind(2)
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ii, jj = ii.flatten() - s, jj.flatten() - s
    gi, gj = torch.div(ii, ws, rounding_mode="floor"), torch.div(jj, ws, rounding_mode="floor")
    same = (gi[:, None] == gi[None]) & (gj[:, None] == gj[None])
    L = 2 * ws - 1  # offsets between different windows fall outside the table; they are masked
    bias = m.relative_position_params[:, (ii[:, None] - ii[None] + ws - 1).clamp(0, L - 1),
                                      (jj[:, None] - jj[None] + ws - 1).clamp(0, L - 1)]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * m.scale + bias
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, H * W, C)
    return m.linear(out).view(B, H, W, C)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (2, 2)])
def test_window_attention_matches_bruteforce(shifted, hw):
    torch.manual_seed(1)
    m = T.WindowAttention(dim=8, head_dim=4, window_size=4, shifted=shifted)
    x = torch.randn(2, *hw, 8)
    with torch.no_grad():
        assert torch.allclose(m(x), _reference_attention(m, x), atol=1e-5)


def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 3)
    w = T.window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 16, 3)
    assert torch.equal(T.window_reverse(w, 4, 8, 12), x)


# ----------------------------------------------------------------------------- the model


def test_forward_shapes_and_training_step():
    model = tiny_model()
    x = torch.rand(1, 3, 64, 64)
    out = model(x)  # training mode: noisy likelihoods, STE rounding
    bits = sum(-torch.log2(v).sum() for v in out["likelihoods"].values())
    loss = bits / x[0, 0].numel() + 0.013 * 255**2 * torch.mean((out["x_hat"] - x) ** 2)
    loss.backward()
    assert model.g_a[0].conv1.weight.grad.abs().sum() > 0
    assert model.g_a[1].trans_block.msa.relative_position_params.grad.abs().sum() > 0
    aux = model.aux_loss()
    assert torch.isfinite(aux)
    aux.backward()
    model.eval()
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (2, TINY["M"], 4, 8)
    assert out["likelihoods"]["z"].shape == (2, TINY["z_channels"], 1, 2)


def test_rans_roundtrip_equals_eval_forward():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with _deterministic(1):
        model.update(force=True)
        ref = model(x)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    y_strings, z_strings = enc["strings"]
    assert len(y_strings) == len(z_strings) == 2 and tuple(enc["shape"]) == (1, 1)
    assert min(len(s) for s in y_strings) > 100  # the latents are not all at their means
    assert dec["x_hat"].shape == x.shape
    assert (dec["x_hat"] - ref["x_hat"].clamp(0, 1)).abs().max() <= 1e-5
    real = 8 * sum(len(s) for s in y_strings)
    est = float(-torch.log2(ref["likelihoods"]["y"]).sum())
    assert 0.5 < real / est < 2


def test_paper_parameter_counts():
    counts = {N: sum(p.numel() for p in T.TCM(N=N).parameters()) for N in (128, 64)}
    print("TCM parameters:", counts)
    assert counts == {128: 76_568_148, 64: 45_180_752}


# ----------------------------------------------------------------------------- codec "lic-tcm"


def make_features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    level3 = torch.randn(6, 16, 16, generator=g) + 1.0  # 2 tiles -> 64x64 mosaic
    return {"2": torch.randn(12, 32, 32, generator=g) * 3, "3": level3, "pool": derive_pool(level3)}


def build(**overrides) -> LearnedCodec:
    codec = build_codec("lic-tcm", **{**TINY, "lmbda": 0.013, **overrides})
    for model in codec.models:
        amplify(model)
    return LearnedCodec(codec.models, codec.lambdas, name=codec.name, architecture=codec.architecture,
                        kwargs=codec.kwargs, source=codec.source + ", g_a/h_a output x30")


DECODER = r"""
import sys
import torch
torch.set_num_threads(2)  # the codec pins its own thread count
import tasks.codecs.tcm as T
lazy = "compressai" not in sys.modules
codec = T.load_tcm_codec(sys.argv[1] + "/tcm.codec")
decoded = dict(codec.decompress(open(sys.argv[1] + "/tcm.mfbs", "rb").read()))
torch.save({"lazy_import": lazy, "decoded": decoded, "sha": codec.checkpoint_sha256}, sys.argv[1] + "/decoded.pt")
"""


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    work = tmp_path_factory.mktemp("tcm")
    features = make_features()
    codec = build()
    data = codec.compress(features, PHIS, derived=("pool",))
    decoded = codec.decompress(data)
    save_codec(work / "tcm.codec", codec)
    (work / "tcm.mfbs").write_bytes(data)
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    proc = subprocess.run([python, "-c", DECODER, str(work)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(work / "decoded.pt", weights_only=True)
    return {"work": work, "features": features, "codec": codec, "data": data, "decoded": decoded, "remote": remote}


def test_registered_and_described(coded):
    assert "lic-tcm" in available_codecs()
    d = coded["codec"].describe()
    assert d["codec"] == "lic-tcm" and d["architecture"] == "TCM" and d["lambdas"] == [0.013]
    assert d["kwargs"] == T.tcm_kwargs(**TINY)
    assert coded["remote"]["lazy_import"], "importing tasks.codecs.tcm imported compressai"


def test_codec_roundtrip_and_separate_process_bit_exact(coded):
    codec, data, decoded, features = coded["codec"], coded["data"], coded["decoded"], coded["features"]
    assert list(decoded) == list(features)
    for scale, x in features.items():
        assert decoded[scale].shape == x.shape and decoded[scale].dtype == torch.float32
    assert torch.equal(decoded["pool"], derive_pool(decoded["3"]))
    assert codec.compress(features, PHIS, derived=("pool",)) == data  # deterministic encode
    remote = coded["remote"]
    assert remote["sha"] == codec.checkpoint_sha256
    for scale, x in decoded.items():
        assert torch.equal(remote["decoded"][scale], x), f"scale {scale} differs across processes"


def test_codec_decode_equals_eval_forward(coded):
    codec = coded["codec"]
    _, parts = decode_stream(coded["data"])
    for p in parts:
        if p.derived:
            continue
        mosaic, _ = pack(normalise(coded["features"][p.scale].float(), mode=codec.norm_mode)[0], stride=codec.stride)
        x_hat, bits = codec.forward_mosaic(mosaic, p.phi)
        assert bits > 0 and len(p.strings) == 2 and sum(map(len, p.strings)) > 50
        assert (codec.decode_mosaic(codec.encode_mosaic(mosaic, p.phi), p.phi) - x_hat).abs().max() <= 1e-5


def test_checkpoints_load_through_the_factory(coded, tmp_path):
    ref = coded["codec"]
    # a codec file
    same = build_codec("lic-tcm", checkpoint=str(coded["work"] / "tcm.codec"))
    assert same.checkpoint_sha256 == ref.checkpoint_sha256
    with pytest.raises(ValueError, match="N=64 given"):
        build_codec("lic-tcm", checkpoint=str(coded["work"] / "tcm.codec"), N=64)
    # a plain state_dict in a trainer checkpoint with DataParallel prefixes (the authors' layout)
    state = {"module." + k: v for k, v in ref.models[0].state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "trainer.pth.tar")
    rest = {k: v for k, v in TINY.items() if k not in ("N", "M", "z_channels")}  # those are read off the shapes
    plain = build_codec("lic-tcm", checkpoint=str(tmp_path / "trainer.pth.tar"), lmbda=0.013, **rest)
    assert plain.kwargs == ref.kwargs and plain.checkpoint_sha256 == ref.checkpoint_sha256
    with pytest.raises(ValueError, match="lmbda"):
        build_codec("lic-tcm", checkpoint=str(tmp_path / "trainer.pth.tar"), **rest)
    with pytest.raises(ValueError, match="does not fit"):
        build_codec("lic-tcm", checkpoint=str(tmp_path / "trainer.pth.tar"), lmbda=0.013, **{**rest, "config": [2] * 6})


def test_learned_load_codec_rebuilds_tcm(coded):
    """Needs the TCM hook in tasks/codecs/learned.py (_new_model); skipped until it is there."""
    try:
        codec = load_codec(coded["work"] / "tcm.codec")
    except ValueError as e:
        if "unknown compressai architecture 'TCM'" in str(e):
            pytest.skip("learned.load_codec cannot build TCM yet (hook pending in learned.py)")
        raise
    assert codec.checkpoint_sha256 == coded["codec"].checkpoint_sha256
