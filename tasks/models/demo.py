"""The compact multi-task demo model: one FPN backbone shared by box, mask and keypoint heads.

Assembled from torchvision's detection parts (its R-CNN classes, RPN, RoI heads, FPN), with
a slim ResNet trunk made of torchvision's own BasicBlocks so that the checkpoint stays small
and CPU passes stay cheap. Two choices make it a fair testbed for bit allocation:
- anchors and the RoI level mapping are set for 256-px inputs (canonical RoI size 64 px),
  so small boxes pool from '0', medium from '1' and large from '2'/'3', as 800-px COCO
  images do with torchvision's defaults (canonical 224 px);
- it is trained from scratch with BatchNorm (no ImageNet weights reach these machines).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


@dataclass
class DemoModelSpec:
    num_classes: int = 7  # 6 synthetic categories + background
    num_keypoints: int = 5
    image_size: int = 256
    trunk_widths: tuple[int, ...] = (32, 64, 128, 256)
    fpn_channels: int = 64
    roi_canonical_scale: int = 64
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    box_head_dim: int = 256
    mask_head_layers: tuple[int, ...] = (64, 64, 64, 64)
    keypoint_head_layers: tuple[int, ...] = (64, 64, 64, 64)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DemoModelSpec":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


class SlimResNet(nn.Module):
    """ResNet-18 layout (2 BasicBlocks per stage) at reduced widths."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = widths[0]
        for i, w in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            down = None
            if stride != 1 or in_ch != w:
                down = nn.Sequential(nn.Conv2d(in_ch, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layer = nn.Sequential(BasicBlock(in_ch, w, stride, down), BasicBlock(w, w))
            setattr(self, f"layer{i}", layer)
            in_ch = w

    def forward(self, x):  # only used through IntermediateLayerGetter
        raise NotImplementedError


def build_demo_model(spec: DemoModelSpec) -> MaskRCNN:
    trunk = SlimResNet(spec.trunk_widths)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=list(spec.trunk_widths),
        out_channels=spec.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    c = spec.fpn_channels
    anchors = AnchorGenerator(tuple((s,) for s in spec.anchor_sizes), ((0.5, 1.0, 2.0),) * len(spec.anchor_sizes))
    levels = ["0", "1", "2", "3"]

    def roi_align(size: int) -> MultiScaleRoIAlign:
        return MultiScaleRoIAlign(levels, size, 2, canonical_scale=spec.roi_canonical_scale, canonical_level=4)

    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=spec.image_size,
        max_size=spec.image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_roi_pool=roi_align(7),
        box_head=TwoMLPHead(c * 7 * 7, spec.box_head_dim),
        box_predictor=FastRCNNPredictor(spec.box_head_dim, spec.num_classes),
        box_batch_size_per_image=256,
        box_detections_per_img=100,
        mask_roi_pool=roi_align(14),
        mask_head=MaskRCNNHeads(c, list(spec.mask_head_layers), 1),
        mask_predictor=MaskRCNNPredictor(spec.mask_head_layers[-1], spec.mask_head_layers[-1], spec.num_classes),
    )
    heads = model.roi_heads
    heads.keypoint_roi_pool = roi_align(14)
    heads.keypoint_head = KeypointRCNNHeads(c, list(spec.keypoint_head_layers))
    heads.keypoint_predictor = KeypointRCNNPredictor(spec.keypoint_head_layers[-1], spec.num_keypoints)
    return model


def save_checkpoint(model: nn.Module, spec: DemoModelSpec, path, extra: dict | None = None) -> None:
    """Weights in float16 (BatchNorm statistics included) to keep the committed file small."""
    state = OrderedDict(
        (k, v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()
    )
    torch.save({"format": "mfiba-demo-model/1", "spec": spec.to_dict(), "state_dict": state,
                "extra": extra or {}}, path)


def load_checkpoint(path, map_location="cpu") -> tuple[MaskRCNN, DemoModelSpec, dict]:
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if blob.get("format") != "mfiba-demo-model/1":
        raise ValueError(f"{path}: not an mfiba demo-model checkpoint (format={blob.get('format')!r})")
    spec = DemoModelSpec.from_dict(blob["spec"])
    model = build_demo_model(spec)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    model.load_state_dict(state)
    model.eval()
    return model, spec, blob.get("extra", {})
