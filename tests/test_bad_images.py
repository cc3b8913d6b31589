"""Bad images: each is handled or skipped with its reason, the run goes on, and the reports
list what was left out. Unit level here; the slow test runs the whole demo pipeline with ten
bad test images beside the good ones and compares its numbers with a clean run's."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flows.features import record_skipped, skipped_images
from storage.feature_store import FeatureStore
from tasks.datasets.coco import DatasetError, read_rgb
from tasks.datasets.sources import ImageRef
from tasks.features import load_tensor

REPO = Path(__file__).resolve().parents[1]
MFIBA = str(Path(sys.executable).with_name("mfiba"))


def _png(path: Path, width: int, height: int) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_empty_file_and_directory_are_named(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty.jpg: empty file \(0 bytes\) \(image id 3\)"):
        read_rgb(tmp_path / "empty.jpg", 3)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DatasetError, match=r"dir.png: image file not found .*directory"):
        read_rgb(tmp_path / "dir.png")


def test_size_and_pixel_limit_are_checked_from_the_header(tmp_path):
    path = _png(tmp_path / "a.png", 40, 30)
    with pytest.raises(DatasetError, match=r"a.png: image is 40x30 but the annotations say 30x40 \(image id 7\)"):
        load_tensor(ImageRef("test", 7, str(path), "a.png", size=(30, 40)))
    with pytest.raises(DatasetError, match=r"40x30 = 1200 pixels, over data.max_image_pixels = 1000"):
        load_tensor(ImageRef("test", 7, str(path), "a.png", size=(40, 30), max_pixels=1000))
    # The check sees the header's size before one pixel is decoded.
    calls = []
    read_rgb(path, 7, check_size=lambda w, h: calls.append((w, h)))
    assert calls == [(40, 30)]
    assert load_tensor(ImageRef("test", 7, str(path), "a.png", size=(40, 30), max_pixels=1200)).shape == (3, 30, 40)


def test_a_known_problem_is_raised_without_reading(tmp_path):
    with pytest.raises(DatasetError, match="not in 'images'"):
        load_tensor(ImageRef("test", 5, "", "", problem="x.json: image id 5 not in 'images'"))


def test_an_image_smaller_than_the_stride_is_resized_and_handled():
    from tasks.models.registry import build_task_model

    model = build_task_model("demo-multitask", str(REPO / "assets/demo-task-model/demo_task_model.pt"))
    feats, meta = model.features([torch.rand(3, 10, 12)])  # smaller than the 32-pixel stride of '3'
    assert all(torch.isfinite(f).all() for f in feats.values()) and feats["pool"].shape[-2:] == (4, 4)
    det = model.heads(feats, meta)[0]
    assert (det["boxes"][:, 2] <= 12 + 1e-3).all() and (det["boxes"][:, 3] <= 10 + 1e-3).all()


def test_unknown_explicit_id_becomes_a_skipped_ref(tmp_path):
    from mfiba.config import load_config
    from tasks.datasets.sources import image_refs

    cfg = load_config("demo", [f"data.root={tmp_path / 'data'}", "data.train_count=0", "data.calib_count=2",
                               "data.test_count=2"])
    good = [r.image_id for r in image_refs(cfg, ["test"])["test"]]
    cfg = load_config("demo", [f"data.root={tmp_path / 'data'}", "data.train_count=0", "data.calib_count=2",
                               "data.test_count=2", f"data.image_ids={{'test': [{good[0]}, 999999]}}"])
    refs = image_refs(cfg, ["test"])["test"]
    assert [r.image_id for r in refs] == [good[0], 999999]
    assert refs[0].size == (256, 256) and not refs[0].problem
    assert "image id 999999 not in 'images' (listed in data.image_ids.test)" in refs[1].problem


def test_skip_record_merges_and_forgets_images_written_since(tmp_path):
    store = FeatureStore(str(tmp_path / "f.zarr"), mode="a")
    record_skipped(store, {1: "truncated", 2: "empty"}, [])
    record_skipped(store, {3: "missing"}, [2])  # image 2 was fixed and written
    assert skipped_images(FeatureStore(str(tmp_path / "f.zarr"), mode="r"), [1, 2, 3, 4]) == {1: "truncated",
                                                                                             3: "missing"}


# -- the demo pipeline with ten bad test images ------------------------------------------

BAD_KINDS = {
    9001: "zero-byte file", 9002: "truncated JPEG", 9003: "truncated PNG", 9004: "text, not an image",
    9005: "missing file", 9006: "directory instead of a file", 9007: "size differs from the annotations",
    9008: "over data.max_image_pixels", 9009: "PNG with a corrupt header", 9010: "id absent from the annotations",
}
REASON_WORDS = {9001: "empty file", 9002: "unreadable or truncated", 9003: "unreadable or truncated",
                9004: "unreadable", 9005: "image file not found", 9006: "directory", 9007: "but the annotations say",
                9008: "over data.max_image_pixels", 9009: "unreadable", 9010: "not in 'images'"}


def _inject(good_dir: Path, good_json: Path, out: Path) -> Path:
    """A copy of a COCO-format split with ten bad images added (nine in the annotations)."""
    shutil.copytree(good_dir, out / "images")
    spec = json.loads(good_json.read_text())
    sample = Image.open(next((out / "images").glob("*.jpg"))).convert("RGB")
    files = {}
    jpeg, buf = next((out / "images").glob("*.jpg")).read_bytes(), io.BytesIO()
    sample.save(buf, "PNG")
    png = buf.getvalue()
    files[9001] = ("empty.jpg", b"")
    files[9002] = ("truncated.jpg", jpeg[: len(jpeg) // 2])
    files[9003] = ("truncated.png", png[: len(png) // 2])
    files[9004] = ("notes.png", b"this is a text file, not an image\n")
    files[9005] = ("missing.png", None)
    files[9006] = ("folder.png", "dir")
    sample.resize((200, 180)).save(out / "images" / "resized.png")
    files[9007] = ("resized.png", "exists")
    Image.new("RGB", (1200, 1000), (90, 90, 90)).save(out / "images" / "large.png")
    files[9008] = ("large.png", "exists")
    broken = bytearray(png)
    broken[29] ^= 0xFF  # the IHDR chunk's CRC
    files[9009] = ("broken-header.png", bytes(broken))
    for image_id, (name, content) in files.items():
        path = out / "images" / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "dir":
            path.mkdir()
        spec["images"].append({"id": image_id, "file_name": name, "width": 256, "height": 256})
    path = out / "instances.json"
    path.write_text(json.dumps(spec))
    return path


def _pipeline(tmp_path: Path, name: str, env, data: Path, test_json: Path, calib_ids, test_ids):
    run = tmp_path / name
    args = [MFIBA, "run", "--preset", "demo", "--workers", "2",
            "--set", "data.source=coco",
            "--set", f"data.coco_images={{'calib': '{data / 'calib'}', 'test': '{test_json.parent / 'images'}'}}"
            if name == "bad" else
            f"data.coco_images={{'calib': '{data / 'calib'}', 'test': '{data / 'test'}'}}",
            "--set", f"data.coco_instances={{'calib': '{data / 'calib.json'}', 'test': '{test_json}'}}",
            "--set", f"data.image_ids={{'calib': {list(calib_ids)}, 'test': {list(test_ids)}}}",
            "--set", "data.max_image_pixels=1000000",
            "--set", f"run_dir={run}", "--set", f"features.store={run / 'features.zarr'}",
            "--set", "features.splits=[calib, test]",
            "--set", "codecs.main.phis=[10, 20, 30, 45, 60]", "--set", "precode.batch_size=2",
            "--set", "tune.rate_points=[0, 1, 2, 3, 4]", "--set", f"evaluate.images={len(test_ids)}",
            "--set", "evaluate.pool_modes=[coded]", "--set", "evaluate.bootstrap=10"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return json.loads(p.stdout[p.stdout.index("{"):]), run


@pytest.mark.slow
def test_demo_run_with_ten_bad_images_reports_them_and_matches_a_clean_run(tmp_path, cli_env):
    from mfiba.config import load_config
    from tasks.datasets.sources import image_refs

    data = tmp_path / "data"
    cfg = load_config("demo", [f"data.root={data}", "data.train_count=0", "data.calib_count=4",
                               "data.test_count=6"])
    refs = image_refs(cfg, ["calib", "test"])  # renders the synthetic splits in COCO format
    calib_ids = [r.image_id for r in refs["calib"]]
    good_ids = [r.image_id for r in refs["test"]]
    bad_json = _inject(data / "test", data / "test.json", tmp_path / "bad-test")

    clean, _ = _pipeline(tmp_path, "clean", cli_env, data, data / "test.json", calib_ids, good_ids)
    bad_ids = sorted(BAD_KINDS)
    mixed = [i for pair in zip(good_ids, bad_ids) for i in pair] + bad_ids[len(good_ids):]
    bad, bad_run = _pipeline(tmp_path, "bad", cli_env, data, bad_json, calib_ids, mixed)

    assert set(map(int, bad["skipped_images"])) == set(bad_ids)
    for image_id, words in REASON_WORDS.items():
        assert words in bad["skipped_images"][str(image_id)], (image_id, BAD_KINDS[image_id])
    report = Path(bad["report"]).read_text()
    assert f"## Skipped images (10 of {len(mixed)} selected test images)" in report
    assert all(f"| {i} |" in report for i in bad_ids)
    # Every number on the good images equals the clean run's.
    cols = ["method", "pool_mode", "point", "bpp_input", "AP_bbox", "AP75_bbox"]
    a = pd.read_csv(clean["rd_points"])[cols].sort_values(cols[:3], ignore_index=True)
    b = pd.read_csv(bad["rd_points"])[cols].sort_values(cols[:3], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    assert bad["images"] == clean["images"] == len(good_ids)
