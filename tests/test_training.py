"""Demo-model training: a few steps on CPU, atomic state, resume from the last state."""
import json

import torch

from tasks.datasets.synthetic import SyntheticSpec
from tasks.models.demo import DemoModelSpec, load_checkpoint
from tasks.models.training import TrainSpec, train_demo_model

SMALL = DemoModelSpec(trunk_widths=(8, 16, 16, 16), fpn_channels=16, box_head_dim=32,
                      mask_head_layers=(16,), keypoint_head_layers=(16,))


def test_train_then_resume(tmp_path):
    spec = TrainSpec(iterations=2, batch_size=2, workers=0, warmup=1, checkpoint_every=1, train_images=8)
    out = train_demo_model(tmp_path, SMALL, SyntheticSpec(), spec, log=lambda *_: None)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 2
    spec.iterations = 3
    logs = []
    train_demo_model(tmp_path, SMALL, SyntheticSpec(), spec, log=logs.append)
    assert any("resuming demo-model training at step 2" in str(m) for m in logs)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 3
    model, loaded_spec, extra = load_checkpoint(out)
    assert extra["step"] == 3 and extra["complete"] and loaded_spec == SMALL
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] >= 1
