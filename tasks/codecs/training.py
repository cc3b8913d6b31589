"""Training of learned feature codecs (compressai models) on feature mosaics or RGB images.

Plain functions, no Prefect: the `train-codec` flow wraps them, and a GPU machine can call
`train_codec_family` directly.

Data
    `MosaicDataset`: (image, scale) items of a feature store (the paper: 40,000 COCO train
    images x 5 scales = 200,000 mosaics), each scale weighted by its mosaic's area so crops
    fall uniformly over mosaic pixels (or one item each). An item is read from the zarr store
    when it is asked for (one scale of one image at a time: bounded memory), normalised
    exactly as the codec normalises it at coding time (`packing.normalise`, per tensor), packed into the
    codec's 3-channel mosaic (`packing.pack`, padded to a multiple of 64 like the coded one),
    and randomly cropped to `patch_size` (smaller mosaics are replicate-padded up to it).
    `RGBImageDataset`: random crops of the dataset's RGB images in [0, 1], for the stand-in of
    "ELIC trained on natural images" (no natural-image checkpoint is available here).

    Crops are drawn from `numpy.random.default_rng([seed, index])`, where `index` runs over an
    endless, per-epoch shuffled stream (`SampleStream`): item `index % len(dataset)`. So the
    data stream is a pure function of (seed, step): a resumed run sees exactly the batches an
    uninterrupted run would have seen, whatever the number of loader threads.
    Loading runs in threads (`BatchStream`), not processes: Dask workers are daemonic and
    cannot fork DataLoader workers, and zarr's event-loop thread does not survive a fork.

Loss (compressai's `RateDistortionLoss`, metric "mse", and its examples/train.py)
    loss = bpp + lmbda * 255^2 * MSE, for x in [0, 1]; bpp = sum over latents of -log2 p,
    divided by the batch's pixel count. compressai's zoo lambdas for qualities 1..8 are
    0.0018, 0.0035, 0.0067, 0.0130, 0.025, 0.0483, 0.0932, 0.18 (the defaults here).
    The auxiliary loss (`model.aux_loss()`, entropy-bottleneck quantiles) has its own Adam
    optimiser over the parameters named `*.quantiles`; the main Adam gets every other
    parameter; gradients of the main loss are clipped to norm `clip_max_norm` (1.0).
    The learning rate is constant, divided by 10 for the last (1 - lr_drop_fraction) of the
    steps (compressai's trainer uses ReduceLROnPlateau on a validation set instead).

Variable rate (`MeanScaleHyperpriorVbr`, compressai 1.2.8's models/vbr.py)
    The model has 8 training lambdas (`model.lmbda`) and 8 gains (`model.Gain`, the inverse
    quantisation step, 0.1 .. 1.0). `forward(x, stage, s)`: stage 1 is the plain
    mean-scale-hyperprior path (noise proxy, gain unused); stage 2 scales the latent by
    Gain[s], quantises it with a straight-through estimator and adds the learned
    quantisation-reconstruction offsets (`QuantABCD`). In 1.2.8, `_get_scale` detaches
    Gain in training, so the gains stay at their initial values and the network learns to
    fit them. What is done here (simple, documented): the first `vbr_stage1_fraction` of the
    steps train stage 1 at the largest lambda (gain 1.0 belongs to lambda[-1]); every later
    step draws one level s uniformly per batch (from `default_rng([seed, step])`) and trains
    stage 2 at (s, lambda[s]). The paper's multi-objective (MOO) gradient balancing of the
    levels is not implemented: one level per batch, plain weighted-sum loss.
    A CodecSpec `phis` list of 8 increasing values replaces the model's `lmbda` list.

Warm start (fixed-rate families, `finetune_iterations`)
    The highest lambda trains `iterations` steps from scratch; each lower lambda then starts
    from the final weights of the one above it, with fresh optimisers, for
    `finetune_iterations` steps (its last.pt identity names the rate point it started from).

Checkpoints
    Each rate point trains in its own folder: `last.pt` (weights, both optimisers, step,
    history and the steps since its last row, the torch RNG state) is replaced atomically
    every `checkpoint_every` steps and at the end, so a killed run loses at most that many
    steps and a rerun resumes; `history.json` beside it. The data stream is a function of
    (seed, step), and the training noise (the entropy models draw it from torch's generator)
    comes from a generator of the rate point's own, seeded from its seed and saved in
    last.pt: a CPU run, resumed or not, ends with exactly the same weights and history for
    the same seed (same thread count; cuDNN autotuning makes GPU runs inexact anyway).
    `train_codec_family` then builds a `LearnedCodec` (which runs `update(force=True)` on CPU
    for the CDF tables) and writes it with `save_codec` (format "mfiba-codec/1") plus
    `curves.json`, `curves.png` and `summary.json`.

Which codecs: every learned codec of the registry (`build_codec`): bmshj2018-hyperprior,
mbt2018-mean, elic, elic-chandelier, mean-scale-vbr, lic-tcm. A CodecSpec's fields: N, M
(None: the codec's default), phis (the training lambdas; default compressai's eight),
options["arch"] (extra constructor kwargs: ELIC's groups, TCM's config, ...),
options["train"] (overrides of `CodecTrainSettings` fields for this codec) and
options["norm_mode"] (the flow's MosaicDataset normalisation, default "minmax").

`import compressai` costs ~7 s: it is imported lazily, inside functions.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from storage.urls import atomic_torch_save, atomic_write_bytes, atomic_write_text
from tasks.codecs.packing import GROUP_SIZE, normalise, pack, pack_layout
from tasks.divergence import DivergenceGuard

COMPRESSAI_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.025, 0.0483, 0.0932, 0.18)
DEFAULT_SCALES = ("0", "1", "2", "3", "pool")


# --------------------------------------------------------------------------- data


def _replicate_pad_to(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, h, w) -> (C, max(h, height), max(w, width)) repeating the last row / column."""
    _, h, w = img.shape
    if h >= height and w >= width:
        return img
    rows = torch.arange(max(h, height)).clamp_(max=h - 1)
    cols = torch.arange(max(w, width)).clamp_(max=w - 1)
    return img[:, rows][:, :, cols]


