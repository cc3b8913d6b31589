"""Task accuracy of a task model on a COCO-format split (pycocotools), lossless features."""
from __future__ import annotations

import torch

from tasks.datasets.coco import CocoDataset, image_to_tensor
from tasks.evaluation.coco_eval import detections_to_coco, evaluate
from tasks.models.registry import TaskModel


def load_images(dataset: CocoDataset, image_ids: list[int]) -> list[torch.Tensor]:
    return [image_to_tensor(dataset.load_image(iid)) for iid in image_ids]


def evaluate_model(model: TaskModel, dataset: CocoDataset, image_ids: list[int], batch_size: int = 8) -> dict:
    """AP metrics per task the model serves, on the given images."""
    results: list[dict] = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        for iid, det in zip(ids, model(load_images(dataset, ids))):
            results += detections_to_coco(iid, det, model.keypoint_category_ids)
    gt = dataset.to_coco(image_ids)
    return {iou: evaluate(gt, results, iou, image_ids=image_ids) for iou in model.tasks}
