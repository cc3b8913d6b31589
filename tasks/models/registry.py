"""Task networks split where feature coding cuts them: features() on the edge, heads() on the server.

Every registered model exposes the same two calls, so one scale can be swapped for its decoded
version without rerunning the backbone:

    feats, meta = model.features(images)      # OrderedDict '0','1','2','3','pool'
    detections = model.heads(feats, meta)      # torchvision-style dicts, original coordinates
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tasks.device import COMPUTE_LOCK

SCALES = ("0", "1", "2", "3", "pool")
STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}


class WeightsNotFoundError(FileNotFoundError):
    """Raised when COCO weights are neither in TORCH_HOME's cache nor at an explicit path."""


@dataclass
class SplitMeta:
    """What the heads need besides the features: sizes before and after the model's resize."""

    image_sizes: list[tuple[int, int]]  # after the transform's resize, before batching pad
    original_sizes: list[tuple[int, int]]
    batch_shape: tuple[int, int]  # padded tensor size the backbone saw


class TaskModel:
    """A torchvision GeneralizedRCNN split into features() and heads()."""

    def __init__(self, name: str, net: nn.Module, tasks: tuple[str, ...], keypoint_category_ids=(), weights: str = ""):
        self.name, self.net, self.tasks = name, net.eval(), tasks
        self.keypoint_category_ids = tuple(keypoint_category_ids)
        self.weights = weights  # what was loaded, for provenance ("random-init" when allowed)

    @property
    def fpn_channels(self) -> int:
        return self.net.backbone.out_channels

    def to(self, device) -> "TaskModel":
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def features(self, images: list[torch.Tensor]) -> tuple["OrderedDict[str, torch.Tensor]", SplitMeta]:
        """images: float RGB tensors (3, H, W) in [0, 1]."""
        images = [i.to(self.device) for i in images]
        original = [tuple(i.shape[-2:]) for i in images]
        with COMPUTE_LOCK:
            image_list, _ = self.net.transform(images)
            feats = self.net.backbone(image_list.tensors)
        meta = SplitMeta([tuple(s) for s in image_list.image_sizes], original, tuple(image_list.tensors.shape[-2:]))
        return feats, meta

    @torch.no_grad()
    def heads(self, feats: "OrderedDict[str, torch.Tensor]", meta: SplitMeta, tasks=None,
              reuse: "PassReuse | None" = None) -> list[dict]:
        """Detections from features. `tasks` (e.g. ("bbox",)) runs only the branches those
        tasks need: boxes are identical either way, and mask and keypoint branches are most
        of the head time (demo model: 0.06 s box-only vs 0.34 s all, per 256-px image).
        `reuse`: a batch of precoding passes that each changed only some scales of one
        image; what did not change is taken from the lossless pass (see PassReuse)."""
        with COMPUTE_LOCK:  # heads() swaps modules of the shared network (see COMPUTE_LOCK)
            return self._heads(feats, meta, tasks, reuse)

    def _heads(self, feats, meta: SplitMeta, tasks=None, reuse: "PassReuse | None" = None) -> list[dict]:
        if reuse is not None:
            with reuse.installed(self.net):
                return self.heads(feats, meta, tasks)
        if tasks is not None:
            with self._only_branches(tasks):
                return self.heads(feats, meta)
        from torchvision.models.detection.image_list import ImageList

        feats = OrderedDict((k, feats[k].to(self.device)) for k in SCALES)
        n = feats["0"].shape[0]
        dummy = torch.empty((n, 3, *meta.batch_shape), device=self.device)  # the RPN reads only its shape
        image_list = ImageList(dummy, [tuple(s) for s in meta.image_sizes])
        proposals, _ = self.net.rpn(image_list, feats)
        detections, _ = self.net.roi_heads(feats, proposals, image_list.image_sizes)
        return self.net.transform.postprocess(detections, image_list.image_sizes, meta.original_sizes)

    @contextlib.contextmanager
    def _only_branches(self, tasks):
        # torchvision's RoIHeads runs a branch when its RoI pool is set (callers hold
        # COMPUTE_LOCK: the network is shared by a worker's threads).
        rh = self.net.roi_heads
        saved = {"mask_roi_pool": rh.mask_roi_pool, "keypoint_roi_pool": rh.keypoint_roi_pool}
        if "segm" not in tasks:
            rh.mask_roi_pool = None
        if "keypoints" not in tasks:
            rh.keypoint_roi_pool = None
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(rh, k, v)

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        feats, meta = self.features(images)
        return self.heads(feats, meta)


