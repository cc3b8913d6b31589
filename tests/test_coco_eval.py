"""COCO evaluation wrappers: perfect, degraded and empty results, and the image bootstrap."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.evaluation.coco_eval import (
    bootstrap_ap,
    detections_to_coco,
    evaluate,
    make_cocoeval,
    paired_bootstrap_delta,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "coco2017-val-sample"


# -- ground truths -------------------------------------------------------------------------

def _square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def tiny_gt() -> dict:
    """Two 64x64 images; category 2 has 3 keypoints and its own OKS sigmas."""
    anns, next_id = [], 1
    for image_id, objects in ((1, [(1, 4, 4, 20), (2, 30, 30, 24)]), (2, [(2, 8, 8, 40), (1, 50, 2, 10)])):
        for category_id, x, y, side in objects:
            ann = {"id": next_id, "image_id": image_id, "category_id": category_id,
                   "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0,
                   "segmentation": _square(x, y, side)}
            if category_id == 2:
                ann["keypoints"] = [x + 2, y + 2, 2, x + side - 2, y + 2, 2, x + side / 2, y + side - 2, 2]
                ann["num_keypoints"] = 3
            anns.append(ann)
            next_id += 1
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"},
                       {"id": 2, "name": "walker", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]],
                        "oks_sigmas": [0.05, 0.06, 0.07]}],
    }


def perfect_results(gt, keypoint_category_ids) -> list[dict]:
    """The non-crowd ground truth as score-1 results (keypoints only where some are labelled)."""
    from pycocotools.coco import COCO

    if isinstance(gt, dict):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    else:
        coco = gt
    results = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd"):
            continue
        rle = coco.annToRLE(ann)
        result = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
                  "score": 1.0, "segmentation": {"size": rle["size"], "counts": rle["counts"]}}
        # A GT with no labelled keypoints is ignored; a result with all-zero keypoints would
        # then be an unmatched false positive, so none is given for it.
        if ann["category_id"] in keypoint_category_ids and ann.get("num_keypoints", 0) > 0:
            result["keypoints"] = list(ann["keypoints"])
        results.append(result)
    return results


def jittered(results, rng, scale=0.15) -> list[dict]:
    """Boxes moved by noise proportional to their size, with random scores."""
    out = []
    for r in results:
        x, y, w, h = r["bbox"]
        dx, dy = rng.normal(0, scale, 2) * np.sqrt(w * h)
        out.append(dict(r, bbox=[x + dx, y + dy, w, h], score=float(rng.random())))
    return out


@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.is_dir():
        pytest.skip(f"COCO sample not found at {SAMPLE}: ../shared is absent")
    from tasks.datasets.coco import CocoDataset

    return CocoDataset(SAMPLE / "images", SAMPLE / "annotations/instances.json",
                       SAMPLE / "annotations/person_keypoints.json")


@pytest.fixture(scope="module")
def sample_results(sample):
    kp_ids = {c["id"] for c in sample.keypoint_categories}
    return perfect_results(sample.to_coco(), kp_ids)


# -- tiny synthetic ground truth -----------------------------------------------------------

@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_results_tiny(iou_type):
    gt = tiny_gt()
    stats = evaluate(gt, perfect_results(gt, {2}), iou_type)
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0)
    if iou_type == "keypoints":
        assert "APs" not in stats and stats["APm"] == pytest.approx(1.0)
    else:
        assert stats["APs"] == pytest.approx(1.0)
        assert math.isnan(stats["APl"])  # no GT above 96^2 px: pycocotools' -1 becomes NaN


def test_keypoint_evaluation_uses_category_sigmas():
    gt = tiny_gt()
    ev = make_cocoeval(gt, perfect_results(gt, {2}), "keypoints")
    assert ev.params.catIds == [2]
    np.testing.assert_allclose(ev.params.kpt_oks_sigmas, [0.05, 0.06, 0.07])
    ev = make_cocoeval(gt, perfect_results(gt, {2}), "keypoints", keypoint_sigmas=[0.1, 0.1, 0.1])
    np.testing.assert_allclose(ev.params.kpt_oks_sigmas, [0.1, 0.1, 0.1])
    del gt["categories"][1]["oks_sigmas"]
    with pytest.raises(ValueError, match=r"\[3\] keypoints but there are 17 OKS sigmas"):
        evaluate(gt, [], "keypoints")


def test_gt_dict_is_not_modified():
    gt = tiny_gt()
    before = copy.deepcopy(gt)
    results = perfect_results(gt, {2})
    results_before = copy.deepcopy(results)
    evaluate(gt, results, "segm")
    assert gt == before and results == results_before


def test_shifted_boxes_lower_ap():
    gt = tiny_gt()
    results = perfect_results(gt, {2})
    for r in results:
        r["bbox"] = [r["bbox"][0] + 0.3 * r["bbox"][2], *r["bbox"][1:]]
    stats = evaluate(gt, results, "bbox")
    assert 0.0 <= stats["AP"] < 0.5


def test_empty_results_give_zero(capsys):
    gt = tiny_gt()
    for iou_type in ("bbox", "segm", "keypoints"):
        stats = evaluate(gt, [], iou_type)
        assert stats["AP"] == 0.0 and stats["AP50"] == 0.0
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_detections_to_coco_roundtrip():
    """Ground truth as a torchvision output dict converts back to results scoring AP 1."""
    from pycocotools.coco import COCO

    gt = tiny_gt()
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    results = []
    for image_id in (1, 2):
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32)
        masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() * 0.9 for a in anns])[:, None]
        keypoints = torch.tensor(np.array([np.reshape(a.get("keypoints", [0] * 9), (3, 3)) for a in anns]), dtype=torch.float32)
        det = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
               "scores": torch.tensor([0.9, 0.8]), "masks": masks, "keypoints": keypoints,
               "keypoints_scores": torch.ones(len(anns), 3)}
        converted = detections_to_coco(image_id, det, keypoint_category_ids=[2])
        assert all(isinstance(r["segmentation"]["counts"], str) for r in converted)
        assert all(("keypoints" in r) == (r["category_id"] == 2) for r in converted)
        assert all(r["keypoints"][2::3] == [1.0, 1.0, 1.0] for r in converted if "keypoints" in r)
        assert detections_to_coco(image_id, det, [2], score_threshold=0.85) == converted[:1]
        results += converted
    for iou_type in ("bbox", "segm", "keypoints"):
        assert evaluate(gt, results, iou_type)["AP"] == pytest.approx(1.0)


def test_synthetic_split_perfect(tmp_path):
    from tasks.datasets.coco import CocoDataset
    from tasks.datasets.synthetic import SyntheticSpec, write_split

    ann_path = write_split(SyntheticSpec(), "test", 4, tmp_path)
    ds = CocoDataset(tmp_path / "test", ann_path)
    kp_ids = {c["id"] for c in ds.keypoint_categories}
    results = perfect_results(ds.to_coco(), kp_ids)
    for iou_type in ("bbox", "segm", "keypoints"):
        assert evaluate(ds.to_coco(), results, iou_type)["AP"] == pytest.approx(1.0)


# -- the real COCO sample --------------------------------------------------------------------

@pytest.mark.coco
@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_results_sample(sample, sample_results, iou_type):
    stats = evaluate(sample.to_coco(), sample_results, iou_type)
    for key in ("AP", "AP50", "AP75", "APm", "APl"):
        assert stats[key] == pytest.approx(1.0), key


@pytest.mark.coco
def test_gt_as_path_and_subset(sample_results):
    results = [r for r in sample_results if r["image_id"] in (139, 802)]
    stats = evaluate(SAMPLE / "annotations/instances.json", results, "bbox", image_ids=[139, 802])
    assert stats["AP"] == pytest.approx(1.0)
    stats = evaluate(str(SAMPLE / "annotations/person_keypoints.json"), results, "keypoints", image_ids=[139, 802])
    assert stats["AP"] == pytest.approx(1.0)


@pytest.mark.coco
def test_shifted_boxes_lower_ap_sample(sample, sample_results):
    noisy = jittered(sample_results, np.random.default_rng(0))
    assert evaluate(sample.to_coco(), noisy, "bbox")["AP"] < 0.8


@pytest.mark.coco
def test_bootstrap_sample(sample, sample_results):
    rng = np.random.default_rng(1)
    noisy = jittered(sample_results, rng)
    full = make_cocoeval(sample.to_coco(), noisy, "bbox")
    few = make_cocoeval(sample.to_coco(), noisy, "bbox", image_ids=sample.image_ids[:40])

    started = time.perf_counter()
    draws = bootstrap_ap(full, n_boot=60, seed=0)
    per_resample = (time.perf_counter() - started) / 60
    assert per_resample < 0.5

    assert draws.shape == (60,)
    assert abs(draws.mean() - full.stats[0]) < 0.03
    assert draws.std() > 0
    assert bootstrap_ap(few, n_boot=60, seed=0).std() > draws.std()
    np.testing.assert_array_equal(draws, bootstrap_ap(full, n_boot=60, seed=0))  # seeded

    # The identity resample reproduces COCOeval's own AP.
    from tasks.evaluation.coco_eval import _resampled_ap
    n = len(full._paramsEval.imgIds)
    assert _resampled_ap(full, 0, np.arange(n)) == pytest.approx(full.stats[0])
    assert _resampled_ap(full, 1, np.arange(n)) == pytest.approx(full.stats[3])  # small

    medium = bootstrap_ap(full, n_boot=20, seed=0, area="medium")
    assert abs(medium.mean() - full.stats[4]) < 0.05


@pytest.mark.coco
def test_paired_bootstrap_sample(sample, sample_results):
    rng = np.random.default_rng(2)
    ev_a = make_cocoeval(sample.to_coco(), jittered(sample_results, rng, 0.05), "bbox")
    ev_b = make_cocoeval(sample.to_coco(), jittered(sample_results, rng, 0.2), "bbox")
    np.testing.assert_array_equal(paired_bootstrap_delta(ev_a, ev_a, n_boot=20), np.zeros(20))
    delta = paired_bootstrap_delta(ev_a, ev_b, n_boot=20)
    assert np.all(delta > 0)  # less jitter is better on every resample
    assert delta.mean() == pytest.approx(ev_a.stats[0] - ev_b.stats[0], abs=0.03)
    few = make_cocoeval(sample.to_coco(), [], "bbox", image_ids=sample.image_ids[:10])
    with pytest.raises(ValueError, match="same image ids"):
        paired_bootstrap_delta(ev_a, few)


def test_paired_bootstrap_tiny_keypoints():
    gt = tiny_gt()
    ev = make_cocoeval(gt, perfect_results(gt, {2}), "keypoints")
    np.testing.assert_array_equal(paired_bootstrap_delta(ev, ev, n_boot=5), np.zeros(5))
    assert np.allclose(bootstrap_ap(ev, n_boot=5), 1.0)
    with pytest.raises(ValueError, match="area must be one of"):
        bootstrap_ap(ev, area="small")  # keypoint evaluation has no small range
