"""Multi-pass precoding of one image (MFIP's input): per quality and per scale, replace only
that scale by its decoded version, run the task heads, and measure the task loss against the
lossless output. Backbone once per image; m x (number of coded scales) head passes.

Two implementations with the same results:
- `precode_reference`: the straightforward loop (each pass coded with real entropy coding,
  heads one pass at a time, losses through COCOeval); kept as the reference in tests;
- `precode_batched`: decoded features from the codec's synthesis of the quantised latent (no
  entropy coder; equal to what rANS decodes; a variable-rate codec's analysis once for all
  qualities), the head passes of all qualities stacked into batches through only the head
  branches the losses need (box-only for bbox), what a pass did not change (RPN levels, box
  features of unchanged proposals) taken from the lossless pass (PassReuse), and box losses
  by the exact one-image AP (fast_ap) instead of COCOeval. No rate estimate: MFIP's weights
  need the losses only (the online MFIP of the evaluate stage runs the same steps).
In derived-'pool' mode there are 4 coded scales and the distortion of '3' reaches 'pool'.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from tasks.codecs.base import FeatureCodec, derive_pool
from tasks.evaluation.pass_loss import Reference, ground_truth_ap, pass_losses, reference_from_detections
from tasks.models.registry import SCALES, PassReuse, SplitMeta, TaskModel


@dataclass
class PrecodeResult:
    rows: list[dict] = field(default_factory=list)  # one per (quality, scale)
    reference_empty: bool = False
    seconds_codec: float = 0.0
    seconds_heads: float = 0.0
    seconds_loss: float = 0.0


@dataclass(frozen=True)
class Oracle:
    """An image's real annotations and the lossless features' AP on them: the ground-truth
    variant of the loss (per-image mAP drop, as the authors' code labels importance)."""

    gt: dict  # a one-image COCO dataset
    lossless_ap: dict  # iou type -> (AP, AP75)


def coded_scales(pool_mode: str) -> tuple[str, ...]:
    return SCALES if pool_mode == "coded" else tuple(s for s in SCALES if s != "pool")


def _replace(feats: "OrderedDict[str, torch.Tensor]", scale: str, decoded: torch.Tensor, pool_mode: str):
    out = OrderedDict(feats)
    out[scale] = decoded[None].to(feats[scale].dtype)
    if pool_mode == "derived" and scale == "3":
        out["pool"] = derive_pool(out["3"])
    return out


def _changed(scale: str, pool_mode: str) -> set[str]:
    """The scales a pass that replaces `scale` changes ('pool' follows '3' when derived)."""
    return {scale, "pool"} if pool_mode == "derived" and scale == "3" else {scale}


def lossless_pass(model: TaskModel, image_id: int, feats, meta: SplitMeta, categories, tasks=None,
                  gt: dict | None = None, reuse: PassReuse | None = None) -> tuple[Reference, Oracle | None]:
    """The lossless heads once: the pseudo ground truth every pass is compared with, and,
    when the image's annotations are given, the oracle's lossless AP. With the image's
    `reuse`, the RPN head and box path are not run again (it computed them)."""
    lossless = model.heads(feats, meta, tasks=tasks, reuse=reuse.for_passes([set()]) if reuse else None)[0]
    h, w = meta.original_sizes[0]
    ref = reference_from_detections(image_id, lossless, h, w, categories, model.keypoint_category_ids)
    if gt is None:
        return ref, None
    aps = {iou: ground_truth_ap(gt, image_id, lossless, iou, model.keypoint_category_ids) for iou in tasks or model.tasks}
    return ref, Oracle(gt, aps)


def _row(image_id, scale, q, phi, ref, det, model, iou_types, oracle: Oracle | None, cocoeval: bool = False) -> dict:
    row = {"image_id": int(image_id), "scale": scale, "quality": q, "phi": float(phi)}
    for iou in iou_types:
        row[f"loss_{iou}"], row[f"loss75_{iou}"] = pass_losses(ref, image_id, det, iou, model.keypoint_category_ids,
                                                               cocoeval)
        if oracle is not None:
            ap, ap75 = ground_truth_ap(oracle.gt, image_id, det, iou, model.keypoint_category_ids)
            base, base75 = oracle.lossless_ap[iou]
            row[f"oracle_{iou}"], row[f"oracle75_{iou}"] = base - ap, base75 - ap75
    return row


def precode_reference(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta, phis,
                      categories, iou_types=("bbox",), pool_mode: str = "coded") -> PrecodeResult:
    """The straightforward loop: real entropy coding per pass, heads one pass at a time,
    losses through pycocotools' COCOeval."""
    res = PrecodeResult()
    ref, _ = lossless_pass(model, image_id, feats, meta, categories)
    res.reference_empty = ref.empty
    for q, phi in enumerate(phis):
        for scale in coded_scales(pool_mode):
            t0 = time.perf_counter()
            payload = codec.compress_scale(scale, feats[scale][0], phi)
            decoded = codec.decompress_scale(payload)
            t1 = time.perf_counter()
            det = model.heads(_replace(feats, scale, decoded, pool_mode), meta)[0]
            t2 = time.perf_counter()
            res.rows.append({**_row(image_id, scale, q, phi, ref, det, model, iou_types, None, cocoeval=True),
                             "bits": payload.bits, "estimated_bits": None})
            res.seconds_codec += t1 - t0
            res.seconds_heads += t2 - t1
            res.seconds_loss += time.perf_counter() - t2
    return res


def precode_quality(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta, q: int,
                    phi: float, ref: Reference, iou_types=("bbox",), pool_mode: str = "coded",
                    real_bits: bool = False, oracle: Oracle | None = None,
                    reuse: PassReuse | None = None) -> PrecodeResult:
    """All scales of one image at one quality: decoded features from the codec's synthesis
    of the quantised latent (no entropy coder), the passes stacked into one batch through
    only the head branches the losses need. `real_bits` also entropy-codes each scale for
    its real size (offline precoding for the fits; online MFIP needs only the losses)."""
    res = PrecodeResult(reference_empty=ref.empty)
    scales = coded_scales(pool_mode)
    t0 = time.perf_counter()
    payloads = {s: codec.compress_scale(s, feats[s][0], phi) for s in scales} if real_bits else {}
    if payloads and not hasattr(codec, "forward_mosaic"):
        # A classical codec has no latent to synthesise: decode the real stream once.
        decoded = {s: (codec.decompress_scale(p), float(8 * sum(len(x) for x in p.strings)))
                   for s, p in payloads.items()}
    else:
        decoded = {s: codec.reconstruct_scale(s, feats[s][0], phi) for s in scales}
    t1 = time.perf_counter()
    dets = pass_detections(model, feats, meta, [(s, decoded[s][0], pool_mode) for s in scales], iou_types, reuse)
    t2 = time.perf_counter()
    for s, det in zip(scales, dets):
        row = _row(image_id, s, q, phi, ref, det, model, iou_types, oracle)
        row["bits"] = payloads[s].bits if real_bits else None
        row["estimated_bits"] = decoded[s][1]
        if real_bits:
            info = payloads[s].packing
            row["mosaic_pixels"] = int(info["padded_height"] * info["padded_width"])
        res.rows.append(row)
    res.seconds_codec, res.seconds_heads, res.seconds_loss = t1 - t0, t2 - t1, time.perf_counter() - t2
    return res


def decode_all_qualities(codec: FeatureCodec, feats, scales, phis, bits: bool = True) -> list[dict]:
    """Per quality, {scale: (decoded features, estimated bits)} without entropy coding; a
    variable-rate codec shares its phi-independent work between the qualities. `bits=False`
    (MFIP: only the task losses count): None for the bits where the codec can skip its
    rate estimate."""
    per_scale = {s: codec.reconstruct_scale_multi(s, feats[s][0], phis, bits=bits) for s in scales}
    return [{s: per_scale[s][q] for s in scales} for q in range(len(phis))]


# Passes stacked into one heads batch hold a full feature pyramid each (the unchanged levels
# too: mask and keypoint branches pool from all levels), so batches are cut at this size: all
# m x scales passes of a demo image (1.4 MB each) go at once, a COCO image's ResNet50-FPN
# pyramid (80 MB or more) about six at a time.
MAX_PASS_BATCH_BYTES = 512 * 2**20


def pass_detections(model: TaskModel, feats, meta: SplitMeta, passes, iou_types, reuse: PassReuse | None = None,
                    max_batch_bytes: int = MAX_PASS_BATCH_BYTES) -> list[dict]:
    """Detections of each pass (scale, its decoded features, 'pool' mode): the image's
    features with that scale replaced. Passes go through the heads stacked, in batches of at
    most `max_batch_bytes` of features, with only the branches `iou_types` need, and what a
    pass did not change taken from the lossless pass (`reuse`)."""
    reuse = reuse or PassReuse(model, feats, meta)
    pass_bytes = sum(feats[k].numel() * feats[k].element_size() for k in SCALES)
    size = max(1, max_batch_bytes // max(1, pass_bytes))
    dets = []
    for start in range(0, len(passes), size):
        chunk = passes[start:start + size]
        variants = [_replace(feats, s, decoded, mode) for s, decoded, mode in chunk]
        stacked = OrderedDict((k, torch.cat([v[k] for v in variants])) for k in SCALES)
        batch_meta = SplitMeta(meta.image_sizes * len(chunk), meta.original_sizes * len(chunk), meta.batch_shape)
        dets += model.heads(stacked, batch_meta, tasks=iou_types,
                            reuse=reuse.for_passes([_changed(s, mode) for s, _, mode in chunk]))
    return dets


def precode_qualities_modes(model: TaskModel, image_id: int, feats, meta: SplitMeta, phis, decoded, ref: Reference,
                            iou_types=("bbox",), pool_modes=("coded", "derived"), oracle: Oracle | None = None,
                            reuse: PassReuse | None = None) -> dict[str, PrecodeResult]:
    """The passes of every quality (`decoded[q]`: {scale: (decoded features, estimated
    bits)}, from `decode_all_qualities`) for several 'pool' modes at once, stacked through
    the heads together (`pass_detections`): a pass shared by the modes (scales '0', '1',
    '2') runs once; derived mode adds only its own '3' pass (with 'pool' rebuilt from the
    decoded '3'). Rows in (quality, scale) order, as `precode_quality`'s one quality after
    another."""
    t0 = time.perf_counter()
    keys, passes = [], []
    for q in range(len(phis)):
        for mode in pool_modes:
            for s in coded_scales(mode):
                # The two modes differ only when '3' is replaced ('pool' follows it in derived mode).
                key = (q, mode if s == "3" else "any", s)
                if key not in keys:
                    keys.append(key)
                    passes.append((s, decoded[q][s][0], mode))
    dets = dict(zip(keys, pass_detections(model, feats, meta, passes, iou_types, reuse)))
    t1 = time.perf_counter()
    out = {}
    for mode in pool_modes:
        res = PrecodeResult(reference_empty=ref.empty)
        for q, phi in enumerate(phis):
            for s in coded_scales(mode):
                row = _row(image_id, s, q, phi, ref, dets[(q, mode if s == "3" else "any", s)], model, iou_types,
                           oracle)
                row["bits"], row["estimated_bits"] = None, decoded[q][s][1]
                res.rows.append(row)
        out[mode] = res
    share = 1.0 / len(pool_modes)
    for res in out.values():  # time split evenly between the modes it served
        res.seconds_heads, res.seconds_loss = share * (t1 - t0), share * (time.perf_counter() - t1)
    return out


def precode_batched(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta, phis,
                    categories, iou_types=("bbox",), pool_mode: str = "coded") -> PrecodeResult:
    """No entropy coder and no rate estimate; the passes of all qualities stacked through
    the heads (`precode_qualities_modes`)."""
    reuse = PassReuse(model, feats, meta)
    ref, _ = lossless_pass(model, image_id, feats, meta, categories, tasks=iou_types, reuse=reuse)
    t0 = time.perf_counter()
    decoded = decode_all_qualities(codec, feats, coded_scales(pool_mode), phis, bits=False)
    t_codec = time.perf_counter() - t0
    res = precode_qualities_modes(model, image_id, feats, meta, phis, decoded, ref, iou_types, (pool_mode,),
                                  reuse=reuse)[pool_mode]
    res.seconds_codec = t_codec
    return res


# -- the precode stage's work item: some images at one quality, read from the feature store --


@dataclass(frozen=True)
class PrecodeSettings:
    """Everything a worker needs, picklable and hashable (it keys the model and codec caches)."""

    store_url: str
    table_url: str
    table_identity: str  # JSON of the table's identity (hashable)
    model_name: str
    checkpoint: str | None
    allow_random_weights: bool
    codec_spec: str  # JSON of the CodecSpec
    phis: tuple[float, ...]
    pool_mode: str
    tasks: tuple[str, ...]
    annotations: tuple[tuple[str, str, str, str | None], ...]  # (split, image dir, instances, keypoints)
    oracle: bool = True
    device: str = "cpu"
    threads: int = 1


@dataclass
class ItemsResult:
    written: list[str] = field(default_factory=list)  # part keys
    reused: list[str] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    seconds_codec: float = 0.0
    seconds_heads: float = 0.0
    seconds_loss: float = 0.0
    worker: str = ""


def part_key(image_id: int, quality: int) -> str:
    return f"image={int(image_id)}-q={int(quality)}"


@lru_cache(maxsize=2)
def _cached_codec(spec_json: str, device: str):
    from mfiba.config import REPO_ROOT, CodecSpec
    from tasks.codecs.base import build_codec_from_spec

    resolve = lambda p: p if os.path.isabs(p) or "://" in p else str(REPO_ROOT / p)  # noqa: E731
    return build_codec_from_spec(CodecSpec(**json.loads(spec_json)), "main", resolve)


@lru_cache(maxsize=4)
def _cached_dataset(image_dir: str, instances: str, keypoints: str | None):
    from tasks.datasets.coco import CocoDataset

    return CocoDataset(image_dir, instances, keypoints)


def one_image_gt(dataset, image_id: int) -> dict:
    return {"images": [dataset.image_info(image_id)], "annotations": dataset.annotations(image_id),
            "categories": dataset.categories}


def stored_image(store, image_id: int, device="cpu") -> tuple["OrderedDict[str, torch.Tensor]", SplitMeta, dict]:
    """One image's stored features as a batch of one, and what the heads need besides."""
    attrs = store.read_attrs(image_id)
    arrays = store.read_image(image_id)
    feats = OrderedDict((s, torch.from_numpy(arrays[s]).float()[None].to(device)) for s in SCALES)
    meta = SplitMeta([tuple(attrs["model_input_size"])], [tuple(attrs["input_size"])], tuple(attrs["batch_shape"]))
    return feats, meta, attrs


def precode_items(settings: PrecodeSettings, image_ids: list[int], quality: int) -> ItemsResult:
    """Precode `image_ids` at one quality; every (image, quality) lands as one table part."""
    import pandas as pd

    from storage.feature_store import FeatureStore
    from storage.results import PartTable
    from tasks.features import worker_model

    model, device = worker_model(settings)
    codec = _cached_codec(settings.codec_spec, device)
    store = FeatureStore(settings.store_url, mode="r")
    table = PartTable(settings.table_url, json.loads(settings.table_identity))
    datasets = {split: (d, i, k) for split, d, i, k in settings.annotations}
    from tasks.device import worker_name

    out = ItemsResult(worker=worker_name())
    phi = settings.phis[quality]
    for image_id in image_ids:
        key = part_key(image_id, quality)
        if table.has(key):  # a retried task: keep what a previous attempt finished
            out.reused.append(key)
            continue
        feats, meta, attrs = stored_image(store, image_id, device)
        dataset = _cached_dataset(*datasets[attrs["split"]])
        gt = one_image_gt(dataset, image_id) if settings.oracle else None
        reuse = PassReuse(model, feats, meta)
        ref, oracle = lossless_pass(model, image_id, feats, meta, dataset.categories, settings.tasks, gt, reuse)
        res = precode_quality(model, codec, image_id, feats, meta, quality, phi, ref, settings.tasks,
                              settings.pool_mode, real_bits=True, oracle=oracle, reuse=reuse)
        h, w = attrs["input_size"]
        frame = pd.DataFrame(res.rows)
        frame.insert(1, "split", attrs["split"])
        frame["scale_pixels"] = [int(feats[s].shape[-2] * feats[s].shape[-1]) for s in frame["scale"]]
        frame["input_pixels"] = int(h * w)
        frame["reference_empty"] = ref.empty
        frame["pool_mode"] = settings.pool_mode
        frame["seconds_codec"], frame["seconds_heads"] = res.seconds_codec, res.seconds_heads
        if oracle is not None:
            for iou, (ap, ap75) in oracle.lossless_ap.items():
                frame[f"lossless_ap_{iou}"], frame[f"lossless_ap75_{iou}"] = ap, ap75
        table.write(key, frame)
        out.written.append(key)
        out.seconds_codec += res.seconds_codec
        out.seconds_heads += res.seconds_heads
        out.seconds_loss += res.seconds_loss
    return out
