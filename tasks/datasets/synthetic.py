"""Deterministic synthetic detection data in COCO format: the offline default.

Made to be a fair testbed for bit allocation (see ../shared/STACK.md): objects are told
apart by fine texture (stripes vs dots vs checks at a few pixels' period), sit on cluttered,
textured backgrounds at low contrast, and come in COCO's three size classes in comparable
numbers, so that distorting a fine scale hurts small objects and a coarse scale large ones.

Every image is a pure function of (seed, split, index), so splits can be rendered in any
order, in parallel, or on the fly during training, and always give the same bytes.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storage.urls import atomic_write_bytes, atomic_write_text

SPLIT_IDS = {"train": 1, "calib": 2, "test": 3}

# (name, outline, texture). The texture carries the identity; outlines repeat on purpose.
CATEGORIES = [
    ("disc-stripes", "disc", "stripes"),
    ("disc-dots", "disc", "dots"),
    ("square-stripes", "square", "stripes"),
    ("square-checks", "square", "checks"),
    ("triangle-dots", "triangle", "dots"),
    ("cross", "cross", "plain"),
]
KEYPOINT_CATEGORY = "cross"
KEYPOINT_NAMES = ["center", "arm_a", "arm_b", "arm_c", "arm_d"]
# 1-based COCO skeleton: center to each arm tip.
KEYPOINT_SKELETON = [[1, 2], [1, 3], [1, 4], [1, 5]]
# OKS sigmas (pycocotools otherwise assumes COCO's 17 person sigmas). The centre is
# well defined, the tips a little less.
KEYPOINT_SIGMAS = [0.05, 0.07, 0.07, 0.07, 0.07]
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# Object side ranges in pixels per COCO size class at 256 px (area thresholds 32^2, 96^2).
SIZE_BANDS = {"small": (10, 30), "medium": (38, 88), "large": (112, 168)}


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 256
    seed: int = 2024
    jpeg_quality: int = 92
    objects_per_size: tuple[float, float, float] = (2.5, 2.0, 1.3)  # mean counts small, medium, large
    noise_sigma: float = 6.0


def categories_json() -> list[dict]:
    cats = []
    for i, (name, outline, texture) in enumerate(CATEGORIES, start=1):
        cat = {"id": i, "name": name, "supercategory": outline}
        if name == KEYPOINT_CATEGORY:
            cat.update(keypoints=KEYPOINT_NAMES, skeleton=KEYPOINT_SKELETON, oks_sigmas=KEYPOINT_SIGMAS)
        cats.append(cat)
    return cats


def image_id(split: str, index: int) -> int:
    return SPLIT_IDS[split] * 10_000_000 + index


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells, 3)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(70, 180, size=3).astype(np.float32)
    low = (_smooth_field(rng, size, 4) - 127.5) * 0.5
    mid = (_smooth_field(rng, size, 16) - 127.5) * 0.25
    bg = base + low + mid
    # Clutter: random strokes and blobs with object-like textures, so texture alone is
    # not enough: the outline matters too.
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in np.clip(base + rng.normal(0, 35, 3), 0, 255))
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.normal(0, size / 4), y0 + rng.normal(0, size / 4)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(3, 14)
            draw.ellipse([x0 - r, y0 - r * rng.uniform(0.3, 1), x0 + r, y0 + r], fill=colour)
    return np.asarray(canvas, dtype=np.float32)


def _outline(kind: str, cx: float, cy: float, side: float, angle: float) -> np.ndarray:
    """Polygon vertices (N, 2) of an outline of the given side length, rotated by angle."""
    h = side / 2
    if kind == "disc":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * h
    elif kind == "square":
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]]) * 0.9
    elif kind == "triangle":
        t = np.array([-90, 30, 150]) * np.pi / 180
        pts = np.stack([np.cos(t), np.sin(t)], 1) * h
    elif kind == "cross":
        # One long arm (arm_a) breaks the four-fold symmetry, so keypoints are well defined.
        a, b, w = h, h * 0.7, h * 0.3
        pts = np.array([[-w, -a], [w, -a], [w, -w], [b, -w], [b, w], [w, w],
                        [w, b], [-w, b], [-w, w], [-b, w], [-b, -w], [-w, -w]])
    else:
        raise ValueError(f"unknown outline {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _cross_keypoints(cx: float, cy: float, side: float, angle: float) -> np.ndarray:
    a, b = side / 2 * 0.95, side / 2 * 0.65
    local = np.array([[0, 0], [0, -a], [b, 0], [0, b], [-b, 0]])
    c, s = math.cos(angle), math.sin(angle)
    return local @ np.array([[c, -s], [s, c]]).T + np.array([cx, cy])


def _texture(kind: str, size: int, angle: float, period: float, phase: np.ndarray) -> np.ndarray:
    """Pattern in [0, 1] over the full image grid, in the object's own rotated frame."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = (xx * c + yy * s) / period + phase[0]
    v = (-xx * s + yy * c) / period + phase[1]
    if kind == "stripes":
        return (np.floor(u) % 2).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return ((du * du + dv * dv) < 0.09).astype(np.float32)
    return np.zeros((size, size), np.float32)


