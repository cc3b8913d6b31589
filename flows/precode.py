"""`mfiba precode`: multi-pass precoding of stored features, spread over Dask by image x quality.

For every selected image and each of the main codec's m rate points, every coded scale is
replaced in turn by its decoded version and the task heads run (features come from the
store: no backbone here). Each (image, quality) lands as one part of a tidy table:
image, scale, quality, phi, real and estimated bits, losses per task against the lossless
output, and the oracle (mAP drop against the annotations). Cached and resumable per
(image, quality); a table computed with another codec checkpoint, task model or settings is
refused, never mixed.
"""
from __future__ import annotations

import json
from collections import deque

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import Progress, dask_task_runner, gpu_annotation, holds_output_locks, worker_device
from flows.features import _checkpoint, skipped_images, weights_identity
from mfiba.config import Config
from storage.feature_store import FeatureStore
from storage.manifest import StageManifest, write_manifest
from storage.results import PartTable, identity_digest, write_frame
from tasks.codecs.base import build_codec_from_spec
from tasks.datasets.sources import image_refs, open_split
from tasks.device import resolve_device
from tasks.importance import mfip_table
from tasks.models.registry import build_task_model
from tasks.precoding import ItemsResult, PrecodeSettings, coded_scales, part_key, precode_items


@task(name="precode", retries=2, retry_delay_seconds=2,
      task_run_name="precode-q{quality}-images-{first}-to-{last}")
def precode_task(settings: PrecodeSettings, image_ids: list[int], quality: int, first: int, last: int) -> ItemsResult:
    return precode_items(settings, image_ids, quality)


def precode_identity(cfg: Config, model_weights: str | None = None, codec_sha: str | None = None,
                     tasks: tuple[str, ...] | None = None) -> dict:
    """What every row depends on (missing pieces are computed from the configuration)."""
    if model_weights is None or tasks is None:
        model = build_task_model(cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights)
        model_weights = model_weights or weights_identity(model)
        tasks = tasks or tuple(cfg.precode.tasks) or tuple(model.tasks)
    if codec_sha is None:
        codec_sha = build_codec_from_spec(cfg.codecs.main, "main", cfg.resolve_path).checkpoint_sha256.hex()
    return {"task_model": cfg.task_model.name, "weights": model_weights, "data_digest": cfg.data_identity(),
            "codec": cfg.codecs.main.model_dump(mode="json"), "codec_checkpoint_sha256": codec_sha,
            "pool_mode": cfg.codecs.pool_mode, "tasks": list(tasks), "oracle": cfg.precode.oracle}


def precode_table_url(cfg: Config, identity: dict | None = None) -> str:
    """One table per identity: another codec, task model or task list writes its own table
    (nothing is mixed, nothing already computed is thrown away)."""
    identity = identity or precode_identity(cfg)
    return f"{cfg.resolve_path(cfg.run_dir)}/precode/pool-{cfg.codecs.pool_mode}-{identity_digest(identity)}"


