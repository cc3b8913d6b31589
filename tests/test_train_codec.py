"""Codec training (tasks/codecs/training.py) on a tiny fake feature store: datasets, a few
steps of a tiny ScaleHyperprior, resume from last.pt, the codec file and its curves."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from storage.feature_store import FeatureStore
from tasks.codecs.packing import normalise, pack
from tasks.codecs.training import (BatchStream, CodecTrainSettings, MosaicDataset, RGBImageDataset, SampleStream,
                                   make_loader, random_crop, read_state, train_codec_family, train_rate_point)

STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
SIZES = {"0": 32, "1": 16, "2": 8, "3": 4, "pool": 2}  # a 128-px input


def _features(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {s: (g.standard_normal((64, n, n)) * (1 + i) + i).astype(np.float32) for i, (s, n) in enumerate(SIZES.items())}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("codec") / "features.zarr")
    store = FeatureStore(url, mode="w")
    for iid in (7, 8, 9):
        store.write_image(iid, _features(iid), {"split": "train", "file_name": f"{iid:012d}.png",
                                                "input_size": [128, 128], "model_input_size": [128, 128],
                                                "strides": STRIDES})
    return url


SPEC = SimpleNamespace(name="bmshj2018-hyperprior", N=16, M=24, phis=[0.0067, 0.013], trained_on="features",
                       options={})


def test_mosaic_dataset_patches(store_url):
    ds = MosaicDataset(store_url, [7, 8, 9], patch_size=64, seed=3, sampling="mosaic")
    assert len(ds) == 15  # images x scales
    for i in (0, 4, 17, 1234):  # beyond len: the same items with new crops
        x = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(ds[5], ds[5]) and not torch.equal(ds[5], ds[20])  # crop seeded by index
    # The full mosaic is exactly what the codec codes (normalise, then pack), and a patch is
    # exactly a random crop of it (the patch is gathered without building the mosaic).
    iid, scale = ds.item(0)
    raw = torch.from_numpy(FeatureStore(store_url, mode="r").read_image(iid, [scale])[scale])
    expected, _ = pack(normalise(raw.float())[0])
    assert torch.equal(ds.mosaic(iid, scale), expected)
    for i in range(15):
        mosaic = ds.mosaic(*ds.item(i))
        assert torch.equal(ds[i], random_crop(mosaic, 64, np.random.default_rng([3, i])))
    # "area": each scale as often as 64-px patches tile its padded mosaic ('0': 32x32 tiles
    # on a 5x5 grid, 160 -> 192 px: 9 patches; '1': 80 -> 128: 4; the others one each).
    area = MosaicDataset(store_url, [7, 8, 9], patch_size=64, seed=3)
    assert area.weights == [9, 4, 1, 1, 1] and len(area) == 3 * 16
    assert [area.item(k)[1] for k in range(16)] == ["0"] * 9 + ["1"] * 4 + ["2", "3", "pool"]
    assert area.item(16) == (8, "0") and torch.equal(area[17], random_crop(
        area.mosaic(8, "0"), 64, np.random.default_rng([3, 17])))
    # 'pool' (2x2 tiles -> 64x64 after padding) is replicate-padded up to a 128 patch.
    big = MosaicDataset(store_url, [7], scales=["pool"], patch_size=128)
    assert big[0].shape == (3, 128, 128)
    assert torch.equal(big[0], random_crop(big.mosaic(7, "pool"), 128, np.random.default_rng([0, 0])))
    # Deterministic batches whatever the thread count; a later start continues the stream.
    a = iter(BatchStream(ds, 4, seed=1, workers=0))
    b = iter(BatchStream(ds, 4, seed=1, workers=2))
    first = [next(a) for _ in range(3)]
    assert all(torch.equal(x, next(b)) for x in first)
    assert torch.equal(next(iter(BatchStream(ds, 4, seed=1, start_step=2))), first[2])
    s = list(zip(range(30), SampleStream(15, seed=0)))
    assert sorted(i % 15 for _, i in s[:15]) == list(range(15)) and len({i for _, i in s}) == 30


def test_rgb_dataset(tmp_path):
    from PIL import Image

    paths = []
    for k, size in enumerate([(80, 60), (200, 150)]):
        p = tmp_path / f"{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    ds = RGBImageDataset(paths, patch_size=64)
    for i in range(4):
        x = ds[i]
        assert x.shape == (3, 64, 64) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert RGBImageDataset(paths, patch_size=128)[0].shape == (3, 128, 128)  # 80x60 padded


def test_train_rate_point_resumes(store_url, tmp_path):
    from compressai.models import ScaleHyperprior

    ds = MosaicDataset(store_url, [7, 8, 9], patch_size=64)
    loader = make_loader(ds, 2, seed=0)
    torch.manual_seed(0)
    model = ScaleHyperprior(16, 24)
    res = train_rate_point(model, loader, 0.013, 3, 1e-4, 1e-3, tmp_path / "rp", checkpoint_every=2, log_every=1,
                           log=lambda m: None)
    assert res["complete"] and res["step"] == 3
    hist = json.loads((tmp_path / "rp" / "history.json").read_text())
    assert [r["step"] for r in hist] == [1, 2, 3]
    assert all(np.isfinite([r["loss"], r["bpp"], r["mse"], r["aux"]]).all() for r in hist)
    # Asking for more steps continues from the saved step (a fresh model gets the saved weights).
    torch.manual_seed(1)
    again = ScaleHyperprior(16, 24)
    msgs = []
    res2 = train_rate_point(again, loader, 0.013, 5, 1e-4, 1e-3, tmp_path / "rp", checkpoint_every=2, log_every=1,
                            log=msgs.append)
    assert res2["step"] == 5 and any("resuming at step 3/5" in m for m in msgs)
    state = read_state(tmp_path / "rp")
    assert state["step"] == 5 and [r["step"] for r in state["history"]] == [1, 2, 3, 4, 5]
    # A state from another run is refused instead of silently mixed in.
    with pytest.raises(ValueError, match="another training run"):
        train_rate_point(ScaleHyperprior(16, 24), loader, 0.013, 6, 1e-4, 1e-3, tmp_path / "rp",
                         identity={"digest": "other"}, log=lambda m: None)


def test_train_codec_family_writes_a_working_codec(store_url, tmp_path):
    from tasks.codecs.learned import load_codec

    ds = MosaicDataset(store_url, [7, 8, 9], patch_size=64)
    settings = CodecTrainSettings(iterations=2, batch_size=2, checkpoint_every=1, log_every=1, eval_patches=2)
    work = tmp_path / "family"
    path = train_codec_family(SPEC, ds, work, settings, identity={"digest": "abc"}, log=lambda m: None)
    assert path == work / "codec.pt"
    curves = json.loads((work / "curves.json").read_text())
    assert set(curves["rate_points"]) == {"rp0-lambda0.0067", "rp1-lambda0.013"}
    assert all(len(rp["history"]) == 2 for rp in curves["rate_points"].values())
    assert (work / "curves.png").stat().st_size > 1000
    summary = json.loads((work / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 4 and len(summary["final"]) == 2
    assert all(np.isfinite(r["bpp"]) and np.isfinite(r["mse"]) for r in summary["final"])

    codec = load_codec(path)
    assert codec.lambdas == [0.0067, 0.013] and codec.kwargs == {"N": 16, "M": 24}
    assert codec.checkpoint_sha256.hex() == summary["checkpoint_sha256"]
    feats = {s: torch.from_numpy(v) for s, v in FeatureStore(store_url, mode="r").read_image(8).items()}
    data = codec.compress(feats, {s: 0.013 for s in feats})
    out = codec.decompress(data)
    assert {s: tuple(v.shape) for s, v in out.items()} == {s: tuple(v.shape) for s, v in feats.items()}
    assert all(torch.isfinite(v).all() for v in out.values())

    # A second call finds every rate point complete: nothing is retrained, same weights.
    before = path.stat().st_mtime_ns
    msgs = []
    assert train_codec_family(SPEC, ds, work, settings, identity={"digest": "abc"}, log=msgs.append) == path
    assert not any("step 1/" in m for m in msgs)
    assert load_codec(path).checkpoint_sha256 == codec.checkpoint_sha256 and path.stat().st_mtime_ns >= before


def test_warm_started_family_trains_down_from_the_highest_lambda(store_url, tmp_path):
    from tasks.codecs.learned import load_codec

    ds = MosaicDataset(store_url, [7, 8, 9], patch_size=64)
    settings = CodecTrainSettings(iterations=2, batch_size=2, checkpoint_every=1, log_every=1, eval_patches=2,
                                  finetune_iterations=1)
    msgs = []
    # A budget that stops after the first step: the rerun resumes the highest lambda, then
    # fine-tunes the lower one from it.
    assert train_codec_family(SPEC, ds, tmp_path / "w", settings, time_budget_s=0.0, log=msgs.append) is None
    assert not (tmp_path / "w" / "rp0-lambda0.0067").exists()
    path = train_codec_family(SPEC, ds, tmp_path / "w", settings, log=msgs.append)
    curves = json.loads((tmp_path / "w" / "curves.json").read_text())
    assert list(curves["rate_points"]) == ["rp0-lambda0.0067", "rp1-lambda0.013"]
    assert curves["rate_points"]["rp1-lambda0.013"]["init_from"] is None
    assert curves["rate_points"]["rp0-lambda0.0067"]["init_from"] == "rp1-lambda0.013"
    assert [rp["steps"] for rp in curves["rate_points"].values()] == [1, 2]
    assert read_state(tmp_path / "w" / "rp0-lambda0.0067")["identity"]["init_from"] == "rp1-lambda0.013"
    # One fine-tuning step at lr 1e-4 moves the weights by about 1e-4: the lower rate point
    # starts from the higher one's weights, not from its own initialisation.
    def distance(models) -> float:
        a, b = (dict(m.named_parameters()) for m in models)
        return max(float((a[k] - b[k]).detach().abs().max()) for k in a if k.endswith("weight"))

    assert distance(load_codec(path).models) < 1e-2
    cold = train_codec_family(SPEC, ds, tmp_path / "c", CodecTrainSettings(
        iterations=2, batch_size=2, log_every=1, eval_patches=2), log=lambda m: None)
    assert distance(load_codec(cold).models) > 1e-2


def test_time_budget_stops_and_resumes(store_url, tmp_path):
    ds = MosaicDataset(store_url, [7], scales=["2"], patch_size=64)
    spec = SimpleNamespace(**{**vars(SPEC), "phis": [0.013]})
    settings = CodecTrainSettings(iterations=3, batch_size=1, checkpoint_every=1, log_every=1, eval_patches=1)
    assert train_codec_family(spec, ds, tmp_path, settings, time_budget_s=0.0, log=lambda m: None) is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["complete"] and summary["rate_points"][0]["step"] == 1
    assert train_codec_family(spec, ds, tmp_path, settings, log=lambda m: None) == tmp_path / "codec.pt"
    assert read_state(tmp_path / "rp0-lambda0.013")["step"] == 3


def test_settings_from_config_and_options():
    from mfiba.config import TrainCodecConfig

    s = CodecTrainSettings.from_config(TrainCodecConfig(iterations=7, patch_size=64), seed=5,
                                       overrides={"vbr_stage1_fraction": 0.0})
    assert (s.iterations, s.seed, s.vbr_stage1_fraction, s.batch_size) == (7, 5, 0.0, 8)
    with pytest.raises(ValueError, match="unknown codec training option"):
        CodecTrainSettings.from_config(TrainCodecConfig(), overrides={"nope": 1})


def test_only_trains_the_named_labels_and_names_a_wrong_one():
    from flows.train_codec import TrainCodecError, trainable_families
    from mfiba.config import load_config

    cfg = load_config("demo-elic")
    every = {f["key"]: f["roles"] for f in trainable_families(cfg)}
    assert len(every) > 1 and "elic-features" in every
    assert [(f["key"], f["roles"]) for f in trainable_families(cfg, ["elic"])] == [("elic-features", ["elic"])]
    with pytest.raises(TrainCodecError, match=r"\['nope'\]: no such codec label; labels: \['main'"):
        trainable_families(cfg, ["elic", "nope"])
    with pytest.raises(TrainCodecError, match=r"\['main'\]: classical or trained_on='none'"):
        trainable_families(cfg, ["main"])  # the demo's main codec is AVIF
    # Two families of one codec on one input: each keeps its full run's key (work folder).
    tiny = {"name": "bmshj2018-hyperprior", "M": 24, "phis": [0.013], "trained_on": "features"}
    two = load_config("demo", {"codecs.others": {"a": {**tiny, "N": 16}, "b": {**tiny, "N": 8}}})
    keys = {f["roles"][0]: f["key"] for f in trainable_families(two)}
    assert keys["a"] != keys["b"] and keys["a"].startswith("bmshj2018-hyperprior-features-")
    assert [f["key"] for f in trainable_families(two, ["b"])] == [keys["b"]]


def test_train_codec_flow_trains_then_reuses(tmp_path, prefect_server):
    """The flow, in-process (no Dask cluster): a features family and an RGB family, then a
    rerun that reuses both, then a changed setting that moves the stale family aside."""
    from flows.train_codec import run_train_codec
    from mfiba.config import load_config
    from tasks.datasets.sources import image_refs

    tiny = {"name": "bmshj2018-hyperprior", "N": 16, "M": 24, "phis": [0.013]}
    over = {"data.root": str(tmp_path / "data"), "data.image_size": 64, "data.train_count": 2,
            "data.calib_count": 0, "data.test_count": 0, "run_dir": str(tmp_path / "run"),
            "features.store": str(tmp_path / "f.zarr"), "codecs.main": {**tiny, "trained_on": "features"},
            "codecs.others": {"anchor": {**tiny, "trained_on": "rgb"}, "avif": {"name": "avif", "trained_on": "none"}},
            "train_codec.iterations": 2, "train_codec.batch_size": 2, "train_codec.patch_size": 64,
            "train_codec.work_dir": str(tmp_path / "codecs")}
    cfg = load_config("demo", over, stages=["train-codec"])  # one lambda: no rate points to tune
    store = FeatureStore(cfg.features.store, mode="w")
    for ref in image_refs(cfg, ["train"])["train"]:
        store.write_image(ref.image_id, _features(ref.image_id), {
            "split": "train", "file_name": ref.file_name, "input_size": [64, 64],
            "model_input_size": [64, 64], "strides": STRIDES})
    out = run_train_codec(cfg, local=True)
    assert set(out) == {"bmshj2018-hyperprior-features", "bmshj2018-hyperprior-rgb"}
    for r in out.values():
        assert r["complete"] and not r["reused"] and Path(r["codec"]).exists() and r["steps"] == 2
        assert len(r["bpp"]) == 1 and np.isfinite(r["bpp"][0]) and np.isfinite(r["mse"][0])
    again = run_train_codec(cfg, local=True)
    assert all(r["reused"] and r["codec"] == out[k]["codec"] for k, r in again.items())
    # A moved codec folder is still up to date there: family.json names its codec by file name.
    moved = load_config("demo", {**over, "train_codec.work_dir": str(tmp_path / "moved")}, stages=["train-codec"])
    (tmp_path / "codecs").rename(tmp_path / "moved")
    assert all(r["reused"] and r["codec"].startswith(str(tmp_path / "moved"))
               for r in run_train_codec(moved, local=True).values())
    (tmp_path / "moved").rename(tmp_path / "codecs")

    cfg2 = load_config("demo", {**over, "train_codec.iterations": 3}, stages=["train-codec"])
    third = run_train_codec(cfg2, local=True)
    assert all(not r["reused"] and r["steps"] == 3 for r in third.values())
    assert len(list((tmp_path / "codecs").glob("bmshj2018-hyperprior-features.stale-*"))) == 1


def test_evaluate_rd_leaves_the_model_in_its_mode(store_url):
    from compressai.models import ScaleHyperprior

    from tasks.codecs.training import evaluate_rd

    patches = torch.stack([MosaicDataset(store_url, [7], patch_size=64)[i] for i in range(2)])
    model = ScaleHyperprior(16, 24)
    for training in (False, True):
        model.train(training)
        rows = evaluate_rd(model, patches, [0.013])
        assert model.training is training and len(rows) == 1 and np.isfinite(rows[0]["bpp"])