def random_crop(img: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A size x size crop at a uniform position (replicate-padded first when smaller)."""
    img = _replicate_pad_to(img, size, size)
    _, h, w = img.shape
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img[:, top:top + size, left:left + size].contiguous()


class MosaicDataset(torch.utils.data.Dataset):
    """Normalised, packed feature mosaics of a FeatureStore: items are (image, scale) pairs.

    sampling "mosaic": one item per (image, scale). "area": each scale repeated as many times
    as patches tile its padded mosaic (counted on the first image: the ratios between scales
    are the same at every image size), so crops are drawn uniformly over mosaic pixels, as the
    bits and the feature MSE of a coded image are: with "mosaic", the small top scales (a
    64-px mosaic, mostly padding for 'pool') made 2 of every 5 crops.
    `dataset[i]` for any int i >= 0 is item i % len(dataset) with a crop drawn from
    default_rng([seed, i]): indices beyond len(dataset) (see `SampleStream`) give new crops.
    The store is opened lazily, once per process (the object pickles without it).
    """

    def __init__(self, store_url: str, image_ids: Sequence[int], scales: Sequence[str] = DEFAULT_SCALES,
                 patch_size: int = 128, norm_mode: str = "minmax", seed: int = 0, stride: int = 64,
                 sampling: str = "area"):
        if not image_ids:
            raise ValueError(f"MosaicDataset: no images given from {store_url}")
        if not scales:
            raise ValueError("MosaicDataset: no scales given")
        if sampling not in ("mosaic", "area"):
            raise ValueError(f"MosaicDataset: sampling must be 'mosaic' or 'area', got {sampling!r}")
        self.store_url = str(store_url)
        self.image_ids = [int(i) for i in image_ids]
        self.scales = [str(s) for s in scales]
        self.patch_size, self.norm_mode, self.seed, self.stride = int(patch_size), norm_mode, int(seed), int(stride)
        self._store = None
        self.weights = [1] * len(self.scales)
        if sampling == "area":
            first = self._open().read_image(self.image_ids[0], self.scales)
            self.weights = [math.ceil(math.prod(self.crop_bounds(first[s].shape)) / self.patch_size ** 2)
                            for s in self.scales]
        self._scale_of = [k for k, n in enumerate(self.weights) for _ in range(n)]  # slot -> scale index

    def __len__(self) -> int:
        return len(self.image_ids) * len(self._scale_of)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def _open(self):
        if self._store is None:
            from storage.feature_store import FeatureStore

            self._store = FeatureStore(self.store_url, mode="r")
        return self._store

    def item(self, index: int) -> tuple[int, str]:
        """(image id, scale) of an index."""
        k = int(index) % len(self)
        slots = len(self._scale_of)
        return self.image_ids[k // slots], self.scales[self._scale_of[k % slots]]

    def _read(self, image_id: int, scale: str):
        """(raw float16 (C, H, W) tensor, NormParams of the scale as the codec computes them)."""
        x = torch.from_numpy(self._open().read_image(image_id, [scale])[scale])
        if self.norm_mode == "minmax":
            # normalise's NormParams without a float64 copy (min-max needs only the extremes).
            _, params = normalise(torch.stack([x.min(), x.max()]), mode="minmax")
        else:
            _, params = normalise(x, mode=self.norm_mode)
        return x, params

    def mosaic(self, image_id: int, scale: str) -> torch.Tensor:
        """The whole (3, H, W) mosaic in [0, 1], exactly as the codec codes it (normalise, pack)."""
        x, _ = self._read(image_id, scale)
        return pack(normalise(x, mode=self.norm_mode)[0], stride=self.stride)[0]

    def crop(self, x: torch.Tensor, params, top: int, left: int) -> torch.Tensor:
        """The patch at (top, left) of the packed, normalised mosaic of x, replicate-padded
        beyond it, built by gathering only the patch's values (O(patch), not O(mosaic))."""
        c, h, w = x.shape
        info = pack_layout(c, h, w, self.stride)
        size = self.patch_size
        # pack() pads by repeating the last row/column, and so does the padding to `size`.
        rows = torch.arange(top, top + size).clamp_(max=info.mosaic_height - 1)
        cols = torch.arange(left, left + size).clamp_(max=info.mosaic_width - 1)
        tile = (rows // h)[:, None] * info.cols + (cols // w)[None, :]  # (P, P) tile of each pixel
        channel = tile[None] * GROUP_SIZE + torch.arange(GROUP_SIZE)[:, None, None]  # (3, P, P)
        used = channel < c
        values = x[channel.clamp(max=c - 1), (rows % h)[None, :, None], (cols % w)[None, None, :]]
        # normalise's per-value formula (float64, clamp, float32); empty slots are 0 after it.
        y = ((values.to(torch.float64) - params.low) / (params.high - params.low)).clamp_(0.0, 1.0)
        return y.to(torch.float32).masked_fill_(~used, 0.0)

    def crop_bounds(self, shape: Sequence[int]) -> tuple[int, int]:
        """(height, width) the crop position is drawn in, for features of this (C, H, W)
        shape: the padded mosaic, at least a patch."""
        info = pack_layout(*shape, self.stride)
        return max(info.padded_height, self.patch_size), max(info.padded_width, self.patch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        image_id, scale = self.item(index)
        x, params = self._read(image_id, scale)
        rng = np.random.default_rng([self.seed, int(index)])
        height, width = self.crop_bounds(x.shape)
        top = int(rng.integers(0, height - self.patch_size + 1))  # the draws of random_crop
        left = int(rng.integers(0, width - self.patch_size + 1))
        return self.crop(x, params, top, left)


class RGBImageDataset(torch.utils.data.Dataset):
    """Random patch_size crops of RGB images in [0, 1] (indices as in MosaicDataset)."""

    def __init__(self, image_paths: Sequence[str | os.PathLike], patch_size: int = 128, seed: int = 0):
        if not image_paths:
            raise ValueError("RGBImageDataset: no images given")
        self.image_paths = [str(p) for p in image_paths]
        self.patch_size, self.seed = int(patch_size), int(seed)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from tasks.datasets.coco import read_rgb

        path = self.image_paths[int(index) % len(self)]
        rng = np.random.default_rng([self.seed, int(index)])
        arr = np.array(read_rgb(path), dtype=np.uint8)
        img = torch.from_numpy(arr).permute(2, 0, 1)
        return random_crop(img, self.patch_size, rng).float().div_(255.0)


class SampleStream:
    """Endless dataset indices: epoch e is a permutation of range(n) drawn from
    default_rng([seed, e]), offset by e * n (so every index is unique and seeds its own crop).
    `start` skips that many samples (a resumed run starts at step * batch_size)."""

    def __init__(self, n: int, seed: int = 0, start: int = 0):
        self.n, self.seed, self.start = int(n), int(seed), int(start)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for k in perm[offset:]:
                yield epoch * self.n + int(k)
            epoch, offset = epoch + 1, 0


class BatchStream:
    """Endless batches (B, 3, P, P) from a dataset and a SampleStream, loaded by `workers`
    threads with at most `prefetch` batches in flight (workers=0: in the calling thread)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_step: int = 0, workers: int = 0,
                 prefetch: int = 2):
        self.dataset, self.batch_size, self.workers = dataset, int(batch_size), int(workers)
        self.prefetch = max(1, int(prefetch))
        self.samples = SampleStream(len(dataset), seed, start_step * self.batch_size)

    def _load(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.dataset[i] for i in indices])

    def __iter__(self) -> Iterator[torch.Tensor]:
        it = iter(self.samples)

        def next_indices() -> list[int]:
            return [next(it) for _ in range(self.batch_size)]

        if self.workers <= 0:
            while True:
                yield self._load(next_indices())
        with ThreadPoolExecutor(self.workers, thread_name_prefix="codec-data") as pool:
            pending: deque = deque()
            while True:
                while len(pending) < self.prefetch * self.workers:
                    idx = next_indices()
                    # One future per item: a batch is loaded by all threads at once.
                    pending.append([pool.submit(self.dataset.__getitem__, i) for i in idx])
                yield torch.stack([f.result() for f in pending.popleft()])


def make_loader(dataset, batch_size: int, seed: int = 0, workers: int = 0) -> Callable[[int], BatchStream]:
    """A loader factory for `train_rate_point`: start_step -> the batch stream from there."""
    return lambda start_step: BatchStream(dataset, batch_size, seed, start_step, workers)


# --------------------------------------------------------------------------- loss, optimisers


def rd_loss(output: Mapping[str, Any], target: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """compressai's RateDistortionLoss (metric 'mse'): bpp + lmbda * 255^2 * MSE."""
    n, _, h, w = target.shape
    num_pixels = n * h * w
    bpp = sum(torch.log(lk).sum() / (-math.log(2) * num_pixels) for lk in _likelihood_tensors(output["likelihoods"]))
    mse = torch.nn.functional.mse_loss(output["x_hat"], target)
    return {"loss": lmbda * 255 ** 2 * mse + bpp, "bpp": bpp, "mse": mse}


def _likelihood_tensors(item) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, Mapping):
        for v in item.values():
            yield from _likelihood_tensors(v)
    elif isinstance(item, (list, tuple)):
        for v in item:
            yield from _likelihood_tensors(v)


def configure_optimizers(model: nn.Module, lr: float, aux_lr: float):
    """compressai's examples/train.py split: Adam over every parameter but `*.quantiles`,
    and an auxiliary Adam over the entropy bottlenecks' quantiles."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [p for n, p in named if not n.endswith(".quantiles")]
    aux = [p for n, p in named if n.endswith(".quantiles")]
    if not aux:
        raise ValueError(f"{type(model).__name__} has no '*.quantiles' parameters (no entropy bottleneck?)")
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=aux_lr), main


def is_variable_rate(model: nn.Module) -> bool:
    return hasattr(model, "Gain") and hasattr(model, "lmbda")


# --------------------------------------------------------------------------- one rate point


def read_state(work_dir: str | Path) -> dict | None:
    """The `last.pt` of a rate point (None if absent)."""
    p = Path(work_dir) / "last.pt"
    return torch.load(p, map_location="cpu", weights_only=False) if p.exists() else None


def _rng_devices(device: str) -> list[int]:
    """The CUDA device whose generator training uses ([] on CPU)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        d = torch.device(device)
        return [d.index if d.index is not None else torch.cuda.current_device()]
    return []


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """The generators training draws from, for last.pt."""
    out = {"torch": torch.get_rng_state()}
    for index in _rng_devices(device):
        out["cuda"] = torch.cuda.get_rng_state(index)
    return out


def _set_rng_state(rng: Mapping[str, torch.Tensor] | None, seed: int, step: int, device: str) -> None:
    """Restore the generators of a last.pt, or seed them from (seed, step): a fresh start, or
    a last.pt written before the RNG state was saved (resumes, but not bit-exactly)."""
    if rng and "torch" in rng:
        torch.set_rng_state(rng["torch"])
        for index in _rng_devices(device):
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], index)
        return
    derived = int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0]) >> 1
    torch.default_generator.manual_seed(derived)
    for index in _rng_devices(device):
        torch.cuda.default_generators[index].manual_seed(derived)