@flow(name="precode", flow_run_name="precode-{preset}")
def precode_flow(config: dict, preset: str = "demo", overwrite: bool = False) -> dict:
    cfg = Config(**config)
    logger = get_run_logger()
    device = resolve_device(cfg.device)
    try:
        store = FeatureStore(cfg.store_url(), mode="r")
    except Exception as e:
        raise RuntimeError(f"cannot open the feature store {cfg.store_url()} ({e}): run `mfiba features` first") from e
    model = build_task_model(cfg.task_model.name, _checkpoint(cfg), cfg.task_model.allow_random_weights)
    weights = weights_identity(model)
    if store.meta.get("weights") != weights:
        raise RuntimeError(f"feature store {store.url} was built with weights {store.meta.get('weights')}, "
                           f"the configured task model has {weights}: rerun `mfiba features`")
    tasks = tuple(cfg.precode.tasks) or tuple(model.tasks)
    unknown = sorted(set(tasks) - set(model.tasks))
    if unknown:
        raise RuntimeError(f"precode.tasks {unknown} are not tasks of {cfg.task_model.name} ({list(model.tasks)})")
    del model
    codec = build_codec_from_spec(cfg.codecs.main, "main", cfg.resolve_path)
    phis = tuple(cfg.codecs.main.phis)
    for phi in phis:
        codec.check_phi("all", phi)  # before any work: a preset's rate points must fit the codec
    identity = precode_identity(cfg, weights, codec.checkpoint_sha256.hex(), tasks)
    table_url = precode_table_url(cfg, identity)
    table = PartTable(table_url, identity, overwrite=overwrite)

    refs = image_refs(cfg, list(cfg.precode.splits))
    in_store = set(store.image_ids())
    selected = [r.image_id for split in cfg.precode.splits for r in refs.get(split, [])]
    skipped = skipped_images(store, selected)
    if skipped:
        logger.warning(f"precode: {len(skipped)} selected images were skipped by the features stage and are left "
                       "out: " + "; ".join(f"{i}: {why}" for i, why in list(skipped.items())[:10]))
        selected = [i for i in selected if i not in skipped]
    missing = [i for i in selected if i not in in_store]
    if missing:
        raise RuntimeError(f"{len(missing)} selected images have no features in {store.url} (e.g. {missing[:5]}): "
                           f"run `mfiba features --splits {' '.join(cfg.precode.splits)}` first")
    annotations = []
    for split in cfg.precode.splits:
        ds = open_split(cfg, split)
        annotations.append((split, str(ds.image_dir), str(ds.instances_json),
                            str(ds.keypoints_json) if ds.keypoints_json else None))
    settings = PrecodeSettings(
        store_url=cfg.store_url(), table_url=table_url, table_identity=json.dumps(table.identity, sort_keys=True),
        model_name=cfg.task_model.name, checkpoint=_checkpoint(cfg),
        allow_random_weights=cfg.task_model.allow_random_weights,
        codec_spec=json.dumps(cfg.codecs.main.model_dump(mode="json"), sort_keys=True), phis=phis,
        pool_mode=cfg.codecs.pool_mode, tasks=tasks, annotations=tuple(annotations), oracle=cfg.precode.oracle,
        device=worker_device(cfg, device), threads=cfg.dask.threads_per_worker)

    done = table.keys()
    work = []  # (quality, image ids still to do at that quality)
    for q in range(len(phis)):
        todo = [i for i in selected if part_key(i, q) not in done]
        bs = cfg.precode.batch_size
        work += [(q, todo[k:k + bs]) for k in range(0, len(todo), bs)]
    n_items = len(selected) * len(phis)
    n_todo = sum(len(ids) for _, ids in work)
    logger.info(f"precode: {len(selected)} images x {len(phis)} qualities = {n_items} items "
                f"({len(coded_scales(cfg.codecs.pool_mode))} coded scales each, tasks {list(tasks)}); "
                f"{n_items - n_todo} already in {table_url}, {n_todo} to compute")
    progress = Progress(logger, "precode (image x quality)", n_todo)
    results: list[ItemsResult] = []
    in_flight: deque = deque()
    window = cfg.precode.max_in_flight * cfg.dask.n_workers
    for q, ids in work:
        while len(in_flight) >= window:  # bounded: the flow never holds more than `window` results
            results.append(in_flight.popleft().result())
            progress.advance(len(results[-1].written) + len(results[-1].reused))
        with dask.annotate(**gpu_annotation(cfg, device)):
            in_flight.append(precode_task.submit(settings, ids, q, ids[0], ids[-1]))
    while in_flight:
        results.append(in_flight.popleft().result())
        progress.advance(len(results[-1].written) + len(results[-1].reused))

    frame = table.consolidate(sort_by=["image_id", "quality", "scale"])
    weights_frame = mfip_table(frame, tasks, mode=cfg.fit.importance_mode, floor=cfg.fit.importance_floor)
    out = table_url
    write_frame(f"{out}/weights.parquet", weights_frame)
    computed = sum(len(r.written) for r in results)
    secs = {k: round(sum(getattr(r, k) for r in results), 2) for k in ("seconds_codec", "seconds_heads", "seconds_loss")}
    empty = int(frame.drop_duplicates("image_id")["reference_empty"].sum()) if not frame.empty else 0
    summary = {"table": f"{out}/table.parquet", "weights": f"{out}/weights.parquet", "images": len(selected),
               "qualities": len(phis), "items": n_items, "computed": computed, "reused": n_items - n_todo,
               "rows": int(len(frame)), "images_with_empty_reference": empty, "tasks": list(tasks), **secs,
               "workers": sorted({r.worker for r in results if r.written}),
               "skipped_images": {str(i): why for i, why in skipped.items()}}
    write_manifest(cfg.resolve_path(cfg.run_dir), StageManifest(
        stage="precode", config_digest=cfg.digest("data", "task_model", "codecs", "precode"),
        input_hashes={"weights": weights, "codec": identity["codec_checkpoint_sha256"],
                      "features_store": store.url}, items_done=int(frame[["image_id", "quality"]].drop_duplicates().shape[0])
        if not frame.empty else 0, extra=summary))
    create_markdown_artifact(_markdown(summary, weights_frame), key="precode-summary",
                             description=f"precoding of {len(selected)} images")
    logger.info(f"precode done: {computed} items computed on workers {summary['workers']}, {n_items - n_todo} reused; "
                f"codec {secs['seconds_codec']} s, "
                f"heads {secs['seconds_heads']} s, losses {secs['seconds_loss']} s; "
                f"{empty} images with an empty reference (loss 0, flagged); table {out}/table.parquet")
    return summary


def _markdown(summary: dict, weights_frame) -> str:
    lines = [f"**precode**: {summary['images']} images x {summary['qualities']} qualities, "
             f"{summary['computed']} items computed, {summary['reused']} reused", ""]
    if not weights_frame.empty:
        mean = weights_frame.groupby(["task", "scale"])["weight"].mean().unstack("scale").round(3)
        lines += ["Mean MFIP weight per scale:", "", "```", mean.to_string(), "```"]
    return "\n".join(lines)


@holds_output_locks("precode")
def run_precode(cfg: Config, overwrite: bool = False) -> dict:
    device = resolve_device(cfg.device)
    return precode_flow.with_options(task_runner=dask_task_runner(cfg, device))(
        cfg.model_dump(mode="json"), cfg.preset, overwrite)
