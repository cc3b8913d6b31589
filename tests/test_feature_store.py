import json
import multiprocessing as mp
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from storage.feature_store import (
    FORMAT,
    FeatureStore,
    InsufficientDiskError,
    check_disk_space,
    estimate_store_bytes,
    image_key,
)

SCALES = ["0", "1", "2", "3", "pool"]
STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}


def make_features(seed=0, c=8, hw=((32, 48), (16, 24), (8, 12), (4, 6), (2, 3))):
    rng = np.random.default_rng(seed)
    return {s: rng.standard_normal((c, h, w)).astype(np.float16) for s, (h, w) in zip(SCALES, hw)}


def make_attrs(**kw):
    attrs = dict(
        split="val2017",
        file_name="000000000139.jpg",
        input_size=(426, 640),
        model_input_size=[800, 1202],
        strides=STRIDES,
    )
    attrs.update(kw)
    return attrs


def same_bits(a, b):
    return a.dtype == b.dtype == np.float16 and a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.fixture
def store(tmp_path):
    return FeatureStore(str(tmp_path / "feats.zarr"))


def test_round_trip_bit_exact(store):
    feats = make_features()
    # Edge values of float16: subnormals, signed zero, the largest finite value.
    feats["0"][0, 0, :5] = np.array([6e-8, -0.0, 65504, -65504, 1e-5], dtype=np.float16)
    store.write_image(139, feats, make_attrs())

    out = store.read_image(139)
    assert list(out) == SCALES  # level order, 'pool' last
    for s in SCALES:
        assert same_bits(out[s], feats[s])
    attrs = store.read_attrs(139)
    assert attrs["image_id"] == 139 and attrs["complete"] is True
    assert attrs["input_size"] == [426, 640] and attrs["model_input_size"] == [800, 1202]
    assert attrs["strides"] == STRIDES and attrs["split"] == "val2017"
    assert store.has_image(139) and store.image_ids() == [139]

    sub = store.read_image(139, scales=["pool", "2"])
    assert list(sub) == ["pool", "2"] and same_bits(sub["2"], feats["2"])
    with pytest.raises(KeyError, match="scale"):
        store.read_image(139, scales=["7"])


def test_float32_and_torch_inputs_are_cast(store):
    torch = pytest.importorskip("torch")
    x32 = np.random.default_rng(1).standard_normal((4, 6, 6)).astype(np.float32)
    store.write_image(1, {"0": x32, "1": torch.from_numpy(x32).to(torch.bfloat16)}, make_attrs())
    out = store.read_image(1)
    assert same_bits(out["0"], x32.astype(np.float16))
    expected_bf = torch.from_numpy(x32).to(torch.bfloat16).float().numpy().astype(np.float16)
    assert same_bits(out["1"], expected_bf)


def test_layout(store, tmp_path):
    store.write_image(5, make_features(), make_attrs())
    root = zarr.open_group(str(tmp_path / "feats.zarr"), mode="r")
    assert root.attrs["format"] == FORMAT
    g = root[f"images/{image_key(5)}"]
    assert image_key(5) == "000000000005"
    for s in SCALES:
        a = g[s]
        assert a.dtype == np.float16
        assert a.chunks == a.shape  # one chunk per (image, scale)
        assert a.metadata.dimension_names == ("c", f"y{s}", f"x{s}")
        (codec,) = a.compressors
        assert codec.cname.value == "zstd" and codec.shuffle.value == "shuffle" and codec.clevel == 1
    # exactly one chunk object per scale on disk
    chunks = [p for p in (tmp_path / "feats.zarr" / "images" / "000000000005").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunks) == len(SCALES)


def test_listing_is_sorted_numerically(store):
    for i in [1000, 3, 42]:
        store.write_image(i, make_features(i, c=2), make_attrs())
    assert store.image_ids() == [3, 42, 1000]
    with pytest.raises(ValueError):
        image_key(-1)


def test_open_xarray(store):
    feats = make_features()
    store.write_image(7, feats, make_attrs())
    ds = store.open_xarray(7)
    assert set(ds.data_vars) == set(SCALES)
    assert ds["pool"].dims == ("c", "ypool", "xpool")
    assert ds["1"].dims == ("c", "y1", "x1")
    assert same_bits(ds["1"].values, feats["1"])
    assert ds.attrs["image_id"] == 7
    with pytest.raises(KeyError, match="8"):
        store.open_xarray(8)