def _polygon_mask(poly: np.ndarray, size: int) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in poly], fill=1)
    return np.asarray(m, dtype=bool)


def render(spec: SyntheticSpec, split: str, index: int) -> tuple[bytes, dict, list[dict]]:
    """One image as JPEG bytes, its COCO image record and its annotation records."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    size = spec.image_size
    rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], index])
    img = _background(rng, size)
    scale = size / 256.0
    occupied = np.zeros((size, size), bool)
    anns: list[dict] = []
    plan = []
    for band, mean_count in zip(("large", "medium", "small"), spec.objects_per_size[::-1]):
        # Large objects fill the frame, so their count is capped at two.
        n = int(rng.poisson(mean_count)) if band != "large" else int(min(2, rng.poisson(mean_count)))
        plan += [band] * n
    iid = image_id(split, index)
    for band in plan:
        cat_index = int(rng.integers(len(CATEGORIES)))
        name, outline, texture = CATEGORIES[cat_index]
        lo, hi = SIZE_BANDS[band]
        side = rng.uniform(lo, hi) * scale
        angle = rng.uniform(0, 2 * np.pi)
        for _attempt in range(12):
            margin = side * 0.55
            cx, cy = rng.uniform(margin, size - margin, 2)
            poly = _outline(outline, cx, cy, side, angle)
            mask = _polygon_mask(poly, size)
            if mask.sum() >= 16 and (mask & occupied).sum() < 0.05 * mask.sum():
                break
        else:
            continue
        occupied |= mask
        # Low contrast: the object colour is near the local background.
        local = img[mask].mean(0)
        sign = np.where(rng.random(3) < 0.5, -1.0, 1.0)
        fg = np.clip(local + sign * rng.uniform(18, 55, 3), 0, 255)
        alt = np.clip(fg + rng.choice([-1.0, 1.0]) * rng.uniform(35, 70, 3), 0, 255)
        period = rng.uniform(2.5, 4.5) * scale
        pattern = _texture(texture, size, angle, period, rng.random(2))
        obj = fg[None, None, :] * (1 - pattern[..., None]) + alt[None, None, :] * pattern[..., None]
        img = np.where(mask[..., None], obj, img)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        ann = {
            "id": iid * 100 + len(anns) + 1,
            "image_id": iid,
            "category_id": cat_index + 1,
            "segmentation": [np.round(poly, 2).reshape(-1).tolist()],
            "area": float(mask.sum()),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "iscrowd": 0,
        }
        if name == KEYPOINT_CATEGORY:
            kps = _cross_keypoints(cx, cy, side, angle)
            flat = []
            for x, y in kps:
                flat += [round(float(x), 2), round(float(y), 2), 2]
            ann.update(keypoints=flat, num_keypoints=NUM_KEYPOINTS)
        anns.append(ann)
    img = img + rng.normal(0, spec.noise_sigma, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=spec.jpeg_quality)
    record = {"id": iid, "file_name": f"{split}_{index:06d}.jpg", "width": size, "height": size}
    return buf.getvalue(), record, anns


def write_split(spec: SyntheticSpec, split: str, count: int, root: str | Path, progress=None) -> Path:
    """Render `count` images of a split into root/<split>/ with a COCO JSON beside them.

    Resumable: images already on disk with the right bytes are kept; the JSON is written
    last, through a temporary name, so a present JSON means a complete split.
    """
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_path = root / f"{split}.json"
    images, annotations = [], []
    for index in range(count):
        data, record, anns = render(spec, split, index)
        path = image_dir / record["file_name"]
        if not path.exists() or path.stat().st_size != len(data):
            atomic_write_bytes(path, data)
        images.append(record)
        annotations += anns
        if progress is not None:
            progress(index + 1, count)
    coco = {
        "info": {"description": f"mfiba synthetic {split} split", "seed": spec.seed,
                 "image_size": spec.image_size},
        "images": images,
        "annotations": annotations,
        "categories": categories_json(),
    }
    atomic_write_text(ann_path, json.dumps(coco))
    return ann_path
