"""SABA baseline (Hu, Xia, Yang, Liu; VCIP 2020): sensitivity-aware bit allocation.

SABA measures, per channel group, the task-accuracy drop when only that group is compressed,
and gives more bits to more sensitive groups. Here:

- a group is one 3-channel tile of a scale's mosaic (the packing unit);
- "only that group compressed": the scale is coded at one phi and only that group's channels
  are replaced by their decoded values, every other channel of every scale lossless (the
  group's distortion is taken from the jointly coded mosaic: coding a 3-channel tile alone
  would change the entropy model's context, not the tile's quantisation);
- the drop is the encoder-side loss (1 - AP against the lossless output), averaged over the
  calibration images;
- since one phi codes a whole mosaic, a scale's SABA weight is the sum of its groups'
  sensitivities (normalised over scales), and those static per-scale weights go through the
  same closed-form allocation as MFIBA. This is the documented group -> scale mapping.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from tasks.codecs.base import FeatureCodec, derive_pool
from tasks.evaluation.pass_loss import Reference, pass_losses
from tasks.models.registry import SCALES, SplitMeta, TaskModel
from tasks.precoding import coded_scales


def group_sensitivities(model: TaskModel, codec: FeatureCodec, image_id: int, feats, meta: SplitMeta,
                        phi: float, ref: Reference, task: str = "bbox", pool_mode: str = "coded",
                        chunk: int = 24) -> dict[str, np.ndarray]:
    """Per coded scale, the loss when only each 3-channel group is replaced by its decoded value."""
    out: dict[str, np.ndarray] = {}
    for scale in coded_scales(pool_mode):
        decoded = codec.reconstruct_scale(scale, feats[scale][0], phi)[0].to(feats[scale].dtype)
        channels = feats[scale].shape[1]
        groups = (channels + 2) // 3
        variants = []
        for g in range(groups):
            x = feats[scale].clone()
            x[0, 3 * g:3 * g + 3] = decoded[3 * g:3 * g + 3]
            v = OrderedDict(feats)
            v[scale] = x
            if pool_mode == "derived" and scale == "3":
                v["pool"] = derive_pool(x)
            variants.append(v)
        losses = []
        for k in range(0, groups, chunk):
            part = variants[k:k + chunk]
            stacked = OrderedDict((s, torch.cat([v[s] for v in part])) for s in SCALES)
            batch_meta = SplitMeta(meta.image_sizes * len(part), meta.original_sizes * len(part), meta.batch_shape)
            for det in model.heads(stacked, batch_meta, tasks=(task,)):
                losses.append(pass_losses(ref, image_id, det, task, model.keypoint_category_ids)[0])
        out[scale] = np.array(losses)
    return out


def saba_scale_weights(per_image: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean group sensitivity over images, and per-scale weights (sum over groups, normalised).
    Every group insensitive everywhere: uniform weights."""
    scales = list(per_image[0])
    mean = {s: np.mean([img[s] for img in per_image], axis=0) for s in scales}
    totals = np.array([float(np.clip(mean[s], 0, None).sum()) for s in scales])
    weights = totals / totals.sum() if totals.sum() > 0 else np.full(len(scales), 1.0 / len(scales))
    return {s: float(w) for s, w in zip(scales, weights)}, mean
