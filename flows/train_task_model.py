"""`mfiba train-task-model`: train (or resume) the demo multi-task model, then measure it.

Writes, beside the checkpoint: metrics.json (pycocotools AP on the synthetic test split for
bbox, segm and keypoints) and sensitivity.csv (AP by object size with each scale distorted
in turn), the files committed with the demo checkpoint.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task

from flows.common import holds_output_locks
from mfiba.config import Config
from storage.manifest import code_version, file_sha256
from tasks.datasets.sources import open_split, synthetic_spec
from tasks.evaluation.task_accuracy import evaluate_model, load_images
from tasks.models.demo import DemoModelSpec
from tasks.models.registry import build_task_model
from tasks.models.sensitivity import costliest_scale_by_area, sensitivity_table
from tasks.models.training import TrainSpec, train_demo_model
from tasks.device import resolve_device


@task(name="train-demo-model")
def train_task(cfg_dict: dict, time_budget_s: float | None, init_from: str | None) -> str:
    cfg = Config(**cfg_dict)
    t = cfg.train_task_model
    spec = TrainSpec(iterations=t.iterations, batch_size=t.batch_size, lr=t.lr, train_images=t.train_images,
                     checkpoint_every=t.checkpoint_every, workers=t.loader_workers, seed=cfg.seed)
    device = resolve_device(cfg.device)
    logger = get_run_logger()
    path = train_demo_model(cfg.resolve_path(t.work_dir), DemoModelSpec(image_size=cfg.data.image_size),
                            synthetic_spec(cfg), spec, device=device, time_budget_s=time_budget_s,
                            init_checkpoint=init_from, log=logger.info)
    return str(path)


@task(name="evaluate-demo-model")
def evaluate_task(cfg_dict: dict, checkpoint: str, out_dir: str, sensitivity_images: int) -> dict:
    cfg = Config(**cfg_dict)
    logger = get_run_logger()
    # The test split here may be larger than the preset's, for tighter sensitivity intervals.
    cfg.data.test_count = max(cfg.data.test_count, sensitivity_images)
    test = open_split(cfg, "test")
    ids = sorted(test.image_ids)[:cfg.data.test_count]
    model = build_task_model("demo-multitask", checkpoint)
    metrics = evaluate_model(model, test, ids)
    logger.info("test AP: " + ", ".join(f"{k} {v['AP']:.3f}" for k, v in metrics.items()))
    images = load_images(test, ids)
    table = sensitivity_table(model, images, ids, test.to_coco(ids), steps=(1.0, 3.0),
                              progress=logger.info)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sensitivity.csv", index=False, float_format="%.4f")
    costliest = costliest_scale_by_area(table).to_dict(orient="records")
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    report = {
        "checkpoint": Path(checkpoint).name, "checkpoint_sha256": file_sha256(checkpoint),
        "training": blob.get("extra", {}), "test_split": {"images": len(ids), "seed": cfg.data.seed,
                                                          "image_size": cfg.data.image_size},
        "metrics": metrics, "costliest_scale_at_3_std_bbox": costliest,
        "code_version": code_version(), "torch": torch.__version__, "machine": platform.platform(),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    return {"metrics": metrics, "costliest_scale_at_3_std_bbox": costliest, "out": str(out)}


@flow(name="train-task-model", flow_run_name="train-task-model-{preset}")
def train_task_model_flow(config: dict, preset: str = "demo", time_budget_s: float | None = None,
                          init_from: str | None = None, evaluate_only: str | None = None,
                          out: str | None = None, sensitivity_images: int = 400) -> dict:
    cfg = Config(**config)
    if cfg.task_model.name != "demo-multitask":
        raise ValueError(f"task_model.name={cfg.task_model.name!r}: only the demo model is trained here "
                         "(torchvision models use their COCO weights)")
    checkpoint = evaluate_only or train_task(config, time_budget_s, init_from)
    out_dir = out or str(Path(checkpoint).parent)
    return evaluate_task(config, checkpoint, out_dir, sensitivity_images)


@holds_output_locks("train-task-model")
def run_train_task_model(cfg: Config, **kw) -> dict:
    return train_task_model_flow(cfg.model_dump(mode="json"), cfg.preset, **kw)
