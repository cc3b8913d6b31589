"""`mfiba features`: images -> task-model features of every scale -> a zarr v3 store.

Cached and resumable per image: images already complete in the store are skipped, a
half-written image is rewritten, and the store's metadata (model weights hash, data and
model configuration) decides whether the store is still valid for this configuration.
"""
from __future__ import annotations

from collections import deque

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.common import Progress, dask_task_runner, gpu_annotation, holds_output_locks
from mfiba.config import Config
from storage.feature_store import FeatureStore, check_disk_space, estimate_store_bytes, human_bytes
from storage.manifest import StageManifest, code_version, file_sha256, write_manifest
from tasks.datasets.sources import image_refs
from tasks.device import resolve_device
from tasks.features import BatchResult, ExtractSettings, extract_batch, load_tensor
from tasks.models.registry import SCALES, TaskModel, build_task_model


class StaleStoreError(RuntimeError):
    pass


@task(name="extract-features", retries=2, retry_delay_seconds=2,
      task_run_name="extract-{split}-images-{first}-to-{last}")
def extract_features_task(refs, settings: ExtractSettings, split: str, first: int, last: int) -> BatchResult:
    return extract_batch(refs, settings)


def weights_identity(model: TaskModel) -> str:
    """What was actually loaded (not what was asked for): a hash of the weights file, or
    'random-init'."""
    if model.weights == "random-init":
        return "random-init"
    return "sha256:" + file_sha256(model.weights)


def record_skipped(store: FeatureStore, skipped: dict[int, str], written: list[int]) -> None:
    """Keep, with the store, why each unusable image has no features, so the later stages
    leave it out by name and their reports list it (an image written since is dropped)."""
    known = {int(k): v for k, v in (store.meta.get("skipped_images") or {}).items()}
    known.update(skipped)
    for i in written:
        known.pop(int(i), None)
    if known or store.meta.get("skipped_images"):
        store.set_meta(skipped_images={str(k): v for k, v in sorted(known.items())})


def skipped_images(store: FeatureStore, image_ids) -> dict[int, str]:
    """Of `image_ids`, those the features stage skipped, with the reason it recorded."""
    known = store.meta.get("skipped_images") or {}
    return {int(i): known[str(i)] for i in image_ids if str(i) in known}


def _probe_bytes_per_image(model: TaskModel, ref) -> int:
    """Bytes of one image's features in float16, measured on the first image."""
    feats, _ = model.features([load_tensor(ref)])
    return sum(int(feats[s][0].numel()) * 2 for s in SCALES)


def _checkpoint(cfg: Config) -> str | None:
    ckpt = cfg.task_model.checkpoint
    return str(cfg.resolve_path(ckpt)) if ckpt else None


@flow(name="features", flow_run_name="features-{preset}")
def features_flow(config: dict, preset: str = "demo", overwrite: bool = False) -> dict:
    cfg = Config(**config)
    logger = get_run_logger()
    device = resolve_device(cfg.device)

    def rendered(done: int, count: int) -> None:  # called only where a synthetic split is rendered
        if done in (1, count) or done % max(1, count // 4) == 0:
            logger.info(f"features: rendering a synthetic split into {cfg.data.root}: {done}/{count} images")

    refs_by_split = image_refs(cfg, list(cfg.features.splits), progress=rendered)
    store_url = cfg.store_url()
    # Built here once (CPU) to know which weights were really loaded and to size the store.
    model = build_task_model(cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights)
    identity = {"task_model": cfg.task_model.name, "weights": weights_identity(model),
                "model_config_digest": cfg.digest("task_model"), "data_digest": cfg.data_identity()}
    store = FeatureStore(store_url, mode="a")
    existing = {k: store.meta.get(k) for k in identity}
    if any(v is not None for v in existing.values()) and existing != identity:
        changed = [k for k in identity if existing.get(k) != identity[k]]
        if not overwrite:
            raise StaleStoreError(
                f"feature store {store_url} was built with different {changed}: "
                f"rerun with --overwrite to rebuild it, or give another store (features.store)")
        logger.warning(f"store {store_url} is stale ({changed}); rebuilding every image")
        for iid in store.image_ids(complete_only=False):
            store.delete_image(iid)
    store.set_meta(**identity, code_version=code_version())

    done = set(store.image_ids())  # one listing, not one lookup per image
    todo = [r for refs in refs_by_split.values() for r in refs if r.image_id not in done]
    total = sum(len(v) for v in refs_by_split.values())
    logger.info(f"features: {total} images selected ({ {k: len(v) for k, v in refs_by_split.items()} }), "
                f"{total - len(todo)} already in the store, {len(todo)} to extract")
    if todo:
        per_image = _probe_bytes_per_image(model, todo[0])
        needed = estimate_store_bytes(len(todo), 1, {"all": (1, per_image // 2)})
        check_disk_space(store_url, needed)
        logger.info(f"estimated store growth {human_bytes(needed)} ({human_bytes(per_image)} per image, float16)")

    del model  # workers build their own
    settings = ExtractSettings(store_url, cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights,
                               device, cfg.dask.threads_per_worker)
    bs = cfg.features.batch_size
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    progress = Progress(logger, "features", len(todo), artifact_key=None)
    results: list[BatchResult] = []
    in_flight: deque = deque()
    window = cfg.features.max_in_flight * cfg.dask.n_workers
    for batch in batches:
        # Bounded memory: the flow never holds more than `window` batches' results at once.
        while len(in_flight) >= window:
            res = in_flight.popleft().result()
            results.append(res)
            progress.advance(len(res.written) + len(res.skipped))
        with dask.annotate(**gpu_annotation(cfg, device)):
            in_flight.append(extract_features_task.submit(
                batch, settings, batch[0].split, batch[0].image_id, batch[-1].image_id))
    while in_flight:
        res = in_flight.popleft().result()
        results.append(res)
        progress.advance(len(res.written) + len(res.skipped))

    skipped = {iid: why for r in results for iid, why in r.skipped.items()}
    record_skipped(store, skipped, [i for r in results for i in r.written])
    secs_model = sum(r.seconds_model for r in results)
    secs_store = sum(r.seconds_store for r in results)
    summary = {
        "store": store_url, "selected": total, "extracted": sum(len(r.written) for r in results),
        "reused": total - len(todo), "skipped": len(skipped), "skipped_reasons": {str(k): v for k, v in skipped.items()},
        "seconds_model": round(secs_model, 2), "seconds_store": round(secs_store, 2),
        "complete_in_store": len(store.image_ids()),
    }
    if skipped:
        logger.warning(f"{len(skipped)} images skipped: " + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:10]))
        create_table_artifact([{"image_id": k, "reason": v} for k, v in skipped.items()],
                              key="features-skipped", description="images skipped by the features stage")
    write_manifest(cfg.resolve_path(cfg.run_dir), StageManifest(
        stage="features", config_digest=cfg.digest("data", "task_model", "features"),
        input_hashes={"weights": identity["weights"]}, items_done=summary["complete_in_store"], extra=summary))
    logger.info(f"features done: {summary['extracted']} extracted, {summary['reused']} reused from the store, "
                f"{summary['skipped']} skipped; model {secs_model:.1f} s, store writes {secs_store:.1f} s")
    return summary


@holds_output_locks("features")
def run_features(cfg: Config, overwrite: bool = False) -> dict:
    device = resolve_device(cfg.device)
    runner = dask_task_runner(cfg, device)
    return features_flow.with_options(task_runner=runner)(cfg.model_dump(mode="json"), cfg.preset, overwrite)