def train_rate_point(
    model: nn.Module,
    loader: Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]],
    lmbda: float | Sequence[float] | None,
    iterations: int,
    lr: float,
    aux_lr: float,
    work_dir: str | Path,
    *,
    checkpoint_every: int = 200,
    clip_max_norm: float = 1.0,
    time_budget_s: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    log_every: int = 10,
    lr_drop_fraction: float | None = 0.9,
    vbr_stage1_fraction: float = 0.25,
    identity: Mapping[str, Any] | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume) one model with the RD loss; returns {step, iterations, complete,
    seconds, last: the last history row}. The model is trained in place (on `device`).

    loader: batches (B, 3, H, W) in [0, 1]; either an iterable (re-iterated when exhausted) or
    a factory start_step -> iterable (e.g. `make_loader(...)`), which makes a resumed run see
    the same data as an uninterrupted one. lmbda: the training lambda; for a variable-rate
    model None (its `model.lmbda` list) or that list. `identity` is stored in last.pt, and a
    last.pt with another identity is refused (a stale run, e.g. after a config change).
    History rows (every `log_every` steps, averages over them): step, loss, bpp, mse, aux,
    lr, elapsed_s (+ for VBR: stage, bpp/mse per level). Saved to work_dir/history.json.
    init_state: model weights to start from when work_dir has no last.pt (fresh optimisers).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    vbr = is_variable_rate(model)
    if vbr:
        if lmbda is not None:
            lams = [float(x) for x in lmbda]
            if len(lams) != len(model.Gain):
                raise ValueError(f"{len(lams)} lambdas for a VBR model with {len(model.Gain)} levels")
            model.lmbda = lams
        lams = [float(x) for x in model.lmbda]
        stage1_steps = int(round(iterations * max(0.0, min(1.0, vbr_stage1_fraction))))
    else:
        if lmbda is None or isinstance(lmbda, (list, tuple)):
            raise ValueError("a fixed-rate model needs one training lambda")
        lams, stage1_steps = [float(lmbda)], 0
    model.to(device)
    opt, aux_opt, main_params = configure_optimizers(model, lr, aux_lr)
    identity = dict(identity or {})

    state_path = work_dir / "last.pt"
    step, history, seconds_before, rng, pending = 0, [], 0.0, None, {}
    state = read_state(work_dir)
    if state is not None:
        if identity and state.get("identity") not in (None, identity):
            raise ValueError(f"{state_path} belongs to another training run ({state.get('identity')}); "
                             f"expected {identity}: move it away to start afresh")
        model.load_state_dict(state["model"])
        model.to(device)
        opt.load_state_dict(state["optimizer"])
        aux_opt.load_state_dict(state["aux_optimizer"])
        step, history, seconds_before = state["step"], state["history"], state.get("seconds", 0.0)
        rng = state.get("rng")
        pending = state.get("pending") or {}  # the steps since the last history row
        if step < iterations:
            log(f"resuming at step {step}/{iterations} from {state_path}")
    elif init_state is not None:
        model.load_state_dict(init_state)
        model.to(device)

    def save_state() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "aux_optimizer": aux_opt.state_dict(), "step": step, "iterations": iterations,
                      "history": history, "lambdas": lams, "variable_rate": vbr, "identity": identity,
                      "seconds": seconds_before + (time.time() - started),
                      "rng": _rng_state(device), "pending": {"window": window, "by_level": by_level}},
                     state_path)
        atomic_write_text(work_dir / "history.json", json.dumps(history))

    def lr_at(k: int) -> float:
        if lr_drop_fraction is not None and k >= int(iterations * lr_drop_fraction):
            return lr * 0.1
        return lr

    started, step_at_start = time.time(), step
    window: dict[str, list] = pending.get("window") or {"loss": [], "bpp": [], "mse": [], "aux": []}
    by_level: dict[int, dict[str, list]] = pending.get("by_level") or {}
    guard = DivergenceGuard("codec", log)
    model.train()
    batches: Iterator[torch.Tensor] | None = None
    # compressai's entropy models draw their training noise from torch's global generator:
    # it runs here on a generator of this rate point alone, seeded from (seed, step) on a
    # fresh start and restored from last.pt on a resume (bit-exact resumption), and the
    # caller's generator is left as it was.
    with torch.random.fork_rng(devices=_rng_devices(device)):
        _set_rng_state(rng, seed, step, device)
        while step < iterations:
            if batches is None:
                batches = iter(loader(step) if callable(loader) else loader)
            try:
                x = next(batches)
            except StopIteration:
                batches = None
                continue
            x = x.to(device, non_blocking=True)
            if vbr:
                if step < stage1_steps:
                    level, stage = len(lams) - 1, 1
                else:
                    level, stage = int(np.random.default_rng([seed, step]).integers(len(lams))), 2
                out = model(x, stage=stage, s=level)
                lam = lams[level]
            else:
                level, stage, lam = 0, 0, lams[0]
                out = model(x)
            losses = rd_loss(out, x, lam)
            if not guard.finite(losses["loss"], losses, step):
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if clip_max_norm and clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(main_params, clip_max_norm)
            opt.step()
            aux = model.aux_loss()
            aux.backward()
            aux_opt.step()
            step += 1

            vals = {k: float(v.detach()) for k, v in losses.items()}
            vals["aux"] = float(aux.detach())
            for k in window:
                window[k].append(vals[k])
            if vbr and stage == 2:
                lv = by_level.setdefault(level, {"bpp": [], "mse": []})
                lv["bpp"].append(vals["bpp"])
                lv["mse"].append(vals["mse"])
            if step % log_every == 0 or step == iterations or step == 1:
                row = {"step": step, **{k: float(np.mean(v)) for k, v in window.items()}, "lr": lr_at(step - 1),
                       "elapsed_s": round(seconds_before + time.time() - started, 2)}
                if vbr:
                    row["stage"] = stage
                    row["levels"] = {str(s): {"lambda": lams[s], "bpp": float(np.mean(v["bpp"])),
                                              "mse": float(np.mean(v["mse"])), "n": len(v["bpp"])}
                                     for s, v in sorted(by_level.items())}
                else:
                    row["lambda"] = lam
                history.append(row)
                window = {k: [] for k in window}
                by_level = {}
                if step % (log_every * 10) == 0 or step == 1:
                    log(f"step {step}/{iterations}: loss {row['loss']:.4f} bpp {row['bpp']:.4f} "
                        f"mse {row['mse']:.3g} aux {row['aux']:.1f}")
            if step % checkpoint_every == 0:
                save_state()
            if time_budget_s is not None and time.time() - started > time_budget_s and step < iterations:
                log(f"time budget of {time_budget_s:.0f} s spent at step {step}/{iterations}; rerun to resume")
                break
        if step != step_at_start or not state_path.exists():
            save_state()
    return {"step": step, "iterations": iterations, "complete": step >= iterations,
            "seconds": round(seconds_before + time.time() - started, 2),
            "last": history[-1] if history else None}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_rd(model: nn.Module, patches: torch.Tensor, lmbdas: Sequence[float], device: str = "cpu",
                batch_size: int = 8) -> list[dict[str, float]]:
    """Eval-mode RD on fixed patches (rounding, not noise), one row per rate level:
    {lambda, bpp, mse, psnr} (for a fixed-rate model a single row at its lambda). The model
    is left in the mode it came in."""
    was_training = model.training
    model.eval().to(device)
    vbr = is_variable_rate(model)
    rows = []
    levels = range(len(lmbdas)) if vbr else [None]
    for level in levels:
        bits = mse_sum = 0.0
        for i in range(0, len(patches), batch_size):
            x = patches[i:i + batch_size].to(device)
            out = model(x, stage=2, s=level) if vbr else model(x)
            bits += sum(float(-torch.log2(lk.double()).sum()) for lk in _likelihood_tensors(out["likelihoods"]))
            mse_sum += float(((out["x_hat"].clamp(0, 1) - x) ** 2).double().sum())
        n_pix = patches.shape[0] * patches.shape[2] * patches.shape[3]
        mse = mse_sum / (n_pix * patches.shape[1])
        rows.append({"lambda": float(lmbdas[level if vbr else 0]), "bpp": bits / n_pix, "mse": mse,
                     "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")})
    model.train(was_training)
    return rows


