"""A full disk in the middle of a stage (simulated with ENOSPC at the file write or the
rename): the result table and the feature store stay consistent and readable, the error
names what was being written and where, and a rerun completes them to exactly what an
uninterrupted run writes."""
from __future__ import annotations

import errno
import io
import os

import numpy as np
import pandas as pd
import pytest
import zarr.storage._local as zarr_local

import storage.urls
from storage.feature_store import FeatureStore
from storage.results import PartTable
from storage.urls import WriteFailedError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
IDENTITY = {"codec": "avif", "settings": 1}
KEYS = [f"img{i}-q{q}" for i in range(3) for q in range(2)]


def part_frame(key: str) -> pd.DataFrame:
    seed = KEYS.index(key)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": [key] * 4, "scale": ["0", "1", "2", "pool"], "bits": rng.integers(0, 1 << 20, 4),
                         "loss": rng.random(4)})


def run_stage(table: PartTable) -> None:
    """What a stage does: compute and write every part not there yet, then consolidate."""
    for key in KEYS:
        if key not in table.keys():
            table.write(key, part_frame(key))
    table.consolidate(sort_by=["key", "scale"])


class _HalfThenFull(io.RawIOBase):
    """A file that takes half of the first write, then reports a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False


def fail_nth_part(monkeypatch, n: int, where: str) -> list[str]:
    """ENOSPC on the n-th part written (0-based): mid-file ('write') or at the rename."""
    seen: list[str] = []
    real_open, real_replace = open, os.replace

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "/parts/" in str(path) and "x" in mode:
            seen.append(str(path))
            if where == "write" and len(seen) == n + 1:
                return _HalfThenFull(f)
        return f

    def fake_replace(src, dst):
        if where == "rename" and "/parts/" in str(dst) and len(seen) == n + 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(storage.urls, "open", fake_open, raising=False)
    monkeypatch.setattr(storage.urls.os, "replace", fake_replace)
    return seen


@pytest.mark.parametrize("where", ["write", "rename"])
def test_part_table_disk_full_mid_stage(tmp_path, monkeypatch, where):
    clean = PartTable(str(tmp_path / "clean"), IDENTITY)
    run_stage(clean)

    url = str(tmp_path / "table")
    seen = fail_nth_part(monkeypatch, 2, where)
    with pytest.raises(OSError) as err:
        run_stage(PartTable(url, IDENTITY))
    e = err.value
    assert isinstance(e, WriteFailedError) and e.errno == errno.ENOSPC
    assert str(e).startswith(f"writing part {KEYS[2]} of {url} failed: No space left on device")
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC
    assert len(seen) == 3
    monkeypatch.undo()  # the disk has room again

    table = PartTable(url, IDENTITY)  # reopens: identity intact
    assert table.keys() == set(KEYS[:2])  # the half-written part is not a part
    assert sorted(os.listdir(tmp_path / "table" / "parts")) == sorted(f"{k}.parquet" for k in KEYS[:2])  # no tmp
    pd.testing.assert_frame_equal(table.read(), pd.concat([part_frame(k) for k in KEYS[:2]], ignore_index=True))
    assert not (tmp_path / "table" / "table.parquet").exists()

    run_stage(table)  # the rerun writes only what is missing
    assert table.keys() == set(KEYS)
    pd.testing.assert_frame_equal(PartTable.load(url), PartTable.load(clean.url))


def test_a_leftover_temp_file_is_not_a_part(tmp_path):
    """A writer killed mid-file (no cleanup ran) leaves a hidden temp file: never a part."""
    table = PartTable(str(tmp_path / "table"), IDENTITY)
    table.write(KEYS[0], part_frame(KEYS[0]))
    (tmp_path / "table" / "parts" / f".{KEYS[1]}.parquet.0123456789ab.tmp").write_bytes(b"PAR1\x00half")
    assert table.keys() == {KEYS[0]}
    pd.testing.assert_frame_equal(table.read(), part_frame(KEYS[0]))


def test_consolidate_disk_full_keeps_parts_and_names_the_table(tmp_path, monkeypatch):
    url = str(tmp_path / "table")
    table = PartTable(url, IDENTITY)
    for k in KEYS:
        table.write(k, part_frame(k))
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("table.parquet"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(storage.urls.os, "replace", full)
    with pytest.raises(WriteFailedError, match=rf"^writing table\.parquet of {url} failed: No space left on device"):
        table.consolidate()
    monkeypatch.undo()
    assert table.keys() == set(KEYS)
    assert [n for n in os.listdir(tmp_path / "table") if n.startswith(".")] == []
    assert len(table.consolidate()) == 4 * len(KEYS)


# -- the feature store ----------------------------------------------------------------------------
SCALES = ("0", "1", "pool")
STRIDES = {"0": 4, "1": 8, "pool": 16}
IMAGES = list(range(5))


def image_features(image_id: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(image_id)
    return {s: rng.standard_normal((4, h, w)).astype(np.float16) for s, (h, w) in zip(SCALES, [(16, 12), (8, 6), (2, 2)])}


def image_attrs(image_id: int) -> dict:
    return {"split": "calib", "file_name": f"{image_id:012d}.png", "input_size": [64, 48],
            "model_input_size": [64, 48], "strides": STRIDES}


def extract(store: FeatureStore) -> None:
    """What the features stage does: write every image the store does not have complete."""
    done = set(store.image_ids())
    for i in IMAGES:
        if i not in done:
            store.write_image(i, image_features(i), image_attrs(i))


def fail_in_image(monkeypatch, image_id: int, key_suffix: str, nth: int = 1) -> list[str]:
    """ENOSPC half-way through the nth write (1-based) of the key `images/<id>/<key_suffix>`,
    at zarr's own file write (LocalStore writes a temp file and renames it). Only plain writes
    count: zarr's create-if-missing writes of parent groups (exclusive) are passed through."""
    real_put = zarr_local._put
    target = f"images/{image_id:012d}/{key_suffix}"
    hits: list[str] = []

    def put(path, value, exclusive=False):
        if str(path).endswith(target) and not exclusive:
            hits.append(str(path))
            if len(hits) == nth:
                path.parent.mkdir(parents=True, exist_ok=True)
                with zarr_local._atomic_write(path, "wb") as f:
                    data = value.as_buffer_like()
                    f.write(bytes(data)[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    return hits


@pytest.mark.parametrize("key_suffix,nth", [("1/c/0/0/0", 1),  # a feature chunk
                                            ("zarr.json", 2)],  # the final complete=True update
                         ids=["chunk", "complete-mark"])
def test_feature_store_disk_full_mid_image(tmp_path, monkeypatch, key_suffix, nth):
    clean = FeatureStore(str(tmp_path / "clean.zarr"))
    extract(clean)

    url = str(tmp_path / "features.zarr")
    hits = fail_in_image(monkeypatch, 2, key_suffix, nth)
    with pytest.raises(OSError) as err:
        extract(FeatureStore(url))
    e = err.value
    assert len(hits) == nth
    assert isinstance(e, WriteFailedError) and e.errno == errno.ENOSPC
    assert str(e).startswith(f"writing image 2 to feature store {url} failed: No space left on device")
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()

    store = FeatureStore(url, mode="r")  # opens, readable
    assert store.image_ids() == [0, 1]  # image 2 is not reported complete
    assert store.incomplete_ids() == [2] and not store.has_image(2)
    with pytest.raises(KeyError, match="incomplete"):
        store.read_image(2)
    for i in (0, 1):
        got = store.read_image(i)
        assert all(np.array_equal(got[s], image_features(i)[s]) for s in SCALES)
    leftovers = [p for p in (tmp_path / "features.zarr").rglob("*") if p.name.endswith(".partial")]
    assert leftovers == []  # zarr's temp file of the failed key is gone

    extract(FeatureStore(url, mode="a"))  # the rerun rewrites image 2 and goes on
    store = FeatureStore(url, mode="r")
    assert store.image_ids() == IMAGES and store.incomplete_ids() == []
    for i in IMAGES:
        got, want = store.read_image(i), clean.read_image(i)
        assert all(np.array_equal(got[s].view(np.uint16), want[s].view(np.uint16)) for s in SCALES)
        assert store.read_attrs(i) == clean.read_attrs(i)
