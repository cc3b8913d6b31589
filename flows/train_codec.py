"""`mfiba train-codec`: train the learned feature codecs that the configuration names.

One Prefect task per (codec, trained_on) family, from `codecs.main` and `codecs.others`:
- trained_on "features": mosaics of the feature store (`features.store`) images of
  `train_codec.split` (the paper's "retrained ELIC");
- trained_on "rgb": crops of that split's RGB images (synthetic or COCO), the stand-in for
  "ELIC trained on natural images", for which no checkpoint is available here;
- trained_on "none" and the classical codecs (avif, jpegxl, external) are skipped.
Identical specs under several roles train once.

Each family lives in `<train_codec.work_dir>/<codec>-<trained_on>/` (a suffix with the spec
digest only when two different specs would share that name): codec.pt (save_codec),
family.json (digest + identity, `complete` once codec.pt is written), images.json (the data
it was trained on), curves.json / curves.png / summary.json, and one folder per rate point
with last.pt. Resumable: a family whose family.json is complete with the same digest is
reused as it is; a killed run resumes every rate point from its last.pt; a family folder
with another digest (config, data or feature store changed) is moved aside to
`<folder>.stale-<old digest>` and trained afresh.

The digest covers the codec spec (without `checkpoint`), the train_codec section (without
`work_dir`), the seed, and the data: the feature store's identity (task-model weights hash,
model and data config digests) and the image ids, or the RGB image files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import dask
from prefect import flow, get_run_logger, task

from flows.common import dask_task_runner, gpu_annotation, holds_output_locks
from mfiba.config import CodecSpec, Config
from storage.manifest import StageManifest, write_manifest
from storage.urls import atomic_write_text


class TrainCodecError(RuntimeError):
    pass


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def trainable_families(cfg: Config, only: Sequence[str] | None = None) -> list[dict]:
    """The families to train: [{key, roles, spec (json dict)}], in config order (main first).
    `only`: codec labels ("main" or keys of codecs.others); only the families holding one
    of them are returned, under the keys (work folders) a full run gives them."""
    from tasks.codecs.base import CLASSICAL_CODECS, available_codecs

    trainable = sorted(set(available_codecs()) - set(CLASSICAL_CODECS))
    labels = ["main", *cfg.codecs.others]
    unknown = [label for label in only or () if label not in labels]
    if unknown:
        raise TrainCodecError(f"--only {unknown}: no such codec label; labels: {labels}")
    families: dict[str, dict] = {}
    for role, spec in [("main", cfg.codecs.main), *cfg.codecs.others.items()]:
        if spec.trained_on == "none" or spec.name in CLASSICAL_CODECS:
            continue
        field = "codecs.main" if role == "main" else f"codecs.others.{role}"
        if spec.name not in trainable:
            raise TrainCodecError(f"{field}: {spec.name!r} cannot be trained here (trainable: "
                                  f"{trainable}); set its trained_on to 'none' to use it with its "
                                  f"checkpoint as it is")
        if spec.name == "mean-scale-vbr" and spec.phis and len(spec.phis) != 8:
            # compressai's MeanScaleHyperpriorVbr has 8 gain levels, one per training lambda.
            raise TrainCodecError(f"{field}.phis: mean-scale-vbr trains on 8 increasing lambdas, got {spec.phis}")
        d = spec.model_dump(mode="json")
        d.pop("checkpoint", None)
        sd = _sha(d)
        if sd in families:
            families[sd]["roles"].append(role)
        else:
            families[sd] = {"roles": [role], "spec": spec.model_dump(mode="json"), "spec_digest": sd}
    base_names = [f"{f['spec']['name']}-{f['spec']['trained_on']}" for f in families.values()]
    out = []
    for base, fam in zip(base_names, families.values()):
        fam["key"] = base if base_names.count(base) == 1 else f"{base}-{fam['spec_digest'][:8]}"
        out.append(fam)
    if only is None:
        return out
    untrained = [label for label in only if not any(label in fam["roles"] for fam in out)]
    if untrained:
        raise TrainCodecError(f"--only {untrained}: classical or trained_on='none', nothing to train")
    return [fam for fam in out if set(fam["roles"]) & set(only)]


def _family_data(cfg: Config, trained_on: str, cache: dict) -> dict:
    """What a family trains on: {kind, ...} plus the identity that enters its digest."""
    split = cfg.train_codec.split
    if "refs" not in cache:
        from tasks.datasets.sources import image_refs

        cache["refs"] = image_refs(cfg, [split])[split]
    refs = cache["refs"]
    if trained_on == "rgb":
        paths = [r.path for r in refs]
        if not paths:
            raise TrainCodecError(f"split {split!r} has no images for the RGB codecs")
        return {"kind": "rgb", "split": split, "image_paths": paths,
                "identity": {"data": cfg.digest("data"), "split": split,
                             "images": _sha([r.file_name for r in refs])}}
    from storage.feature_store import FeatureStore

    url = cfg.store_url()
    if "://" not in url and not Path(url).exists():
        raise TrainCodecError(f"feature store {url} does not exist: run `mfiba features` first")
    store = FeatureStore(url, mode="r")
    in_store = set(store.image_ids())
    wanted = [r.image_id for r in refs]
    ids = [i for i in wanted if i in in_store]
    if not ids:
        raise TrainCodecError(f"feature store {url} has none of the {len(wanted)} {split!r} images: "
                              f"run `mfiba features` with split {split!r} first")
    meta = store.meta
    return {"kind": "features", "split": split, "store": url, "image_ids": ids, "missing": len(wanted) - len(ids),
            "identity": {"store": {k: meta.get(k) for k in ("weights", "model_config_digest", "data_digest")},
                         "split": split, "images": _sha(ids)}}


def family_digest(cfg: Config, family: dict, data_identity: dict) -> tuple[str, dict]:
    spec = dict(family["spec"])
    spec.pop("checkpoint", None)
    train = cfg.train_codec.model_dump(mode="json")
    train.pop("work_dir", None)
    if family["spec"]["trained_on"] == "rgb":
        train.pop("sampling", None)  # the RGB dataset has no scales: its digest ignores it
    identity = {"spec": spec, "train_codec": train, "seed": cfg.seed, "data": data_identity}
    return _sha(identity), identity


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _result(fam_dir: Path, family: dict, reused: bool) -> dict:
    from tasks.codecs.training import read_summary

    s = read_summary(fam_dir) or {}
    final = s.get("final") or []
    return {"roles": family["roles"], "codec_name": family["spec"]["name"], "trained_on": family["spec"]["trained_on"],
            "work_dir": str(fam_dir), "complete": bool(s.get("complete")),
            "codec": str(fam_dir / s["codec"]) if s.get("complete") else None, "reused": reused,
            "lambdas": [r["lambda"] for r in final], "bpp": [r["bpp"] for r in final],
            "mse": [r["mse"] for r in final], "psnr": [r["psnr"] for r in final],
            "steps": s.get("steps", sum(r.get("step", 0) for r in s.get("rate_points", []) if isinstance(r, dict))),
            "seconds": s.get("seconds", sum(r.get("seconds", 0) for r in s.get("rate_points", [])
                                            if isinstance(r, dict))),
            "digest": _read_json(fam_dir / "family.json").get("digest") if (fam_dir / "family.json").exists() else None}


@task(name="train-codec-family", task_run_name="train-{key}")
def train_family_task(config: dict, key: str, family: dict, fam_dir: str, device: str,
                      time_budget_s: float | None) -> dict:
    import torch

    from tasks.codecs.training import (CodecTrainSettings, MosaicDataset, RGBImageDataset,
                                       train_codec_family)

    cfg = Config(**config)
    logger = get_run_logger()
    fam_dir_p = Path(fam_dir)
    meta = _read_json(fam_dir_p / "family.json") or {}
    data = _read_json(fam_dir_p / "images.json")
    spec = CodecSpec(**family["spec"])
    if device == "cpu":
        torch.set_num_threads(cfg.dask.threads_per_worker)
    else:
        torch.backends.cudnn.benchmark = True  # fixed patch size: tune the convolutions once
    # One loader thread on CPU: reading and cropping the next batch overlaps the step where a
    # core is free (a lone family, e.g. `--only`). Measured on demo-elic's ELIC: 0.49 -> 0.37 s
    # a step when called directly, 16.5 -> 15.6 min for the whole family in this flow (the
    # loader's zarr reads and the step share the GIL). Same batches, so the same weights.
    settings = CodecTrainSettings.from_config(cfg.train_codec, seed=cfg.seed,
                                              overrides={"workers": 1 if device == "cpu" else 4})
    if data["kind"] == "features":
        dataset = MosaicDataset(data["store"], data["image_ids"], patch_size=cfg.train_codec.patch_size,
                                norm_mode=spec.options.get("norm_mode", "minmax"), seed=cfg.seed,
                                sampling=cfg.train_codec.sampling)
    else:
        dataset = RGBImageDataset(data["image_paths"], patch_size=cfg.train_codec.patch_size, seed=cfg.seed)
    path = train_codec_family(spec, dataset, fam_dir_p, settings, device=device, time_budget_s=time_budget_s,
                              identity={"digest": meta["digest"]}, log=logger.info)
    if path is not None:
        sha = torch.load(path, map_location="cpu", weights_only=True)["checkpoint_sha256"]
        _write_json(fam_dir_p / "family.json", {**meta, "complete": True, "codec": Path(path).name,
                                                "checkpoint_sha256": sha})
    return _result(fam_dir_p, family, reused=False)


@flow(name="train-codec", flow_run_name="train-codec-{preset}")
def train_codec_flow(config: dict, preset: str = "demo", time_budget_s: float | None = None,
                     only: list[str] | None = None) -> dict:
    from tasks.device import resolve_device

    cfg = Config(**config)
    logger = get_run_logger()
    device = resolve_device(cfg.device)
    families = trainable_families(cfg, only)
    if not families:
        logger.info("train-codec: no learned codec to train (all classical or trained_on='none')")
        return {}
    root = cfg.resolve_path(cfg.train_codec.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    results, futures = {}, {}
    for fam in families:
        fam_dir = root / fam["key"]
        data = _family_data(cfg, fam["spec"]["trained_on"], cache)
        if data.get("missing"):
            logger.warning(f"{fam['key']}: {data['missing']} {data['split']!r} images are not in the feature store; "
                           f"training on the {len(data['image_ids'])} that are")
        digest, identity = family_digest(cfg, fam, data["identity"])
        meta = _read_json(fam_dir / "family.json")
        if meta and meta.get("digest") == digest and meta.get("complete") and meta.get("codec") \
                and (fam_dir / meta["codec"]).is_file():
            logger.info(f"{fam['key']}: codec {fam_dir / meta['codec']} is up to date (digest {digest}); reused")
            results[fam["key"]] = _result(fam_dir, fam, reused=True)
            continue
        if fam_dir.exists() and (meta is None or meta.get("digest") != digest) and any(fam_dir.iterdir()):
            old = (meta or {}).get("digest", "unknown")
            stale = fam_dir.with_name(f"{fam_dir.name}.stale-{old}")
            n = 1
            while stale.exists():
                stale, n = fam_dir.with_name(f"{fam_dir.name}.stale-{old}-{n}"), n + 1
            logger.warning(f"{fam['key']}: {fam_dir} was trained for another configuration (digest {old}, now "
                           f"{digest}); moved aside to {stale.name}")
            fam_dir.rename(stale)
        fam_dir.mkdir(parents=True, exist_ok=True)
        if meta is None or meta.get("digest") != digest:
            _write_json(fam_dir / "images.json", {k: v for k, v in data.items() if k != "identity"})
            _write_json(fam_dir / "family.json", {"digest": digest, "identity": identity, "roles": fam["roles"],
                                                  "key": fam["key"], "complete": False})
        with dask.annotate(**gpu_annotation(cfg, device)):
            futures[fam["key"]] = train_family_task.submit(config, fam["key"], fam, str(fam_dir), device,
                                                           time_budget_s)
    for key, fut in futures.items():
        results[key] = fut.result()
    done = sum(1 for r in results.values() if r["complete"])
    write_manifest(cfg.resolve_path(cfg.run_dir), StageManifest(
        stage="train-codec", config_digest=cfg.digest("codecs", "train_codec"),
        input_hashes={k: str(r.get("digest")) for k, r in results.items()}, items_done=done,
        extra={"families": results, "only": only}))  # only: the labels trained (None: all)
    for key, r in results.items():
        state = "reused" if r["reused"] else ("trained" if r["complete"] else "INCOMPLETE (rerun to resume)")
        rd = ", ".join(f"{lam:g}: {b:.3f} bpp / {p:.1f} dB" for lam, b, p in zip(r["lambdas"], r["bpp"], r["psnr"]))
        logger.info(f"{key} [{', '.join(r['roles'])}]: {state}; {r['steps']} steps, {r['seconds']:.0f} s; {rd}")
    return results


@holds_output_locks("train-codec")
def run_train_codec(cfg: Config, time_budget_s: float | None = None, local: bool = False,
                    only: Sequence[str] | None = None) -> dict:
    """Train every learned codec family of the configuration (or those of the labels in
    `only`); returns, per family key ("<codec>-<trained_on>"): roles, codec (the codec file,
    None while incomplete), complete, reused, lambdas, bpp, mse, psnr (eval-mode, per
    lambda), steps, seconds, work_dir, digest. `local=True` runs the tasks in this process
    (no Dask cluster)."""
    from tasks.device import resolve_device

    trainable_families(cfg, only)  # a wrong label fails here, before a cluster starts
    if local:
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=1)
    else:
        runner = dask_task_runner(cfg, resolve_device(cfg.device))
    only = list(only) if only is not None else None
    return train_codec_flow.with_options(task_runner=runner)(cfg.model_dump(mode="json"), cfg.preset, time_budget_s,
                                                             only)