# --------------------------------------------------------------------------- a codec family


@dataclass
class CodecTrainSettings:
    """How a family is trained (`TrainCodecConfig` fields plus a few knobs of this module);
    a CodecSpec's `options["train"]` dict overrides any of them for that codec."""

    iterations: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    aux_lr: float = 1e-3
    checkpoint_every: int = 200
    clip_max_norm: float = 1.0
    lr_drop_fraction: float | None = 0.9
    vbr_stage1_fraction: float = 0.25
    # Fixed-rate families: None trains every rate point from scratch for `iterations` steps;
    # an int trains the highest lambda for `iterations` steps, then each lower one for this
    # many steps from the weights of the one above it (the transforms carry over: only the
    # rate-distortion trade-off has to move, so a short run gives an ordered family).
    finetune_iterations: int | None = None
    workers: int = 0  # loader threads
    seed: int = 0
    log_every: int = 10
    eval_patches: int = 16

    @classmethod
    def from_config(cls, train_cfg, seed: int = 0, overrides: Mapping[str, Any] | None = None) -> "CodecTrainSettings":
        """From a TrainCodecConfig(-like) object: its fields of the same names, then `overrides`."""
        names = {f.name for f in fields(cls)}
        base = {k: getattr(train_cfg, k) for k in names if hasattr(train_cfg, k)}
        base.setdefault("seed", seed)
        extra = dict(overrides or {})
        bad = sorted(set(extra) - names)
        if bad:
            raise ValueError(f"unknown codec training option(s) {bad}; allowed: {sorted(names)}")
        return cls(**{**base, **extra})


