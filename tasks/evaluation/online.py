"""The online path of one test image, as the evaluation stage's work items (Dask workers):

1. `online_weights`: MFIP weights from the image's own precoding (no entropy coder, passes
   batched; tasks/precoding.py), per task; and, labelled oracle, the weights from the
   ground-truth mAP drop.
2. `encode_items`: for each (method, rate point) the flow planned, code every scale at its phi
   to a real bitstream file (storage/bitstream.py).
3. `decode_items`: a separate step that reads only the bitstream file, decodes the features,
   runs the task heads and stores the detections (COCO results) with the real bits.

Every result is one part of a result table keyed by (image, method, rate point, pool mode),
so an interrupted run resumes where it stopped and a finished item is never recomputed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EvalSettings:
    store_url: str
    model_name: str
    checkpoint: str | None
    allow_random_weights: bool
    codec_specs: str  # JSON {codec label: CodecSpec dict}
    annotations: tuple[str, str, str | None]  # the test split: (image dir, instances, keypoints)
    tasks: tuple[str, ...]  # whose losses give importance weights
    score_tasks: tuple[str, ...]  # the head branches run on decoded features
    phis: tuple[float, ...]  # the main codec's precoding qualities
    streams_url: str
    weights_url: str
    weights_identity: str
    detections_url: str
    detections_identity: str
    oracle: bool = True  # also the ground-truth weights (only the oracle method uses them)
    importance_mode: str = "sum"
    importance_floor: float = 0.01
    device: str = "cpu"
    threads: int = 1


@dataclass
class ItemResult:
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_item: dict[str, float] = field(default_factory=dict)  # encode time per stream


def _parts(settings: EvalSettings):
    from storage.feature_store import FeatureStore
    from tasks.features import worker_model
    from tasks.precoding import _cached_dataset

    model, device = worker_model(settings)
    return model, _cached_dataset(*settings.annotations), FeatureStore(settings.store_url, mode="r"), device


def _codec(settings: EvalSettings, label: str):
    from tasks.precoding import _cached_codec

    specs = json.loads(settings.codec_specs)
    if label not in specs:
        raise ValueError(f"no codec labelled {label!r} in the configuration (have {sorted(specs)})")
    return _cached_codec(json.dumps(specs[label], sort_keys=True), settings.device)


def weights_key(image_id: int, pool_modes: tuple[str, ...]) -> str:
    return f"image={int(image_id)}-pool={'_'.join(pool_modes)}"


def _plan_digest(entry: dict) -> str:
    """What the coded stream depends on besides the image: codec label and phi per scale. A
    new fit or tuning that changes an allocation changes the key, so nothing stale is reused."""
    import hashlib

    doc = json.dumps({"codec": entry["codec"], "phis": {s: round(float(p), 9) for s, p in entry["phis"].items()}},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:10]


def item_key(image_id: int, entry: dict) -> str:
    method = entry["method"].replace("[", "_").replace("]", "")
    return (f"image={int(image_id)}-method={method}-point={int(entry['point'])}-pool={entry['pool_mode']}"
            f"-plan={_plan_digest(entry)}")


def stream_path(settings: EvalSettings, image_id: int, entry: dict) -> str:
    return f"{settings.streams_url}/{item_key(image_id, entry)}.mfbs"


def online_weights(settings: EvalSettings, image_id: int, pool_modes: tuple[str, ...]) -> ItemResult:
    """MFIP (and oracle) weights of one test image for every 'pool' mode, from one precoding
    (passes shared between the modes); one table part per image."""
    import pandas as pd

    from storage.results import PartTable
    from tasks.importance import mfip_table
    from tasks.models.registry import SCALES, PassReuse
    from tasks.precoding import (coded_scales, decode_all_qualities, lossless_pass, one_image_gt,
                                 precode_qualities_modes)
    from tasks.rd import load_stored_image

    table = PartTable(settings.weights_url, json.loads(settings.weights_identity))
    key = weights_key(image_id, pool_modes)
    if table.has(key):
        return ItemResult(reused=[key])
    t0 = time.perf_counter()
    model, dataset, store, device = _parts(settings)
    codec = _codec(settings, "main")
    image = load_stored_image(store, image_id, device)
    reuse = PassReuse(model, image.feats, image.meta)
    ref, oracle = lossless_pass(model, image_id, image.feats, image.meta, dataset.categories, settings.tasks,
                                one_image_gt(dataset, image_id) if settings.oracle else None, reuse)
    needed = sorted({s for m in pool_modes for s in coded_scales(m)}, key=SCALES.index)
    decoded = decode_all_qualities(codec, image.feats, needed, settings.phis, bits=False)  # weights: losses only
    results = precode_qualities_modes(model, image_id, image.feats, image.meta, settings.phis, decoded, ref,
                                      settings.tasks, pool_modes, oracle, reuse)
    frames = []
    for mode in pool_modes:
        weights = mfip_table(pd.DataFrame(results[mode].rows).assign(split="test"), settings.tasks,
                             settings.importance_mode, settings.importance_floor)
        frames.append(weights.assign(pool_mode=mode, reference_empty=ref.empty))
    frame = pd.concat(frames, ignore_index=True)
    frame["seconds_precode"] = time.perf_counter() - t0  # for all the modes together
    table.write(key, frame)
    return ItemResult(done=[key], seconds=time.perf_counter() - t0)


def encode_items(settings: EvalSettings, image_id: int, entries: list[dict]) -> ItemResult:
    """entries: {method, point, codec, pool_mode, phis: {scale: phi}}; writes one stream file each."""
    from collections import OrderedDict

    import torch

    from storage.bitstream import write_stream
    from storage.results import PartTable
    from storage.urls import is_local, local_path

    out = ItemResult()
    table = PartTable(settings.detections_url, json.loads(settings.detections_identity))
    _model, _dataset, store, _device = _parts(settings)
    feats = None
    payloads: dict[str, dict] = {}  # per codec: (scale, phi) -> payload, shared by this image's streams
    t0 = time.perf_counter()
    for e in entries:
        key = item_key(image_id, e)
        path = stream_path(settings, image_id, e)
        if table.has(key) or (is_local(path) and local_path(path).exists()):
            out.reused.append(key)
            continue
        if feats is None:
            feats = OrderedDict((s, torch.from_numpy(a).float()) for s, a in store.read_image(image_id).items())
        codec = _codec(settings, e["codec"])
        derived = ("pool",) if e["pool_mode"] == "derived" else ()
        phis = {s: e["phis"].get(s, 0.0) for s in feats}
        t1 = time.perf_counter()
        cache = payloads.setdefault(e["codec"], {})
        before = len(cache)
        data = codec.compress(feats, phis, derived=derived, payloads=cache)
        if len(cache) - before == len(feats) - len(derived):  # t_enc counts streams coded in full only
            out.seconds_per_item[key] = time.perf_counter() - t1
        write_stream(path, data)
        out.done.append(key)
    out.seconds = time.perf_counter() - t0
    return out


def decode_items(settings: EvalSettings, image_id: int, entries: list[dict]) -> ItemResult:
    """From the stream files alone: decode, run the heads, store detections and real bits."""
    import pandas as pd

    from storage.bitstream import decode_stream, part_sizes, read_stream
    from tasks.codecs.packing import PackInfo
    from storage.results import PartTable
    from tasks.evaluation.coco_eval import detections_to_coco
    from tasks.models.registry import SplitMeta

    table = PartTable(settings.detections_url, json.loads(settings.detections_identity))
    model, _dataset, store, device = _parts(settings)
    attrs = store.read_attrs(image_id)
    meta = SplitMeta([tuple(attrs["model_input_size"])], [tuple(attrs["input_size"])], tuple(attrs["batch_shape"]))
    h, w = attrs["input_size"]
    out = ItemResult()
    t0 = time.perf_counter()
    for e in entries:
        key = item_key(image_id, e)
        if table.has(key):
            out.reused.append(key)
            continue
        data = read_stream(stream_path(settings, image_id, e))
        codec = _codec(settings, e["codec"])
        t1 = time.perf_counter()
        decoded = codec.decompress(data)
        t2 = time.perf_counter()
        det = model.heads(type(decoded)((s, x[None].to(device)) for s, x in decoded.items()), meta,
                          tasks=settings.score_tasks)[0]
        results = detections_to_coco(image_id, det, model.keypoint_category_ids)
        sizes = part_sizes(data)
        mosaic_pixels = sum(PackInfo.from_dict(p.packing).padded_height * PackInfo.from_dict(p.packing).padded_width
                            for p in decode_stream(data)[1] if not p.derived)
        table.write(key, pd.DataFrame([{
            "image_id": int(image_id), "method": e["method"], "point": int(e["point"]), "codec": e["codec"],
            "pool_mode": e["pool_mode"], "rate_setting": e.get("rate_setting", np.nan),
            "bits": 8 * len(data), "bits_per_scale": json.dumps({s: 8 * n for s, n in sizes.items()}),
            "phis": json.dumps(e["phis"]), "input_pixels": int(h * w), "mosaic_pixels": int(mosaic_pixels),
            "weights_task": e.get("weights_task", ""),
            "seconds_decode": t2 - t1, "seconds_heads": time.perf_counter() - t2,
            "detections": json.dumps(results),
        }]))
        out.done.append(key)
    out.seconds = time.perf_counter() - t0
    return out


def lossless_detections(settings: EvalSettings, image_ids: list[int]) -> list[dict]:
    """The ceiling: detections on the stored, uncoded features."""
    from tasks.evaluation.coco_eval import detections_to_coco
    from tasks.rd import load_stored_image

    model, _dataset, store, device = _parts(settings)
    results = []
    for i in image_ids:
        image = load_stored_image(store, i, device)
        det = model.heads(image.feats, image.meta, tasks=settings.score_tasks)[0]
        results += detections_to_coco(i, det, model.keypoint_category_ids)
    return results
