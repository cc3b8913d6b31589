"""`mfiba status`: per stage, what is done, stale or missing for a configuration, read from
the stores, result tables, versioned folders and manifests (nothing is computed).

- done: the stage's outputs exist for exactly this configuration and these inputs;
- partial: some of its items are there (a rerun computes only the rest);
- stale: outputs exist but were made from other inputs (a rerun recomputes what depends on
  the change);
- missing: nothing yet (or an earlier stage is missing).
"""
from __future__ import annotations

import json

from mfiba.config import Config


def _row(stage: str, state: str, detail: str) -> dict:
    return {"stage": stage, "state": state, "detail": detail}


def stage_status(cfg: Config) -> list[dict]:
    from flows.features import _checkpoint, weights_identity
    from flows.fit import fit_root, fit_version
    from flows.pipeline import stages
    from flows.precode import precode_identity, precode_table_url
    from storage.feature_store import FeatureStore
    from storage.manifest import read_manifest
    from storage.results import PartTable
    from storage.urls import read_bytes
    from tasks.datasets.sources import image_refs
    from tasks.models.registry import build_task_model
    from tasks.precoding import part_key

    rows = []
    run = cfg.resolve_path(cfg.run_dir)
    weights = weights_identity(build_task_model(cfg.task_model.name, _checkpoint(cfg),
                                                cfg.task_model.allow_random_weights))
    # features
    refs = image_refs(cfg, list(cfg.features.splits))
    selected = {r.image_id for v in refs.values() for r in v}
    try:
        store = FeatureStore(cfg.store_url(), mode="r")
        meta = store.meta
        done = set(store.image_ids()) & selected
        if meta.get("weights") != weights or meta.get("data_digest") != cfg.data_identity():
            rows.append(_row("features", "stale", f"{store.url} was built with other weights or data"))
        else:
            state = "done" if done == selected else ("partial" if done else "missing")
            rows.append(_row("features", state, f"{len(done)}/{len(selected)} selected images in {store.url}"))
    except Exception as e:  # no store yet
        rows.append(_row("features", "missing", f"no store at {cfg.store_url()} ({type(e).__name__})"))

    # precode
    identity = precode_identity(cfg, model_weights=weights)
    url = precode_table_url(cfg, identity)
    precode_ids = [r.image_id for s in cfg.precode.splits for r in image_refs(cfg, [s]).get(s, [])]
    expected = {part_key(i, q) for i in precode_ids for q in range(len(cfg.codecs.main.phis))}
    have = set(PartTable(url, identity).keys()) & expected if PartTable.read_identity(url) == identity else set()
    state = "done" if have == expected else ("partial" if have else "missing")
    rows.append(_row("precode", state, f"{len(have)}/{len(expected)} (image, quality) items in {url}"))

    # fit
    try:
        version, _ = fit_version(read_bytes(f"{url}/table.parquet"), read_bytes(f"{url}/identity.json"), cfg)
        current = json.loads(read_bytes(f"{fit_root(cfg)}/current.json"))["version"] \
            if (run / "fit" / "current.json").exists() else None
        made = (run / "fit" / version / "fit.json").exists()
        if made and current == version:
            rows.append(_row("fit", "done", version))
        elif made:
            # tune and evaluate read the fit current.json names: for this configuration that is
            # the wrong one until `mfiba fit` selects this one again (nothing recomputed).
            rows.append(_row("fit", "stale", f"{version} exists, but current.json points at {current}: "
                                             "`mfiba fit` selects it again without recomputing"))
        else:
            rows.append(_row("fit", "stale" if current else "missing",
                             f"expected {version}; " + (f"current is {current}" if current else "no fit yet")))
    except FileNotFoundError:
        rows.append(_row("fit", "missing", "no finished precode table"))
        version = None

    # tune and evaluate: their manifests record which fit (and tuning) they used
    for stage in ("tune", "evaluate"):
        if stage not in stages(cfg):
            rows.append(_row(stage, "not needed", f"no method of evaluate.methods needs {stage}"))
            continue
        m = read_manifest(run, stage)
        if m is None:
            rows.append(_row(stage, "missing", "never completed"))
        elif version and m.input_hashes.get("fit") != version:
            rows.append(_row(stage, "stale", f"made with fit {m.input_hashes.get('fit')}, the fit is now {version}"))
        elif m.config_digest != _digest(cfg, stage):
            rows.append(_row(stage, "stale", "configuration changed since it ran"))
        else:
            rows.append(_row(stage, "done", f"{m.items_done} items, updated {m.updated}"))
    return rows


def _digest(cfg: Config, stage: str) -> str:
    return cfg.digest("tune", "allocation", "codecs") if stage == "tune" else cfg.digest("evaluate", "allocation",
                                                                                           "codecs")
