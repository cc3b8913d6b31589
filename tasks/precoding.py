"""Multi-pass precoding of one image (MFIP's input): per quality and per scale, replace only
that scale by its decoded version, run the task heads, and measure the task loss against the
lossless output. Backbone once per image; m x (number of coded scales) head passes.

Two implementations with the same results:
- `precode_reference`: the straightforward loop (each pass coded with real entropy coding,
  heads one pass at a time); kept as the reference in tests;
- `precode_batched`: decoded features from the codec's synthesis of the quantised latent (no
  entropy coder; equal to what rANS decodes), the head passes of one quality stacked into
  one batch, and only the head branches the requested losses need (box-only for bbox).
In derived-'pool' mode there are 4 coded scales and the distortion of '3' reaches 'pool'.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tasks.codecs.base import FeatureCodec, derive_pool
from tasks.evaluation.pass_loss import Reference, pass_loss, reference_from_detections
from tasks.models.registry import SCALES, SplitMeta, TaskModel


@dataclass
class PrecodeResult:
    rows: list[dict] = field(default_factory=list)  # one per (quality, scale)
    reference_empty: bool = False
    seconds_codec: float = 0.0
    seconds_heads: float = 0.0
    seconds_loss: float = 0.0


def coded_scales(pool_mode: str) -> tuple[str, ...]:
    return SCALES if pool_mode == "coded" else tuple(s for s in SCALES if s != "pool")


def _replace(feats: "OrderedDict[str, torch.Tensor]", scale: str, decoded: torch.Tensor, pool_mode: str):
    out = OrderedDict(feats)
    out[scale] = decoded[None].to(feats[scale].dtype)
    if pool_mode == "derived" and scale == "3":
        out["pool"] = derive_pool(out["3"])
    return out


def _reference(model: TaskModel, image_id: int, feats, meta: SplitMeta, categories, tasks=None) -> tuple[Reference, dict]:
    lossless = model.heads(feats, meta, tasks=tasks)[0]
    h, w = meta.original_sizes[0]
    return reference_from_detections(image_id, lossless, h, w, categories, model.keypoint_category_ids), lossless


def _row(image_id, scale, q, phi, bits, est_bits, ref, det, model, iou_types) -> dict:
    row = {"image_id": int(image_id), "scale": scale, "quality": q, "phi": float(phi),
           "bits": bits, "estimated_bits": est_bits}
    for iou in iou_types:
        row[f"loss_{iou}"] = pass_loss(ref, image_id, det, iou, model.keypoint_category_ids)
    return row


def precode_reference(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta, phis,
                      categories, iou_types=("bbox",), pool_mode: str = "coded") -> PrecodeResult:
    """The straightforward loop: real entropy coding per pass, heads one pass at a time."""
    res = PrecodeResult()
    ref, _ = _reference(model, image_id, feats, meta, categories)
    res.reference_empty = ref.empty
    for q, phi in enumerate(phis):
        for scale in coded_scales(pool_mode):
            t0 = time.perf_counter()
            payload = codec.compress_scale(scale, feats[scale][0], phi)
            decoded = codec.decompress_scale(payload)
            t1 = time.perf_counter()
            det = model.heads(_replace(feats, scale, decoded, pool_mode), meta)[0]
            t2 = time.perf_counter()
            res.rows.append(_row(image_id, scale, q, phi, payload.bits, None, ref, det, model, iou_types))
            res.seconds_codec += t1 - t0
            res.seconds_heads += t2 - t1
            res.seconds_loss += time.perf_counter() - t2
    return res


def precode_batched(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta, phis,
                    categories, iou_types=("bbox",), pool_mode: str = "coded") -> PrecodeResult:
    """No entropy coder; the passes of one quality run as one batch through the heads."""
    res = PrecodeResult()
    ref, _ = _reference(model, image_id, feats, meta, categories, tasks=iou_types)
    res.reference_empty = ref.empty
    scales = coded_scales(pool_mode)
    for q, phi in enumerate(phis):
        t0 = time.perf_counter()
        decoded = {s: codec.reconstruct_scale(s, feats[s][0], phi) for s in scales}
        t1 = time.perf_counter()
        variants = [_replace(feats, s, decoded[s][0], pool_mode) for s in scales]
        stacked = OrderedDict((k, torch.cat([v[k] for v in variants])) for k in SCALES)
        batch_meta = SplitMeta(meta.image_sizes * len(scales), meta.original_sizes * len(scales), meta.batch_shape)
        dets = model.heads(stacked, batch_meta, tasks=iou_types)  # only the branches the losses need
        t2 = time.perf_counter()
        for s, det in zip(scales, dets):
            res.rows.append(_row(image_id, s, q, phi, None, decoded[s][1], ref, det, model, iou_types))
        res.seconds_codec += t1 - t0
        res.seconds_heads += t2 - t1
        res.seconds_loss += time.perf_counter() - t2
    return res
