"""One rate point of one method on a set of images: code every scale at its phi, run the
heads on the decoded features, and score with COCOeval against the annotations.

Used by the calibration-split searches (finetuned MFIBA, SABA, lambda' grids), which need many
rate points quickly: decoded features come from the codec's synthesis of the quantised latent
(equal to what the rANS decoder outputs; tested in tests/test_learned_codecs.py) and bits from
the entropy model's estimate. The evaluation stage codes real bitstreams instead.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tasks.codecs.base import FeatureCodec, derive_pool
from tasks.evaluation.coco_eval import detections_to_coco, evaluate
from tasks.models.registry import SCALES, SplitMeta, TaskModel


@dataclass
class StoredImage:
    image_id: int
    feats: "OrderedDict"  # scale -> (1, C, H, W) float tensor
    meta: SplitMeta
    input_pixels: int

    @property
    def scale_pixels(self) -> dict[str, int]:
        return {s: int(f.shape[-2] * f.shape[-1]) for s, f in self.feats.items()}


def load_stored_image(store, image_id: int, device="cpu") -> StoredImage:
    from tasks.precoding import stored_image

    feats, meta, attrs = stored_image(store, image_id, device)
    h, w = attrs["input_size"]
    return StoredImage(int(image_id), feats, meta, int(h * w))


def decode_estimated(codec: FeatureCodec, image: StoredImage, phis: dict[str, float], pool_mode: str
                     ) -> tuple["OrderedDict", float]:
    """The decoder's features for these phis (no entropy coder) and the estimated bits."""
    out, bits = OrderedDict(), 0.0
    for s in SCALES:
        if pool_mode == "derived" and s == "pool":
            continue
        x_hat, est = codec.reconstruct_scale(s, image.feats[s][0], phis[s])
        out[s] = x_hat[None].to(image.feats[s].dtype)
        bits += float(est)
    if pool_mode == "derived":
        out["pool"] = derive_pool(out["3"])
    return OrderedDict((s, out[s]) for s in SCALES), bits


def run_rate_point(model: TaskModel, codec: FeatureCodec, images: list[StoredImage], phis_per_image: list[dict],
                   gt, tasks=("bbox",), pool_mode: str = "coded") -> dict:
    """bpp over input pixels (ratio of sums) and AP / AP75 per task for one rate point."""
    results, bits, pixels = [], 0.0, 0
    for image, phis in zip(images, phis_per_image):
        decoded, b = decode_estimated(codec, image, phis, pool_mode)
        det = model.heads(decoded, image.meta, tasks=tasks)[0]
        results += detections_to_coco(image.image_id, det, model.keypoint_category_ids)
        bits += b
        pixels += image.input_pixels
    point = {"bits": bits, "input_pixels": pixels, "bpp_input": bits / max(1, pixels)}
    ids = [im.image_id for im in images]
    for task in tasks:
        stats = evaluate(gt, results, task, image_ids=ids)
        point[f"AP_{task}"], point[f"AP75_{task}"] = 100.0 * stats["AP"], 100.0 * stats["AP75"]
    return point


def lossless_point(model: TaskModel, images: list[StoredImage], gt, tasks=("bbox",)) -> dict:
    """The ceiling: accuracy on the stored (uncoded) features."""
    results = []
    for image in images:
        results += detections_to_coco(image.image_id, model.heads(image.feats, image.meta, tasks=tasks)[0],
                                      model.keypoint_category_ids)
    ids = [im.image_id for im in images]
    out = {}
    for task in tasks:
        stats = evaluate(gt, results, task, image_ids=ids)
        out[f"AP_{task}"], out[f"AP75_{task}"] = 100.0 * stats["AP"], 100.0 * stats["AP75"]
    return out


def curve_bd_rate(anchor: list[dict], test: list[dict], metric: str, method: str = "pchip"):
    """BD-rate of a test curve against an anchor curve (lists of rate points)."""
    from tasks.bdrate import bd_rate

    return bd_rate(np.array([p["bpp_input"] for p in anchor]), np.array([p[metric] for p in anchor]),
                   np.array([p["bpp_input"] for p in test]), np.array([p[metric] for p in test]), method=method)


# -- work items for Dask workers (models, codec, images and annotations cached per process) --


@dataclass(frozen=True)
class RDSettings:
    """Everything a worker needs to run rate points, picklable and hashable."""

    store_url: str
    model_name: str
    checkpoint: str | None
    allow_random_weights: bool
    codec_spec: str  # JSON of the CodecSpec
    annotations: tuple[str, str, str | None]  # (image dir, instances, keypoints) of the split
    tasks: tuple[str, ...]
    pool_mode: str
    device: str = "cpu"
    threads: int = 1


def _worker_parts(settings: RDSettings):
    from storage.feature_store import FeatureStore
    from tasks.features import worker_model
    from tasks.precoding import _cached_codec, _cached_dataset

    model, device = worker_model(settings)
    codec = _cached_codec(settings.codec_spec, device)
    dataset = _cached_dataset(*settings.annotations)
    return model, codec, dataset, FeatureStore(settings.store_url, mode="r"), device


_IMAGES: dict[tuple[str, int], StoredImage] = {}


def _image(store, image_id: int, device) -> StoredImage:
    key = (store.url, int(image_id))
    if key not in _IMAGES:  # a calibration subset is small; searches revisit it many times
        _IMAGES[key] = load_stored_image(store, image_id, device)
    return _IMAGES[key]


def rate_point_items(settings: RDSettings, image_ids: list[int], phis_per_image: list[dict]) -> dict:
    model, codec, dataset, store, device = _worker_parts(settings)
    images = [_image(store, i, device) for i in image_ids]
    return run_rate_point(model, codec, images, phis_per_image, dataset.to_coco(image_ids), settings.tasks,
                          settings.pool_mode)


def lossless_items(settings: RDSettings, image_ids: list[int]) -> dict:
    model, _codec, dataset, store, device = _worker_parts(settings)
    images = [_image(store, i, device) for i in image_ids]
    return lossless_point(model, images, dataset.to_coco(image_ids), settings.tasks)


def saba_items(settings: RDSettings, image_id: int, phi: float) -> dict[str, list[float]]:
    from tasks.precoding import lossless_pass
    from tasks.saba import group_sensitivities

    model, codec, dataset, store, device = _worker_parts(settings)
    image = _image(store, image_id, device)
    ref, _ = lossless_pass(model, image_id, image.feats, image.meta, dataset.categories, settings.tasks)
    sens = group_sensitivities(model, codec, image_id, image.feats, image.meta, phi, ref, settings.tasks[0],
                               settings.pool_mode)
    return {s: v.tolist() for s, v in sens.items()}
