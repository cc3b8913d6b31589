"""Feature extraction into the zarr store: the domain step behind the `features` flow.

Runs inside Dask workers. The task model is built once per worker process and reused
across batches; each image's features are written and marked complete before the next
image starts, so a killed worker loses at most the images it held.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from storage.feature_store import FeatureStore
from tasks.datasets.coco import DatasetError, image_to_tensor, read_rgb
from tasks.datasets.sources import ImageRef
from tasks.device import resolve_device, set_torch_threads
from tasks.models.registry import SCALES, STRIDES, TaskModel, build_task_model


@dataclass(frozen=True)
class ExtractSettings:
    """Everything a worker needs, picklable and hashable (it keys the model cache)."""

    store_url: str
    model_name: str
    checkpoint: str | None
    allow_random_weights: bool
    device: str = "cpu"
    threads: int = 1


@dataclass
class BatchResult:
    written: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # image id -> reason
    seconds_model: float = 0.0
    seconds_store: float = 0.0
    worker: str = ""


# Images per backbone call while the writer thread stores the previous call's features (the
# last call's writes of a batch are not hidden behind computation).
WRITE_CHUNK = 2


@lru_cache(maxsize=2)
def _cached_model(name: str, checkpoint: str | None, allow_random: bool, device: str) -> TaskModel:
    return build_task_model(name, checkpoint, allow_random).to(device)


def worker_model(settings) -> tuple[TaskModel, str]:
    """A task's model (cached per worker process) and device, from settings carrying
    model_name, checkpoint, allow_random_weights, device and threads; sets the task's torch
    thread count."""
    set_torch_threads(settings.threads)
    device = resolve_device(settings.device)
    return _cached_model(settings.model_name, settings.checkpoint, settings.allow_random_weights, device), device


def load_tensor(ref: ImageRef) -> torch.Tensor:
    """The image as a float (3, H, W) tensor in [0, 1]; DatasetError names the file if it is
    missing, unreadable, too large or not the size its annotations give."""
    if ref.problem:
        raise DatasetError(ref.problem)
    return image_to_tensor(read_rgb(ref.path, ref.image_id, check_size=ref.check_size))


def extract_batch(refs: list[ImageRef], settings: ExtractSettings, write_chunk: int = WRITE_CHUNK) -> BatchResult:
    """Extract and store the features of a batch of images; unreadable images are skipped
    with their reason (the run goes on)."""
    import socket

    model, _device = worker_model(settings)
    store = FeatureStore(settings.store_url, mode="a")
    result = BatchResult(worker=socket.gethostname())
    loaded: list[tuple[ImageRef, torch.Tensor]] = []
    for ref in refs:
        try:
            loaded.append((ref, load_tensor(ref)))
        except DatasetError as e:
            result.skipped[ref.image_id] = str(e)
    # Images of one size run as one batch; other sizes run alone, since padding a batch to
    # its largest image would change the features of the smaller ones.
    groups: dict[tuple[int, int], list[tuple[ImageRef, torch.Tensor]]] = {}
    for ref, img in loaded:
        groups.setdefault(tuple(img.shape[-2:]), []).append((ref, img))
    # The store writes of one chunk run in a writer thread while the model computes the next
    # chunk (zarr's encoding and file I/O release the GIL for the most part); every write has
    # finished, and its failure is recorded, before the batch returns. The batch's last image
    # is written by this thread, beside the writer's last one: nothing is left to overlap it.
    chunks = [items[k:k + write_chunk] for items in groups.values() for k in range(0, len(items), write_chunk)]
    pending: list = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer:
        for n, items in enumerate(chunks):
            t0 = time.perf_counter()
            feats, meta = model.features([img for _, img in items])
            result.seconds_model += time.perf_counter() - t0
            for i, (ref, img) in enumerate(items):
                per_image = {s: feats[s][i] for s in SCALES}  # cast to float16 by the writer
                attrs = {
                    "split": ref.split, "file_name": ref.file_name,
                    "input_size": list(meta.original_sizes[i]),
                    "model_input_size": list(meta.image_sizes[i]),
                    "batch_shape": list(meta.batch_shape),
                    "strides": {s: STRIDES[s] for s in SCALES},
                }
                last = n == len(chunks) - 1 and i == len(items) - 1
                write = _here if last else writer.submit
                pending.append((ref, write(_timed_write, store, ref.image_id, per_image, attrs)))
        for ref, future in pending:
            try:
                result.seconds_store += future.result()
                result.written.append(ref.image_id)
            except ValueError as e:  # non-finite features: recorded, never stored
                result.skipped[ref.image_id] = str(e)
    return result


def _here(fn, *args) -> Future:
    """Run `fn` in this thread, its outcome as a Future like the writer's."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as e:  # handled where the writer's failures are
        done.set_exception(e)
    return done


def _timed_write(store: FeatureStore, image_id: int, per_image: dict, attrs: dict) -> float:
    t0 = time.perf_counter()
    store.write_image(image_id, per_image, attrs)
    return time.perf_counter() - t0