def test_half_written_image_is_incomplete_and_rewritten(store, tmp_path):
    # Simulate a writer that died mid-image: group + one array, no complete flag,
    # plus a scale the real write does not have.
    g = zarr.open_group(str(tmp_path / "feats.zarr"), mode="a").create_group(f"images/{image_key(9)}")
    g.attrs.update(image_id=9, complete=False)
    g.create_array("junk", shape=(2, 2, 2), dtype="float16")[...] = 1
    store.write_image(10, make_features(10, c=2), make_attrs())

    assert not store.has_image(9)
    assert store.incomplete_ids() == [9]
    assert store.image_ids() == [10]
    assert store.image_ids(complete_only=False) == [9, 10]
    assert store.summary()["complete"] == 1 and store.summary()["incomplete"] == 1
    with pytest.raises(KeyError, match="9"):
        store.read_image(9)
    with pytest.raises(KeyError, match="9"):
        store.read_attrs(9)

    feats = make_features(9)
    store.write_image(9, feats, make_attrs())
    assert store.has_image(9) and store.incomplete_ids() == []
    out = store.read_image(9)
    assert list(out) == SCALES  # stale 'junk' array is gone
    assert all(same_bits(out[s], feats[s]) for s in SCALES)


def test_orphan_chunks_without_group_count_as_incomplete(store, tmp_path):
    orphan = tmp_path / "feats.zarr" / "images" / image_key(11) / "0" / "c"
    orphan.mkdir(parents=True)
    (orphan / "0").write_bytes(b"x")
    assert store.incomplete_ids() == [11]
    store.write_image(11, make_features(), make_attrs())
    assert store.incomplete_ids() == [] and store.image_ids() == [11]


def test_memory_url_round_trip():
    url = f"memory://{uuid.uuid4().hex}/feats.zarr"
    fs = FeatureStore(url)
    feats = make_features(3)
    fs.write_image(3, feats, make_attrs())
    out = FeatureStore(url, mode="r").read_image(3)
    assert all(same_bits(out[s], feats[s]) for s in SCALES)
    assert fs.nbytes_stored(3) > 0
    assert fs.open_xarray(3)["0"].shape == feats["0"].shape
    assert fs.summary()["complete"] == 1
    fs.delete_image(3)
    assert fs.image_ids(complete_only=False) == []
    assert check_disk_space(url, 10**30) is None  # remote: not checked