def family_lambdas(spec, variable_rate: bool) -> list[float] | None:
    """The training lambdas of a spec: its `phis`, else compressai's eight (fixed-rate); for a
    VBR model None (the model's own list) unless `phis` gives all 8."""
    phis = [float(x) for x in (getattr(spec, "phis", None) or [])]
    if variable_rate:
        if not phis:
            return None
        if len(phis) != len(COMPRESSAI_LAMBDAS) or any(b <= a for a, b in zip(phis, phis[1:])):
            raise ValueError(f"a variable-rate codec takes 8 increasing lambdas in phis, got {phis}")
        return phis
    lams = phis or list(COMPRESSAI_LAMBDAS)
    if len(set(lams)) != len(lams) or not all(x > 0 for x in lams):
        raise ValueError(f"training lambdas must be distinct and > 0, got {lams}")
    return sorted(lams)


def build_untrained(spec, seed: int = 0) -> tuple[str, dict, list[nn.Module], bool]:
    """(architecture, constructor kwargs, models, variable_rate) for a spec, through the codec
    registry (`build_codec(name, N=, M=, lmbda=, seed=)`), so every registered learned codec
    trains the same way (compressai's, and LIC-TCM). N / M come from the spec (None: the
    codec's default); `options["arch"]` adds constructor kwargs (ELIC's groups, TCM's config)."""
    from tasks.codecs.base import build_codec
    from tasks.codecs.learned import ARCHITECTURES, LearnedCodec

    options = dict(getattr(spec, "options", None) or {})
    probe_vbr = spec.name in ARCHITECTURES and ARCHITECTURES[spec.name][3]
    lams = family_lambdas(spec, probe_vbr)
    codec = build_codec(spec.name, N=spec.N, M=spec.M, lmbda=None if probe_vbr else lams, seed=seed, threads=None,
                        **dict(options.get("arch", {})))
    if not isinstance(codec, LearnedCodec):
        raise ValueError(f"codec {spec.name!r} is not a learned codec: nothing to train")
    if codec.variable_rate != probe_vbr:
        raise ValueError(f"codec {spec.name!r}: unexpected variable_rate={codec.variable_rate}")
    return codec.architecture, dict(codec.kwargs), list(codec.models), codec.variable_rate