class PassReuse:
    """What a batch of precoding passes over one image can take from the lossless pass.

    Pass b changed only the scales in changed[b]. Two parts of the heads work per level or
    per proposal, so their lossless results carry over exactly:
    - the RPN works on each level separately up to its last step (head, anchors, top-n,
      decoding, clipping, NMS: torchvision's batched NMS runs per level): a level a pass
      did not change has the lossless candidates and NMS survivors, so the precoding's
      m x scales passes cost about m full RPNs instead of m x scales; only the merge of
      the levels by score runs per pass;
    - a proposal equal (same coordinates) to a lossless one and pooled from a level the pass
      did not change has the lossless box features, hence the lossless class logits and box
      deltas: the RoI pooling and box head run only on the other proposals.
    The same operations on the same inputs: equal up to the last float bits that a batch of
    another size can change in MKL-DNN's sums (tested)."""

    def __init__(self, model: "TaskModel", feats: "OrderedDict[str, torch.Tensor]", meta: SplitMeta,
                 changed: list[set[str]] | None = None):
        from torchvision.models.detection.image_list import ImageList

        self.changed = [set(c) for c in changed or []]
        net = model.net
        feats = OrderedDict((k, feats[k].to(model.device)) for k in SCALES)
        with torch.no_grad(), COMPUTE_LOCK:
            dummy = torch.empty((1, 3, *meta.batch_shape), device=model.device)
            image_list = ImageList(dummy, [tuple(s) for s in meta.image_sizes])
            captured = {}  # from the RPN's own call: its anchors, and the decoded boxes and scores

            def capture(boxes, objectness, image_shapes, anchors_per_level):
                captured.update(boxes=boxes[0], objectness=objectness.reshape(-1), counts=anchors_per_level)
                return type(net.rpn).filter_proposals(net.rpn, boxes, objectness, image_shapes, anchors_per_level)

            net.rpn.filter_proposals = capture
            hook = net.rpn.anchor_generator.register_forward_hook(
                lambda m, args, anchors: captured.update(anchors=anchors[0]))
            try:
                proposals, _ = net.rpn(image_list, feats)
            finally:
                del net.rpn.filter_proposals
                hook.remove()
            self.lossless_proposals = proposals[0]
            self.anchors = captured["anchors"]  # the RPN's own, not generated a second time
            starts = [sum(captured["counts"][:i]) for i in range(len(SCALES))]
            self.level_slices = [slice(a, a + n) for a, n in zip(starts, captured["counts"])]
            # per level: the candidates (boxes, scores) entering NMS and the survivors' indices
            self.lossless_levels = [
                _level_candidates(net.rpn, captured["objectness"][sl], captured["boxes"][sl].__getitem__,
                                  meta.image_sizes[0]) for sl in self.level_slices]
            self.lossless_features = feats
            self._pooling_levels: dict[str, torch.Tensor] = {}  # channels-last lossless levels, made on demand
            rh = net.roi_heads
            logits, deltas = rh.box_predictor(rh.box_head(self._lossless_pooled(rh.box_roi_pool, proposals[0],
                                                                               image_list.image_sizes)))
        self.n_classes = logits.shape[1]
        self.lossless_boxes = torch.cat([logits, deltas], dim=1)
        # the lossless proposals' coordinates as sorted 16-byte keys: a proposal of a pass is
        # found among them exactly (bytes equal) by one binary search per batch
        keys = _box_keys(proposals[0])
        self.lossless_order = np.argsort(keys, kind="stable")
        self.lossless_keys = keys[self.lossless_order]
        # Box-path rows run and rows in all, over every batch of this image (shared by for_passes).
        self.rows = {"computed": 0, "total": 0}

    def _lossless_pooling_level(self, name: str) -> torch.Tensor:
        """The lossless level `name`, channels-last (what the RoIAlign kernel reads), made once."""
        level = self._pooling_levels.get(name)
        if level is None:
            level = self._pooling_levels[name] = self.lossless_features[name].contiguous(
                memory_format=torch.channels_last)
        return level

    def _lossless_pooled(self, pool: nn.Module, proposals: torch.Tensor, image_sizes) -> torch.Tensor:
        """MultiScaleRoIAlign's output for the lossless proposals, from the compiled kernel on
        the channels-last levels (the same values: tests/test_roi_align.py): the box head then
        runs on all rows at once, as in the plain heads, so the lossless detections are theirs
        bit for bit. Sets up the pooler's scales and level mapping as its own forward does."""
        from torchvision.ops.poolers import _filter_input, _setup_scales

        from tasks.models.roi_align import roi_align

        if pool.scales is None or pool.map_levels is None:
            pool.scales, pool.map_levels = _setup_scales(_filter_input(self.lossless_features, pool.featmap_names),
                                                         image_sizes, pool.canonical_scale, pool.canonical_level)
        levels = pool.map_levels([proposals])
        rois = torch.cat([proposals.new_zeros((len(proposals), 1)), proposals], dim=1)
        pooled = proposals.new_zeros((len(proposals), self.lossless_features[pool.featmap_names[0]].shape[1],
                                      *pool.output_size))
        for level, name in enumerate(pool.featmap_names):
            rows = torch.where(levels == level)[0]
            if len(rows):
                pooled[rows] = roi_align(self._lossless_pooling_level(name), rois[rows], pool.output_size,
                                         pool.scales[level], pool.sampling_ratio)
        return pooled

    def pooling_input(self, name: str, stacked: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level `name`'s images for pooling `rois` (batch index = pass), channels-last (what
        the RoIAlign kernel reads): a pass that did not change the level holds the lossless
        level, so one shared copy of it stands for all those passes, and only the passes that
        changed the level are converted. Returns the images and the rois renumbered to them."""
        passes = [b for b in range(len(stacked)) if name in self.changed[b]]
        lossless = self._lossless_pooling_level(name)
        if not passes:
            images = lossless
        else:
            images = torch.cat([lossless, stacked[passes].contiguous(memory_format=torch.channels_last)])
        index = torch.zeros(len(stacked), dtype=rois.dtype, device=rois.device)
        index[passes] = torch.arange(1, len(passes) + 1, dtype=rois.dtype, device=rois.device)
        return images, torch.cat([index[rois[:, 0].long()][:, None], rois[:, 1:]], dim=1)

    def for_passes(self, changed: list[set[str]]) -> "PassReuse":
        """The same lossless results for another batch of passes (one image, any quality);
        `[set()]` is the lossless pass itself, with everything taken over."""
        other = copy.copy(self)
        other.changed = [set(c) for c in changed]
        return other

    @contextlib.contextmanager
    def installed(self, net):
        rh = net.roi_heads
        saved = net.rpn, rh.box_roi_pool, rh.box_head, rh.box_predictor
        net.rpn = ReusingRpn(saved[0], self)
        rh.box_roi_pool = _ReusingBoxPath(saved[1], saved[2], saved[3], self)
        rh.box_head, rh.box_predictor = nn.Identity(), _SplitPredictions(self.n_classes)
        try:
            yield
        finally:
            net.rpn, rh.box_roi_pool, rh.box_head, rh.box_predictor = saved


def _box_keys(boxes: torch.Tensor) -> np.ndarray:
    """(n, 4) float32 boxes -> n 16-byte keys (their coordinates' bytes), sortable."""
    rows = np.ascontiguousarray(boxes.detach().cpu().numpy(), dtype=np.float32)
    return rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel()


def _level_candidates(rpn: nn.Module, logits: torch.Tensor, boxes_at: Callable, image_size) -> tuple:
    """One level of torchvision's RegionProposalNetwork.filter_proposals for one image: the
    level's top-n by objectness logit, their boxes (`boxes_at(indices)`: decoded), sigmoid,
    clipping, small and low-score removal, then NMS. Returns (candidates, their scores, the
    NMS survivors' indices in candidate order)."""
    from torchvision.ops import boxes as box_ops

    _, top = logits.topk(min(rpn.pre_nms_top_n(), logits.numel()))
    boxes, scores = box_ops.clip_boxes_to_image(boxes_at(top), image_size), torch.sigmoid(logits[top])
    keep = box_ops.remove_small_boxes(boxes, rpn.min_size)
    boxes, scores = boxes[keep], scores[keep]
    keep = torch.where(scores >= rpn.score_thresh)[0]
    boxes, scores = boxes[keep], scores[keep]
    return boxes, scores, box_ops.nms(boxes, scores, rpn.nms_thresh).sort().values


class ReusingRpn(nn.Module):
    """Stands in for the RPN (inference): a pass's proposals from the lossless candidates
    of the levels it did not change and new ones, head to NMS, for the levels it did.

    The merge is torchvision's batched NMS as it runs on CPU for more than 1,000 candidates
    (the demo's 1,740, a COCO image's 4,000 and more): NMS level by level, the survivors in
    candidate order, sorted by score, then the post-NMS top-n. The lossless pass itself gets
    torchvision's own proposals."""

    def __init__(self, rpn: nn.Module, reuse: PassReuse):
        super().__init__()
        self.rpn, self.reuse = rpn, reuse

    def forward(self, images, features: "OrderedDict[str, torch.Tensor]", targets=None):
        reuse, rpn = self.reuse, self.rpn
        x = list(features.values())
        n = x[0].shape[0]
        if n != len(reuse.changed):
            raise ValueError(f"PassReuse: {len(reuse.changed)} passes described, batch has {n}")
        levels: list[list] = [list(reuse.lossless_levels) for _ in range(n)]
        for level, scale in enumerate(SCALES):
            rows = [b for b, c in enumerate(reuse.changed) if scale in c]
            if not rows:
                continue
            logits, deltas = rpn.head([x[level][rows]])  # the rows' level in one batch
            anchors = reuse.anchors[reuse.level_slices[level]]
            for k, b in enumerate(rows):  # torchvision's (H, W, anchor) order, as the anchors
                level_logits = logits[0][k].permute(1, 2, 0).reshape(-1)
                level_deltas = deltas[0][k].view(-1, 4, *deltas[0].shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
                levels[b][level] = _level_candidates(  # decodes the top-n only
                    rpn, level_logits, lambda top: rpn.box_coder.decode_single(level_deltas[top], anchors[top]),
                    images.image_sizes[b])
        proposals = []
        for b in range(n):
            if not reuse.changed[b]:
                proposals.append(reuse.lossless_proposals)
                continue
            sizes = [len(boxes) for boxes, _, _ in levels[b]]
            boxes = torch.cat([boxes for boxes, _, _ in levels[b]])
            scores = torch.cat([scores for _, scores, _ in levels[b]])
            keep = torch.cat([kept + sum(sizes[:i]) for i, (_, _, kept) in enumerate(levels[b])])
            keep = keep[scores[keep].sort(descending=True)[1]][: rpn.post_nms_top_n()]
            proposals.append(boxes[keep])
        return proposals, {}


class _ReusingBoxPath(nn.Module):
    """Stands in for RoIHeads' box_roi_pool -> box_head -> box_predictor chain: returns the
    class logits and box deltas side by side (_SplitPredictions separates them again)."""

    ROWS_PER_BLOCK = 512

    def __init__(self, pool: nn.Module, head: nn.Module, predictor: nn.Module, reuse: PassReuse):
        super().__init__()
        self.pool, self.head, self.predictor, self.reuse = pool, head, predictor, reuse

    def forward(self, features, proposals: list[torch.Tensor], image_shapes):
        from tasks.models.roi_align import roi_align

        reuse, pool = self.reuse, self.pool
        names = list(pool.featmap_names)
        out = reuse.lossless_boxes.new_empty((sum(len(p) for p in proposals), reuse.lossless_boxes.shape[1]))
        # per proposal row: its RoI level (the pooler's mapping, set up by the lossless pass), the
        # lossless row with the same coordinates, and whether its pass changed that level
        levels = pool.map_levels(proposals).cpu().numpy()
        keys = np.concatenate([_box_keys(p) for p in proposals])
        at = np.searchsorted(reuse.lossless_keys, keys, side="right") - 1  # the last equal key, as a dict would
        found = at >= 0
        found[found] = reuse.lossless_keys[at[found]] == keys[found]
        passes = np.repeat(np.arange(len(proposals)), [len(p) for p in proposals])
        changed = np.array([[name in reuse.changed[b] for name in names] for b in range(len(proposals))],
                           dtype=bool).reshape(len(proposals), len(names))
        compute = ~found | changed[passes, levels]
        copy_to = np.flatnonzero(~compute)
        if len(copy_to):  # one gather: row-by-row tensor assignment cost more than the box head
            out[torch.from_numpy(copy_to).to(out.device)] = reuse.lossless_boxes[
                torch.from_numpy(reuse.lossless_order[at[copy_to]]).to(out.device)]
        reuse.rows["computed"] += int(compute.sum())
        reuse.rows["total"] += len(out)
        # MultiScaleRoIAlign's per-level roi_align, with each level's rows going on to the box
        # head directly: no zero-filled (rows, C, 7, 7) result to scatter the levels into.
        rois = torch.cat([torch.cat([p.new_full((len(p), 1), b), p], dim=1) for b, p in enumerate(proposals)])
        for level, name in enumerate(names):
            rows = np.flatnonzero(compute & (levels == level))
            if not len(rows):
                continue
            rows = torch.from_numpy(rows).to(out.device)
            images, level_rois = reuse.pooling_input(name, features[name], rois[rows])
            # In blocks of rows: a block's pooled features (C x 7 x 7 floats per row) stay in
            # cache between the pooling and the box head, and stay under glibc's mmap threshold
            # (fresh pages on every call cost more than the pooling itself).
            for start in range(0, len(rows), self.ROWS_PER_BLOCK):
                block = slice(start, start + self.ROWS_PER_BLOCK)
                pooled = roi_align(images, level_rois[block], pool.output_size, pool.scales[level],
                                   pool.sampling_ratio)
                out[rows[block]] = torch.cat(self.predictor(self.head(pooled)), dim=1)
        return out


class _SplitPredictions(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor):
        return x[:, :self.n_classes], x[:, self.n_classes:]


_REGISTRY: dict[str, Callable[..., TaskModel]] = {}


def register_task_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available_task_models() -> list[str]:
    return sorted(_REGISTRY)


def build_task_model(name: str, checkpoint: str | None = None, allow_random_weights: bool = False) -> TaskModel:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task model {name!r}; registered: {available_task_models()}")
    return _REGISTRY[name](checkpoint=checkpoint, allow_random_weights=allow_random_weights)


# Every process (feature extraction, precoding and evaluation workers) must build the same
# random network, or features from one backbone would meet heads from another.
RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def _seeded(seed: int):
    """Build under a fixed seed without touching the caller's random state. The RNG is
    process state: two threads building at once (a Dask worker's first tasks) would draw
    from each other's stream and get different networks, so one build at a time."""
    with COMPUTE_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_coco(builder_name: str, weights_enum_name: str, tasks: tuple[str, ...], keypoint_ids=()):
    def build(checkpoint: str | None = None, allow_random_weights: bool = False) -> TaskModel:
        import torchvision.models.detection as det

        builder = getattr(det, builder_name)
        weights = getattr(det, weights_enum_name).DEFAULT
        # weights_backbone=None: nothing is fetched for the backbone either.
        if checkpoint:
            path = Path(checkpoint).expanduser()
            if not path.exists():
                raise WeightsNotFoundError(f"{builder_name}: weights file {path} does not exist (task_model.checkpoint)")
            net = builder(weights=None, weights_backbone=None)
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            loaded = str(path)
        else:
            file_name = os.path.basename(weights.url)
            cached = _torch_hub_checkpoint_dir() / file_name
            if cached.exists():
                # torchvision's own weights API, reading the TORCH_HOME cache: no download.
                net = builder(weights=weights, weights_backbone=None, progress=False)
                loaded = str(cached)
            elif allow_random_weights:
                with _seeded(RANDOM_INIT_SEED):
                    net = builder(weights=None, weights_backbone=None)
                loaded = "random-init"
            else:
                raise WeightsNotFoundError(
                    f"{builder_name}: COCO weights {weights} not found. Expected the file {file_name} at "
                    f"{cached} (TORCH_HOME cache; download it from {weights.url} on a connected machine), "
                    f"or give its path as task_model.checkpoint. For smoke tests only, "
                    f"--allow-random-weights runs with random initialisation (results meaningless)."
                )
        return TaskModel(builder_name, net, tasks, keypoint_ids, weights=loaded)

    return build


register_task_model("fasterrcnn_resnet50_fpn")(
    _torchvision_coco("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights", ("bbox",)))
register_task_model("maskrcnn_resnet50_fpn")(
    _torchvision_coco("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights", ("bbox", "segm")))
register_task_model("keypointrcnn_resnet50_fpn")(
    _torchvision_coco("keypointrcnn_resnet50_fpn", "KeypointRCNN_ResNet50_FPN_Weights", ("bbox", "keypoints"), (1,)))


@register_task_model("demo-multitask")
def _demo(checkpoint: str | None = None, allow_random_weights: bool = False) -> TaskModel:
    from tasks.datasets.synthetic import CATEGORIES, KEYPOINT_CATEGORY
    from tasks.models.demo import DemoModelSpec, build_demo_model, load_checkpoint

    kp_ids = tuple(i + 1 for i, c in enumerate(CATEGORIES) if c[0] == KEYPOINT_CATEGORY)
    if checkpoint and Path(checkpoint).exists():
        net, _spec, _extra = load_checkpoint(checkpoint)
        loaded = str(checkpoint)
    elif allow_random_weights:
        with _seeded(RANDOM_INIT_SEED):
            net = build_demo_model(DemoModelSpec())
        loaded = "random-init"
    else:
        raise WeightsNotFoundError(
            f"demo-multitask: checkpoint {checkpoint!r} not found; it is committed at "
            f"assets/demo-task-model/demo_task_model.pt, or run `mfiba train-task-model` to rebuild it")
    return TaskModel("demo-multitask", net, ("bbox", "segm", "keypoints"), kp_ids, weights=loaded)