def test_torch_tensors_stored_as_numpys_float16_cast(store):
    """Float32 tensors are cast to float16 in torch: the same bits as numpy's cast, at the
    rounding boundaries, subnormals, signed zero and the top of the range too."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 32, 32)) * np.exp(rng.standard_normal((4, 32, 32)) * 4)).astype(np.float32)
    x = np.clip(x, -65519.0, 65519.0)  # beyond rounds to Inf (refused)
    edge = [65504, 65519, -65519, 6e-8, 2.9e-8, 3e-8, -0.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1e-5]
    x[0, 0, :len(edge)] = edge
    store.write_image(5, {"0": torch.from_numpy(x)}, make_attrs())
    with np.errstate(over="ignore"):
        assert same_bits(store.read_image(5)["0"], x.astype(np.float16))


def test_file_url(tmp_path):
    fs = FeatureStore((tmp_path / "f.zarr").as_uri())
    fs.write_image(1, make_features(), make_attrs())
    assert FeatureStore(str(tmp_path / "f.zarr"), mode="r").image_ids() == [1]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize(
    "bad, match",
    [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (1e6, "float16 range"), (65520.0, "float16 range")],
)
def test_non_finite_refused_before_writing(store, bad, match, as_tensor):
    feats = {s: a.astype(np.float32) for s, a in make_features().items()}
    feats["2"][0, 1, 1] = bad
    if as_tensor:  # what the features stage passes (cast to float16 in torch)
        feats = {s: torch.from_numpy(a) for s, a in feats.items()}
    with pytest.raises(ValueError, match=match) as e:
        store.write_image(77, feats, make_attrs())
    assert "77" in str(e.value) and "'2'" in str(e.value)
    assert store.image_ids(complete_only=False) == []  # nothing touched the store


def test_missing_attrs_refused(store):
    with pytest.raises(ValueError, match="strides"):
        store.write_image(1, make_features(), {"split": "val", "file_name": "a", "input_size": [1, 1], "model_input_size": [1, 1]})
    with pytest.raises(ValueError, match="stride"):
        store.write_image(1, make_features(), make_attrs(strides={"0": 4}))


def test_meta_and_per_image_writes_leave_root_alone(store, tmp_path):
    store.set_meta(task_model="faster_rcnn_R_50_FPN", checkpoint_sha256="ab" * 32, config_digest="cd", code_version="x")
    root_json = tmp_path / "feats.zarr" / "zarr.json"
    before = root_json.read_bytes()
    store.write_image(1, make_features(), make_attrs())
    store.delete_image(1)
    assert root_json.read_bytes() == before
    reopened = FeatureStore(str(tmp_path / "feats.zarr"), mode="r")
    assert reopened.meta["task_model"] == "faster_rcnn_R_50_FPN"
    assert reopened.meta["format"] == FORMAT
    assert json.loads(before)["attributes"]["config_digest"] == "cd"


def test_read_only_and_foreign_store(tmp_path, store):
    store.write_image(1, make_features(), make_attrs())
    ro = FeatureStore(str(tmp_path / "feats.zarr"), mode="r")
    with pytest.raises(PermissionError):
        ro.write_image(2, make_features(), make_attrs())
    assert ro.has_image(1)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="not a feature store"):
        FeatureStore(str(tmp_path / "other.zarr"))


def test_nbytes_stored_reflects_compression(store):
    feats = make_features(c=32)
    raw = sum(a.nbytes for a in feats.values())
    store.write_image(1, feats, make_attrs())
    store.write_image(2, {s: np.zeros_like(a) for s, a in feats.items()}, make_attrs())
    assert 0.7 * raw < store.nbytes_stored(1) < 1.1 * raw  # random normal barely compresses
    assert store.nbytes_stored(2) < 0.1 * raw
    with pytest.raises(KeyError):
        store.nbytes_stored(3)


def _worker(url, ids):
    fs = FeatureStore(url)
    for i in ids:
        fs.write_image(i, make_features(i, c=4), make_attrs())


def test_concurrent_writers_of_different_images(tmp_path):
    url = str(tmp_path / "shared.zarr")
    FeatureStore(url).set_meta(task_model="m")
    ctx = mp.get_context("spawn")  # zarr runs an event-loop thread: do not fork it
    procs = [ctx.Process(target=_worker, args=(url, range(k, 24, 3))) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    fs = FeatureStore(url, mode="r")
    assert fs.image_ids() == list(range(24)) and fs.incomplete_ids() == []
    assert fs.meta["task_model"] == "m"
    for i in (0, 13, 23):
        assert same_bits(fs.read_image(i)["3"], make_features(i, c=4)["3"])


def test_estimate_store_bytes():
    shapes = {"0": (200, 272), "1": (100, 136), "2": (50, 68), "3": (25, 34), "pool": (13, 17)}
    per_image = 256 * sum(h * w for h, w in shapes.values()) * 2
    assert estimate_store_bytes(10, 256, shapes) == 10 * per_image
    assert estimate_store_bytes(10, 256, shapes, compression_ratio=2.0) == 5 * per_image
    with pytest.raises(ValueError):
        estimate_store_bytes(1, 1, shapes, compression_ratio=0)


def test_check_disk_space(tmp_path):
    target = tmp_path / "not" / "yet" / "there.zarr"  # falls back to the nearest existing parent
    assert check_disk_space(str(target), 1) > 0
    with pytest.raises(InsufficientDiskError) as e:
        check_disk_space(str(target), 10**18)  # 1 EB
    msg = str(e.value)
    assert isinstance(e.value, OSError)
    assert str(target) in msg and "TB" in msg and "need" in msg and "free" in msg
    assert "1100000.00 TB" in msg  # 1e18 B x 1.1 safety
    with pytest.raises(InsufficientDiskError):
        check_disk_space(Path(target).as_uri(), 10**18)


def test_written_bytes_are_what_zarrs_own_api_writes(store, tmp_path):
    """write_image sets the image's keys on the store itself (zarr's array API cost most of
    a write's time): every key must hold the bytes zarr's create_group / create_array /
    setitem / attrs update would have written, so any zarr or xarray reader sees the format."""
    feats = make_features(4)
    store.write_image(4, feats, make_attrs())
    ours = tmp_path / "feats.zarr" / "images" / image_key(4)

    ref_root = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    attrs = store.read_attrs(4)
    g = ref_root.create_group(f"images/{image_key(4)}", attributes={**attrs, "complete": False})
    for s in SCALES:
        a = g.create_array(s, shape=feats[s].shape, dtype="float16", chunks=feats[s].shape,
                           compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
                           fill_value=0.0, dimension_names=("c", f"y{s}", f"x{s}"))
        a[...] = feats[s]
    g.attrs["complete"] = True
    theirs = tmp_path / "ref.zarr" / "images" / image_key(4)

    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(ours) == files(theirs) and len(files(ours)) == 1 + 2 * len(SCALES)
    for name in files(ours):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