def _fixed_patches(dataset, n: int, seed: int) -> torch.Tensor:
    """n evaluation crops, from indices no training stream reaches in its first 10^9 samples."""
    n = max(1, min(n, 64))
    base = 10 ** 9 + int(seed)
    return torch.stack([dataset[base + i * max(1, len(dataset) // n + 1)] for i in range(n)])


def plot_curves(curves: Mapping[str, Any], path: str | Path) -> None:
    """loss, bpp and MSE against step for every rate point (VBR: per level), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, rp in curves["rate_points"].items():
        hist = [r for r in rp["history"] if "step" in r]
        if not hist:
            continue
        steps = [r["step"] for r in hist]
        axes[0].plot(steps, [r["loss"] for r in hist], label=label)
        if curves["variable_rate"]:
            levels = sorted({s for r in hist for s in r.get("levels", {})}, key=int)
            for s in levels:
                pts = [(r["step"], r["levels"][s]) for r in hist if s in r.get("levels", {})]
                lam = pts[0][1]["lambda"]
                axes[1].plot([p[0] for p in pts], [p[1]["bpp"] for p in pts], label=f"s={s} (λ={lam:g})")
                axes[2].plot([p[0] for p in pts], [p[1]["mse"] for p in pts], label=f"s={s}")
        else:
            axes[1].plot(steps, [r["bpp"] for r in hist], label=label)
            axes[2].plot(steps, [r["mse"] for r in hist], label=label)
    for ax, title in zip(axes, ("RD loss", "bpp (training estimate)", "MSE")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{curves['codec']} trained on {curves['trained_on']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def train_codec_family(
    spec,
    dataset,
    work_dir: str | Path,
    settings: CodecTrainSettings | None = None,
    *,
    device: str = "cpu",
    time_budget_s: float | None = None,
    identity: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Train every rate point of a CodecSpec-like `spec` (name, N, M, phis, trained_on,
    options) on `dataset` (or its one VBR model), then write work_dir/codec.pt (save_codec),
    curves.json, curves.png and summary.json. Returns the codec path; None when the time
    budget ran out first (rerun to resume: every rate point continues from its last.pt).

    Rate points train one after another in work_dir/rp<i>-lambda<lambda>/ (VBR: work_dir/vbr/);
    a finished one is not retrained. With `settings.finetune_iterations`, the highest lambda
    trains first and each lower one starts from the weights of the one above it. `identity`
    (e.g. the config digest) is stored with every state and in summary.json.
    `options["train"]` in the spec overrides `settings` fields.
    """
    from tasks.codecs.learned import LearnedCodec, save_codec

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or CodecTrainSettings()
    overrides = dict((getattr(spec, "options", None) or {}).get("train", {}))
    if overrides:
        settings = CodecTrainSettings.from_config(settings, overrides=overrides)
    architecture, kwargs, models, vbr = build_untrained(spec, settings.seed)
    lams = family_lambdas(spec, vbr)
    if vbr and lams is not None:
        models[0].lmbda = list(lams)
    all_lams = list(models[0].lmbda) if vbr else lams
    trained_on = getattr(spec, "trained_on", "features")
    identity = dict(identity or {})
    started = time.time()
    log(f"{spec.name} ({architecture}{kwargs}) on {trained_on}: "
        f"{'1 variable-rate model' if vbr else f'{len(models)} rate points'}, lambdas {all_lams}, "
        f"{settings.iterations} steps x batch {settings.batch_size}, {len(dataset)} items, device {device}")

    warm = not vbr and settings.finetune_iterations is not None
    # Warm-started families train from the highest lambda down, each from the one above it.
    order = list(range(len(models)))[::-1] if warm else list(range(len(models)))
    labels = ["vbr"] if vbr else [f"rp{i}-lambda{lams[i]:g}" for i in range(len(models))]  # by model
    results, trained = [], {}
    for k, i in enumerate(order):
        model, label = models[i], labels[i]
        rp_dir = work_dir / label
        remaining = None if time_budget_s is None else time_budget_s - (time.time() - started)
        if k > 0 and remaining is not None and remaining <= 0:  # a started rate point gets >= 1 step
            log(f"time budget spent before rate point {label}")
            return _write_incomplete(work_dir, identity, results)
        init_from = labels[order[k - 1]] if warm and k > 0 else None
        iterations = settings.finetune_iterations if init_from else settings.iterations
        loader = make_loader(dataset, settings.batch_size, seed=settings.seed + 1000 * i, workers=settings.workers)
        res = train_rate_point(
            model, loader, None if vbr else lams[i], iterations, settings.lr, settings.aux_lr, rp_dir,
            checkpoint_every=settings.checkpoint_every, clip_max_norm=settings.clip_max_norm,
            time_budget_s=None if remaining is None else max(0.0, remaining), device=device,
            seed=settings.seed + 1000 * i, log_every=settings.log_every,
            lr_drop_fraction=settings.lr_drop_fraction, vbr_stage1_fraction=settings.vbr_stage1_fraction,
            identity={**identity, "rate_point": label, **({"init_from": init_from} if init_from else {})},
            init_state=models[order[k - 1]].state_dict() if init_from else None,
            log=lambda m, label=label: log(f"[{spec.name} {label}] {m}"))
        res["label"] = label
        results.append(res)
        if not res["complete"]:
            return _write_incomplete(work_dir, identity, results)
        state = read_state(rp_dir)
        trained[i] = {"lambda": None if vbr else lams[i], "steps": res["step"], "seconds": res["seconds"],
                      "init_from": init_from, "history": state["history"]}
    rate_points = {labels[i]: trained[i] for i in range(len(models))}  # by increasing lambda

    patches = _fixed_patches(dataset, settings.eval_patches, settings.seed)
    evaluation = {}
    for label, model in zip(rate_points, models):
        evaluation[label] = evaluate_rd(model, patches, all_lams if vbr else [rate_points[label]["lambda"]], device)
        model.cpu()
    steps = sum(r["step"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    codec = LearnedCodec(models, None if vbr else lams, name=spec.name, architecture=architecture, kwargs=kwargs,
                         source=f"mfiba train-codec: {spec.name} trained on {trained_on}, {steps} steps"
                                + (f", identity {identity.get('digest')}" if identity.get("digest") else ""),
                         threads=1, update=True)  # update(force=True) under deterministic CPU settings
    codec_path = Path(save_codec(work_dir / "codec.pt", codec))
    curves = {"codec": spec.name, "architecture": architecture, "kwargs": kwargs, "trained_on": trained_on,
              "variable_rate": vbr, "lambdas": all_lams, "settings": asdict(settings),
              "rate_points": rate_points, "eval": evaluation,
              "eval_patches": int(patches.shape[0]), "patch_size": int(patches.shape[-1])}
    atomic_write_text(work_dir / "curves.json", json.dumps(curves, indent=1))
    plot_curves(curves, work_dir / "curves.png")
    final = [row for rows in evaluation.values() for row in rows]
    # The codec file by name: it sits beside summary.json, wherever the folder is moved.
    summary = {"complete": True, "codec": codec_path.name, "checkpoint_sha256": codec.checkpoint_sha256.hex(),
               "identity": identity, "steps": steps, "seconds": round(seconds, 2),
               "iterations_per_s": round(steps / seconds, 3) if seconds > 0 else None,
               "final": final, "rate_points": list(rate_points)}
    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=1))
    log(f"{spec.name} on {trained_on}: wrote {codec_path} ({steps} steps, {seconds:.0f} s); eval "
        + ", ".join(f"λ={r['lambda']:g}: {r['bpp']:.3f} bpp, {r['psnr']:.1f} dB" for r in final))
    return codec_path


def _write_incomplete(work_dir: Path, identity: Mapping, results: list[dict]) -> None:
    summary = {"complete": False, "identity": dict(identity),
               "rate_points": [{k: r[k] for k in ("label", "step", "iterations", "complete", "seconds")}
                               for r in results]}
    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=1))
    return None


def read_summary(work_dir: str | Path) -> dict | None:
    p = Path(work_dir) / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None
