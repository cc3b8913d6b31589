"""Task loss of one precoding pass, measured without ground truth (an encoder has none).

The reference is the task model's own output on lossless features: its detections with
score >= 0.5 become pseudo ground truth; the loss of a pass (one scale replaced by its
decoded version) is 1 - AP@[.5:.95] of the pass's detections against that reference, with
boxes for detection, masks for segmentation and OKS for keypoints. An image with an empty
reference has nothing to lose: loss 0, flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.evaluation.coco_eval import detections_to_coco, evaluate
from tasks.evaluation.fast_ap import bbox_ap_one_image

REFERENCE_SCORE = 0.5


@dataclass(frozen=True)
class Reference:
    gt: dict  # a one-image COCO dataset
    empty: bool


def reference_from_detections(image_id: int, det: dict, height: int, width: int, categories: list[dict],
                              keypoint_category_ids=(), score_threshold: float = REFERENCE_SCORE) -> Reference:
    """Lossless detections above the threshold as a one-image COCO ground truth."""
    results = detections_to_coco(image_id, det, keypoint_category_ids, score_threshold=score_threshold)
    annotations = []
    for k, r in enumerate(results, start=1):
        x, y, w, h = r["bbox"]
        ann = {"id": k, "image_id": int(image_id), "category_id": r["category_id"], "bbox": r["bbox"],
               "area": float(w * h), "iscrowd": 0}
        if "segmentation" in r:
            from pycocotools import mask as mask_utils

            ann["segmentation"] = r["segmentation"]
            ann["area"] = float(mask_utils.area(r["segmentation"]))
        if "keypoints" in r:
            kp = np.asarray(r["keypoints"], float).reshape(-1, 3)
            kp[:, 2] = 2  # every predicted keypoint counts as visible in the reference
            ann["keypoints"] = kp.reshape(-1).tolist()
            ann["num_keypoints"] = int(len(kp))
        annotations.append(ann)
    gt = {"images": [{"id": int(image_id), "height": int(height), "width": int(width)}],
          "annotations": annotations, "categories": categories}
    return Reference(gt, not annotations)


def pass_losses(reference: Reference, image_id: int, det: dict, iou_type: str,
                keypoint_category_ids=(), cocoeval: bool = False) -> tuple[float, float]:
    """(1 - AP@[.5:.95], 1 - AP@.75) of one pass's detections against the reference
    (0 for an empty one): the loss the allocation uses, and the one the paper's Table 1
    also fits. `cocoeval`: through pycocotools even for boxes (the reference loop)."""
    if reference.empty:
        return 0.0, 0.0
    if iou_type == "keypoints" and not any(
            "keypoints" in a for a in reference.gt["annotations"]):
        return 0.0, 0.0
    results = detections_to_coco(image_id, det, keypoint_category_ids)
    ap, ap75 = one_image_ap(reference.gt, image_id, results, iou_type, cocoeval)
    # NaN: the reference has no objects of an evaluated kind; nothing to lose.
    return tuple(0.0 if not np.isfinite(v) else float(1.0 - v) for v in (ap, ap75))


def one_image_ap(gt: dict, image_id: int, results: list[dict], iou_type: str,
                 cocoeval: bool = False) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.75) of one image: boxes through the exact fast path (no COCO
    indexes; tasks/evaluation/fast_ap.py), masks and keypoints through COCOeval."""
    if iou_type == "bbox" and not cocoeval:
        anns = [a for a in gt["annotations"] if int(a["image_id"]) == int(image_id)]
        return bbox_ap_one_image(anns, results, [c["id"] for c in gt["categories"]])
    stats = evaluate(gt, results, iou_type, image_ids=[int(image_id)])
    return float(stats["AP"]), float(stats["AP75"])


def pass_loss(reference: Reference, image_id: int, det: dict, iou_type: str, keypoint_category_ids=()) -> float:
    """1 - AP@[.5:.95] of one pass's detections against the reference (0 for an empty one)."""
    return pass_losses(reference, image_id, det, iou_type, keypoint_category_ids)[0]


def ground_truth_ap(gt: dict, image_id: int, det: dict, iou_type: str, keypoint_category_ids=()) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.75) of detections against the image's real annotations: the oracle
    the authors' code uses for importance labels (NaN when the image has nothing of that kind)."""
    return one_image_ap(gt, image_id, detections_to_coco(image_id, det, keypoint_category_ids), iou_type)
