"""CocoDataset: the real COCO val2017 sample, the synthetic one-file layout, and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.datasets.coco import CocoDataset, DatasetError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "coco2017-val-sample"


@pytest.fixture(scope="module")
def sample() -> CocoDataset:
    if not SAMPLE.is_dir():
        pytest.skip(f"COCO sample not found at {SAMPLE}: ../shared is absent")
    return CocoDataset(SAMPLE / "images", str(SAMPLE / "annotations/instances.json"),
                       SAMPLE / "annotations/person_keypoints.json")


# -- the real sample ---------------------------------------------------------------------

@pytest.mark.coco
def test_sample_loads_with_keypoints_merged(sample):
    assert len(sample) == 158
    assert len(sample.categories) == 80
    (person,) = sample.keypoint_categories
    assert person["name"] == "person" and len(person["keypoints"]) == 17
    all_anns = [a for i in sample.image_ids for a in sample.annotations(i)]
    assert len(all_anns) == 1181
    with_keypoints = [a for a in all_anns if "keypoints" in a]
    assert len(with_keypoints) == 243
    assert all(a["category_id"] == person["id"] and len(a["keypoints"]) == 51 for a in with_keypoints)


@pytest.mark.coco
def test_sample_image_and_info(sample):
    info = sample.image_info(139)
    assert info["file_name"] == "000000000139.jpg"
    img = sample.load_image(139)
    assert img.mode == "RGB" and img.size == (info["width"], info["height"])
    # Returned annotations are copies: editing them must not change the dataset.
    sample.annotations(139)[0]["bbox"] = None
    assert sample.annotations(139)[0]["bbox"] is not None


@pytest.mark.coco
def test_select_is_deterministic_and_validated(sample):
    first = sample.select(count=20, seed=3)
    assert first == sample.select(count=20, seed=3)
    assert first == sorted(first) and len(set(first)) == 20 and set(first) <= set(sample.image_ids)
    assert first != sample.select(count=20, seed=4)
    assert sample.select() == sorted(sample.image_ids)
    assert sample.select(ids=[802, 139]) == [802, 139]
    with pytest.raises(DatasetError, match=r"500 .*158"):
        sample.select(count=500)
    with pytest.raises(DatasetError, match=r"\[1, 2\]"):
        sample.select(ids=[139, 2, 1])


# -- the synthetic layout: one JSON, oks_sigmas on the category ----------------------------

def test_synthetic_split_loads(tmp_path):
    from tasks.datasets.synthetic import KEYPOINT_SIGMAS, SyntheticSpec, write_split

    ann_path = write_split(SyntheticSpec(image_size=128), "test", 3, tmp_path)
    ds = CocoDataset(tmp_path / "test", ann_path)
    (cross,) = ds.keypoint_categories
    assert cross["oks_sigmas"] == KEYPOINT_SIGMAS
    for image_id in ds.image_ids:
        assert ds.load_image(image_id).size == (128, 128)
        for ann in ds.annotations(image_id):
            assert ("keypoints" in ann) == (ann["category_id"] == cross["id"])


# -- bad inputs ----------------------------------------------------------------------------

def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _tiny(keypoints: bool = True) -> dict:
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "walker"}]
    if keypoints:
        cats[1].update(keypoints=["a", "b"], skeleton=[[1, 2]], oks_sigmas=[0.05, 0.05])
    anns = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    walker = {"id": 11, "image_id": 1, "category_id": 2, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}
    if keypoints:
        walker.update(keypoints=[3, 3, 2, 6, 6, 1])
    anns.append(walker)
    return {"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 12}],
            "annotations": anns, "categories": cats}


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (16, 12), (10, 20, 30)).save(d / "a.png")
    return d


def test_tiny_one_file_dataset(tmp_path, image_dir):
    ds = CocoDataset(str(image_dir), str(_write(tmp_path / "d.json", _tiny())))
    walker = [a for a in ds.annotations(1) if a["category_id"] == 2][0]
    assert walker["num_keypoints"] == 2  # derived when the file omits it
    assert ds.load_image(1).getpixel((0, 0)) == (10, 20, 30)


def test_missing_files(tmp_path, image_dir):
    with pytest.raises(DatasetError, match="nope.json.*not found"):
        CocoDataset(image_dir, tmp_path / "nope.json")
    good = _write(tmp_path / "d.json", _tiny())
    with pytest.raises(DatasetError, match="kp.json.*not found"):
        CocoDataset(image_dir, good, tmp_path / "kp.json")
    with pytest.raises(DatasetError, match="no_dir.*not found"):
        CocoDataset(tmp_path / "no_dir", good)


def test_malformed_json_names_position(tmp_path, image_dir):
    bad = _write(tmp_path / "bad.json", '{"images": [],\n "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"bad.json: malformed JSON at line 2 column 18 \(char 32\)"):
        CocoDataset(image_dir, bad)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, image_dir, key):
    data = _tiny()
    del data[key]
    with pytest.raises(DatasetError, match=f"d.json: missing top-level key '{key}'"):
        CocoDataset(image_dir, _write(tmp_path / "d.json", data))


def test_unknown_category_and_image(tmp_path, image_dir):
    data = _tiny()
    data["annotations"][0]["category_id"] = 7
    with pytest.raises(DatasetError, match=r"d.json: annotations\[0\] \(id 10\) field 'category_id' = 7"):
        CocoDataset(image_dir, _write(tmp_path / "d.json", data))
    data = _tiny()
    data["annotations"][1]["image_id"] = 99
    with pytest.raises(DatasetError, match=r"d.json: annotations\[1\] \(id 11\) field 'image_id' = 99"):
        CocoDataset(image_dir, _write(tmp_path / "d.json", data))


def test_keypoint_length_mismatch_one_file(tmp_path, image_dir):
    data = _tiny()
    data["annotations"][1]["keypoints"] = [3, 3, 2]
    with pytest.raises(DatasetError, match=r"d.json: .*field 'keypoints' has length 3, expected 6"):
        CocoDataset(image_dir, _write(tmp_path / "d.json", data))


def test_separate_keypoint_file(tmp_path, image_dir):
    instances = _write(tmp_path / "inst.json", _tiny(keypoints=False))
    kp = _tiny()
    kp["categories"] = [kp["categories"][1]]
    kp["annotations"] = [dict(kp["annotations"][1], num_keypoints=2)]
    ds = CocoDataset(image_dir, instances, _write(tmp_path / "kp.json", kp))
    assert [c["id"] for c in ds.keypoint_categories] == [2]
    assert [a.get("keypoints") for a in ds.annotations(1)] == [None, [3, 3, 2, 6, 6, 1]]

    kp["annotations"][0]["keypoints"] = [1, 2, 2] * 3
    with pytest.raises(DatasetError, match=r"kp.json: .*'keypoints' has length 9, expected 6"):
        CocoDataset(image_dir, instances, _write(tmp_path / "kp.json", kp))
    kp["annotations"][0].update(keypoints=[1, 2, 2] * 2, id=12)
    with pytest.raises(DatasetError, match=r"kp.json: 1 annotation\(s\) field 'id' not found in .*inst.json"):
        CocoDataset(image_dir, instances, _write(tmp_path / "kp.json", kp))


def test_bad_image_files(tmp_path, image_dir):
    ds_json = _write(tmp_path / "d.json", _tiny())
    ds = CocoDataset(image_dir, ds_json)
    with pytest.raises(DatasetError, match=r"image id 5 not in 'images'"):
        ds.load_image(5)
    (image_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a.png: image file not found"):
        ds.load_image(1)
    (image_dir / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"a.png: unreadable"):
        ds.load_image(1)
    noise = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image_dir / "a.png")
    data = (image_dir / "a.png").read_bytes()
    (image_dir / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"a.png: unreadable or truncated"):
        ds.load_image(1)
    Image.new("RGB", (20, 12)).save(image_dir / "a.png")
    with pytest.raises(DatasetError, match=r"a.png: image is 20x12 but .*16x12"):
        ds.load_image(1)


def test_truncated_jpeg(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "a.jpg", quality=95)
    data = (d / "a.jpg").read_bytes()
    (d / "a.jpg").write_bytes(data[: len(data) * 2 // 3])
    spec = _tiny()
    spec["images"][0]["file_name"] = "a.jpg"
    ds = CocoDataset(d, _write(tmp_path / "d.json", spec))
    with pytest.raises(DatasetError, match=r"a.jpg: unreadable or truncated"):
        ds.load_image(1)


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "P", "RGBA"])
def test_images_become_8bit_rgb(tmp_path, image_dir, mode):
    name = "a.tif" if mode in ("CMYK", "I;16") else "a.png"
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16))
        assert img.mode == "I;16"
    else:
        img = Image.new("RGB", (16, 12), (204, 204, 204)).convert(mode)
    img.save(image_dir / name)
    spec = _tiny()
    spec["images"][0]["file_name"] = name
    ds = CocoDataset(image_dir, _write(tmp_path / "d.json", spec))
    out = ds.load_image(1)
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped from 65535
    elif mode in ("L", "P", "RGBA"):
        assert out.getpixel((0, 0)) == (204, 204, 204)
