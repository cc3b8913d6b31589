"""Training of the demo task model on the synthetic train split, resumable from its last state.

Plain functions (no Prefect): the `train-task-model` flow wraps them, and a GPU machine can
call `train_demo_model` directly.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from storage.urls import atomic_torch_save, atomic_write_text
from tasks.datasets.coco import image_to_tensor
from tasks.datasets.synthetic import NUM_KEYPOINTS, SyntheticSpec, render
from tasks.divergence import DivergenceGuard
from tasks.models.demo import DemoModelSpec, build_demo_model, save_checkpoint


@dataclass
class TrainSpec:
    iterations: int = 6000
    batch_size: int = 16
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 300
    train_images: int = 20000
    checkpoint_every: int = 250
    workers: int = 2
    seed: int = 0


def polygons_to_mask(segmentation: list[list[float]], height: int, width: int) -> np.ndarray:
    m = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(m)
    for poly in segmentation:
        draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=1)
    return np.asarray(m, dtype=np.uint8)


def targets_from_annotations(anns: list[dict], height: int, width: int) -> dict:
    """torchvision R-CNN targets; objects of non-keypoint categories get invisible keypoints."""
    boxes, labels, masks, keypoints = [], [], [], []
    for a in anns:
        x, y, w, h = a["bbox"]
        if w < 1 or h < 1:
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(a["category_id"])
        masks.append(polygons_to_mask(a["segmentation"], height, width))
        kp = np.zeros((NUM_KEYPOINTS, 3), np.float32)
        if "keypoints" in a:
            kp = np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
        keypoints.append(kp)
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, height, width), dtype=torch.uint8),
        "keypoints": torch.from_numpy(np.stack(keypoints)) if n else torch.zeros((0, NUM_KEYPOINTS, 3)),
    }


class SyntheticTrainSet(torch.utils.data.Dataset):
    """The train split, rendered on the fly (same bytes as `write_split` puts on disk)."""

    def __init__(self, data_spec: SyntheticSpec, count: int):
        self.data_spec, self.count = data_spec, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        data, record, anns = render(self.data_spec, "train", index)
        img = Image.open(io.BytesIO(data))
        return image_to_tensor(img), targets_from_annotations(anns, record["height"], record["width"])


def _collate(batch):
    return tuple(zip(*batch))


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (0.001 + 0.999 * step / spec.warmup)
    t = (step - spec.warmup) / max(1, spec.iterations - spec.warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_demo_model(
    work_dir: str | Path,
    model_spec: DemoModelSpec,
    data_spec: SyntheticSpec,
    train_spec: TrainSpec,
    device: str = "cpu",
    time_budget_s: float | None = None,
    fit_schedule_to_budget: bool = False,
    init_checkpoint: str | Path | None = None,
    log=print,
) -> Path:
    """Train (or resume) and return the path of the float16 checkpoint written at the end.

    `work_dir/last.pt` holds the full state (float32 weights, optimiser, step) and is
    replaced atomically every `checkpoint_every` steps, so a killed run loses at most that.
    With a time budget, training stops early after saving; a later call resumes. With
    `fit_schedule_to_budget`, the step count is cut after 30 steps so that the learning-rate
    schedule ends inside the budget (the step count used is recorded in the checkpoint).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_spec.seed)
    model = build_demo_model(model_spec).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": train_spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_spec.lr, momentum=train_spec.momentum,
    )
    state_path = work_dir / "last.pt"
    step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log(f"resuming demo-model training at step {step}/{train_spec.iterations}")
    elif init_checkpoint:
        # Continue from an earlier run's weights with a fresh schedule (e.g. a second sitting).
        blob = torch.load(init_checkpoint, map_location=device, weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
        history = [{"init_from": str(init_checkpoint), "init_extra": blob.get("extra", {})}]
        log(f"initialised from {init_checkpoint}")

    dataset = SyntheticTrainSet(data_spec, train_spec.train_images)
    generator = torch.Generator().manual_seed(train_spec.seed + step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_spec.batch_size, shuffle=True, generator=generator,
        num_workers=train_spec.workers, collate_fn=_collate, drop_last=True,
        persistent_workers=train_spec.workers > 0,
    )

    def save_state():
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                      "history": history, "model_spec": model_spec.to_dict(),
                      "train_spec": train_spec.__dict__}, state_path)

    model.train()
    started = time.time()
    stop, t_step5 = False, started
    guard = DivergenceGuard("demo-model", log)
    while step < train_spec.iterations and not stop:
        for images, targets in loader:
            images = [i.to(device, non_blocking=True) for i in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, train_spec)
            losses = model(images, targets)
            loss = sum(losses.values())
            if not guard.finite(loss, losses, step):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            step += 1
            if fit_schedule_to_budget and time_budget_s and step == 30:
                rate = 25 / (time.time() - t_step5)
                fitted = int(step + rate * (time_budget_s - (time.time() - started)) * 0.97)
                if fitted < train_spec.iterations:
                    log(f"{rate:.2f} steps/s: schedule cut to {fitted} steps to fit {time_budget_s:.0f} s")
                    train_spec.iterations = fitted
            if step == 5:
                t_step5 = time.time()
            if step % 20 == 0 or step == 1:
                row = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                       "elapsed_s": round(time.time() - started, 1)}
                row.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
                history.append(row)
                log(json.dumps(row))
            if step % train_spec.checkpoint_every == 0:
                save_state()
            out_of_time = time_budget_s is not None and time.time() - started > time_budget_s
            if step >= train_spec.iterations or out_of_time:
                stop = out_of_time and step < train_spec.iterations
                break
    save_state()
    model.eval()
    final = work_dir / "demo_task_model.pt"
    save_checkpoint(model.cpu(), model_spec, final,
                    extra={"step": step, "iterations": train_spec.iterations, "complete": step >= train_spec.iterations,
                           "data_seed": data_spec.seed, "train_images": train_spec.train_images})
    atomic_write_text(work_dir / "history.json", json.dumps(history))
    return final


def main(argv=None) -> None:
    """Direct entry point for a GPU machine without Prefect: python -m tasks.models.training."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=TrainSpec.iterations)
    ap.add_argument("--batch-size", type=int, default=TrainSpec.batch_size)
    ap.add_argument("--lr", type=float, default=TrainSpec.lr)
    ap.add_argument("--workers", type=int, default=TrainSpec.workers)
    ap.add_argument("--train-images", type=int, default=TrainSpec.train_images)
    ap.add_argument("--time-budget-s", type=float, default=None)
    ap.add_argument("--fit-schedule-to-budget", action="store_true")
    ap.add_argument("--warmup", type=int, default=TrainSpec.warmup)
    ap.add_argument("--init-from", default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda":
        # No cudnn.benchmark: RoI head batch sizes change every step and would re-tune each time.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = TrainSpec(iterations=a.iterations, batch_size=a.batch_size, lr=a.lr, workers=a.workers,
                     train_images=a.train_images, warmup=a.warmup)
    path = train_demo_model(a.work_dir, DemoModelSpec(), SyntheticSpec(), spec, device=a.device,
                            time_budget_s=a.time_budget_s, fit_schedule_to_budget=a.fit_schedule_to_budget,
                            init_checkpoint=a.init_from)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
