"""Pass loss against the model's own lossless output: 0 for identical output, grows with damage."""
from pathlib import Path

import pytest
import torch

from tasks.datasets.synthetic import categories_json
from tasks.evaluation.pass_loss import pass_loss, reference_from_detections
from tasks.models.registry import build_task_model
from tasks.models.sensitivity import quantise_scale

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_image():
    from tasks.datasets.synthetic import SyntheticSpec, render
    from tasks.models.training import image_to_tensor
    import io
    from PIL import Image

    model = build_task_model("demo-multitask", str(REPO / "assets/demo-task-model/demo_task_model.pt"))
    data, rec, _ = render(SyntheticSpec(), "test", 1)
    return model, image_to_tensor(Image.open(io.BytesIO(data))), rec


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_lossless_pass_has_zero_loss_and_damage_costs(model_and_image, iou_type):
    model, image, rec = model_and_image
    feats, meta = model.features([image])
    lossless = model.heads(feats, meta)[0]
    ref = reference_from_detections(rec["id"], lossless, 256, 256, categories_json(), model.keypoint_category_ids)
    assert not ref.empty
    assert pass_loss(ref, rec["id"], lossless, iou_type, model.keypoint_category_ids) == pytest.approx(0.0, abs=1e-9)
    damaged = model.heads(quantise_scale(feats, "0", 8.0), meta)[0]
    loss = pass_loss(ref, rec["id"], damaged, iou_type, model.keypoint_category_ids)
    assert 0.0 <= loss <= 1.0
    if iou_type == "bbox":
        assert loss > 0.0


def test_empty_reference_is_zero_loss_and_flagged():
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ref = reference_from_detections(7, empty, 64, 64, categories_json())
    assert ref.empty and pass_loss(ref, 7, empty, "bbox") == 0.0
