"""tasks/evaluation/fast_ap.py equals pycocotools' COCOeval exactly on one image."""
import numpy as np
import pytest

from tasks.evaluation.coco_eval import evaluate
from tasks.evaluation.fast_ap import bbox_ap_one_image

CATEGORIES = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 5)]


def _case(seed: int):
    rng = np.random.default_rng(seed)
    n_gt, n_dt = int(rng.integers(0, 8)), int(rng.integers(0, 130 if seed % 7 == 0 else 25))
    gt = []
    for k in range(n_gt):
        x, y = rng.uniform(0, 200, 2)
        w, h = rng.uniform(2, 80, 2)
        gt.append({"id": k + 1, "image_id": 1, "category_id": int(rng.choice([1, 2, 3])), "bbox": [x, y, w, h],
                   "area": float(w * h), "iscrowd": int(rng.random() < 0.15)})
    results = []
    for _ in range(n_dt):
        if gt and rng.random() < 0.6:  # near a ground truth box
            g = gt[int(rng.integers(len(gt)))]
            box = (np.array(g["bbox"]) + rng.normal(0, 4, 4) * [1, 1, 0.5, 0.5]).tolist()
            box[2], box[3] = abs(box[2]) + 0.5, abs(box[3]) + 0.5
            cat = g["category_id"] if rng.random() < 0.9 else int(rng.choice([1, 2, 3, 5]))
        else:
            box = [*rng.uniform(0, 200, 2), *rng.uniform(1, 60, 2)]
            cat = int(rng.choice([1, 2, 3, 5]))
        score = float(np.round(rng.random(), 1 if seed % 3 == 0 else 6))  # ties when rounded
        results.append({"image_id": 1, "category_id": cat, "bbox": [float(v) for v in box], "score": score})
    gt_doc = {"images": [{"id": 1, "width": 300, "height": 300}], "annotations": gt, "categories": CATEGORIES}
    return gt_doc, results


@pytest.mark.parametrize("seed", range(120))
def test_equals_cocoeval(seed):
    gt_doc, results = _case(seed)
    ref = evaluate(gt_doc, results, "bbox", image_ids=[1])
    ap, ap75 = bbox_ap_one_image(gt_doc["annotations"], results, [c["id"] for c in CATEGORIES])
    for mine, theirs in ((ap, ref["AP"]), (ap75, ref["AP75"])):
        assert (np.isnan(mine) and np.isnan(theirs)) or mine == theirs, (seed, mine, theirs)


@pytest.mark.parametrize("seed", range(8))
def test_equals_cocoeval_with_unlisted_categories_and_over_max_dets_in_several(seed):
    """Categories are evaluated together in one array: detections of a category the ground
    truth does not list are left out (as COCOeval does), and each category keeps its own top
    100 by score."""
    gt_doc, results = _case(7 * seed)  # seed % 7 == 0: up to 130 detections
    rng = np.random.default_rng(seed)
    extra = [{**r, "category_id": int(rng.choice([1, 9])), "score": float(rng.random())} for r in results]
    results = results + extra  # over 100 in several categories, and category 9 unlisted
    ref = evaluate(gt_doc, results, "bbox", image_ids=[1])
    ap, ap75 = bbox_ap_one_image(gt_doc["annotations"], results, [c["id"] for c in CATEGORIES])
    for mine, theirs in ((ap, ref["AP"]), (ap75, ref["AP75"])):
        assert (np.isnan(mine) and np.isnan(theirs)) or mine == theirs, (seed, mine, theirs)
