"""The synthetic COCO-format dataset: deterministic, balanced sizes, a keypoint schema."""
import json
from collections import Counter

from tasks.datasets.coco import CocoDataset
from tasks.datasets.synthetic import (KEYPOINT_CATEGORY, KEYPOINT_SIGMAS, NUM_KEYPOINTS, SyntheticSpec,
                                      categories_json, render, write_split)


def test_render_is_deterministic_and_splits_differ():
    spec = SyntheticSpec()
    a = render(spec, "test", 3)
    b = render(spec, "test", 3)
    assert a[0] == b[0] and a[2] == b[2]
    assert render(spec, "calib", 3)[0] != a[0]
    assert render(SyntheticSpec(seed=1), "test", 3)[0] != a[0]


def test_sizes_cover_coco_classes_in_comparable_numbers():
    spec = SyntheticSpec()
    counts = Counter()
    for i in range(60):
        for ann in render(spec, "train", i)[2]:
            area = ann["area"]
            counts["small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"] += 1
    # Large objects fill the frame, so fewer fit: measured about 48% small, 41% medium,
    # 11% large. Each class must keep at least a tenth of the objects.
    total = sum(counts.values())
    assert all(counts[c] >= 0.1 * total for c in ("small", "medium", "large")), counts


def test_keypoint_category_schema():
    cats = {c["name"]: c for c in categories_json()}
    kp = cats[KEYPOINT_CATEGORY]
    assert len(kp["keypoints"]) == NUM_KEYPOINTS == len(kp["oks_sigmas"]) == len(KEYPOINT_SIGMAS)
    assert all(1 <= i <= NUM_KEYPOINTS for edge in kp["skeleton"] for i in edge)
    assert sum("keypoints" in c for c in cats.values()) == 1


def test_write_split_reads_back_through_the_coco_reader(tmp_path):
    spec = SyntheticSpec()
    ann = write_split(spec, "test", 6, tmp_path)
    ds = CocoDataset(tmp_path / "test", ann)
    assert len(ds) == 6
    iid = ds.image_ids[0]
    img = ds.load_image(iid)
    assert img.size == (256, 256)
    kp_anns = [a for i in ds.image_ids for a in ds.annotations(i) if "keypoints" in a]
    assert all(len(a["keypoints"]) == 3 * NUM_KEYPOINTS for a in kp_anns)
    # Resumable: a second write keeps the bytes and rewrites the same JSON.
    before = json.loads(ann.read_text())
    write_split(spec, "test", 6, tmp_path)
    assert json.loads(ann.read_text()) == before
