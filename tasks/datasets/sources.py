"""Datasets as the configuration names them: one `CocoDataset` per split, synthetic or COCO.

The synthetic splits are rendered to COCO format on disk first, so both sources go through
the same reader, selection and evaluation code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mfiba.config import Config
from tasks.datasets.coco import CocoDataset, DatasetError
from tasks.datasets.synthetic import SyntheticSpec, write_split


@dataclass(frozen=True)
class ImageRef:
    """What a worker needs to load one image: small and picklable."""

    split: str
    image_id: int
    path: str
    file_name: str
    size: tuple[int, int] | None = None  # (width, height) the annotations give
    max_pixels: int | None = None
    problem: str = ""  # known before reading (an id the annotations lack): skipped with this reason

    def check_size(self, width: int, height: int) -> None:
        """Refuse an image the annotations cannot describe, or one too large to decode safely."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise DatasetError(f"{self.path}: image is {width}x{height} = {width * height} pixels, over "
                               f"data.max_image_pixels = {self.max_pixels} (image id {self.image_id})")
        if self.size is not None and (width, height) != tuple(self.size):
            raise DatasetError(f"{self.path}: image is {width}x{height} but the annotations say "
                               f"{self.size[0]}x{self.size[1]} (image id {self.image_id})")


def synthetic_spec(cfg: Config) -> SyntheticSpec:
    return SyntheticSpec(image_size=cfg.data.image_size, seed=cfg.data.seed)


def ensure_synthetic_split(cfg: Config, split: str, progress=None) -> Path:
    """Render the split unless its JSON (written last) is there for this many images."""
    root = cfg.resolve_path(cfg.data.root)
    ann = root / f"{split}.json"
    if ann.exists():
        ds = CocoDataset(root / split, ann)
        if len(ds) == cfg.data.count(split):
            return ann
    return write_split(synthetic_spec(cfg), split, cfg.data.count(split), root, progress=progress)


def open_split(cfg: Config, split: str, progress=None) -> CocoDataset:
    if cfg.data.source == "synthetic":
        ann = ensure_synthetic_split(cfg, split, progress)
        return CocoDataset(ann.parent / split, ann)
    try:
        images = cfg.data.coco_images[split]
        instances = cfg.data.coco_instances[split]
    except KeyError as e:
        raise DatasetError(f"data.coco_images / data.coco_instances: no entry for split {split!r}") from e
    keypoints = cfg.data.coco_keypoints.get(split)
    return CocoDataset(cfg.resolve_path(images), cfg.resolve_path(instances),
                       cfg.resolve_path(keypoints) if keypoints else None)


def select_split(cfg: Config, split: str, dataset: CocoDataset, exclude: set[int] = frozenset(),
                 skip: set[int] = frozenset()) -> list[int]:
    """The split's image ids: explicit ids, else a seeded subset by count.

    `exclude` keeps splits drawn from the same COCO set (train and calib both come from
    train2017) apart: calibration images are never feature-dataset images.
    """
    ids = cfg.data.image_ids.get(split)
    if ids:
        return dataset.select(ids=[i for i in ids if i not in skip])
    count = cfg.data.count(split)
    if cfg.data.source == "synthetic":
        return sorted(dataset.image_ids)[:count]
    pool = [i for i in dataset.image_ids if i not in exclude]
    if count > len(pool):
        raise DatasetError(f"data.{split}_count={count} but only {len(pool)} images are available for split {split!r}")
    import numpy as np

    rng = np.random.default_rng([cfg.data.seed, ("train", "calib", "test").index(split)])
    return sorted(int(i) for i in rng.choice(pool, size=count, replace=False))


def _ref(split: str, ds: CocoDataset, image_id: int, max_pixels: int) -> ImageRef:
    info = ds.image_info(image_id)
    size = (int(info["width"]), int(info["height"])) if "width" in info and "height" in info else None
    return ImageRef(split, image_id, str(ds.image_dir / info["file_name"]), info["file_name"], size, max_pixels)


def image_refs(cfg: Config, splits: list[str], progress=None) -> dict[str, list[ImageRef]]:
    """All selected images per split, with calibration disjoint from train (checked)."""
    out: dict[str, list[ImageRef]] = {}
    chosen: dict[str, set[int]] = {}
    for split in ("train", "calib", "test"):
        # Calibration images drawn from train2017 must avoid the feature-dataset images, so the
        # train split is opened for calib even when not selected (when one is configured).
        needed_for_calib = (split == "train" and "calib" in splits and cfg.data.source == "coco"
                            and "train" in cfg.data.coco_images and not cfg.data.image_ids.get("calib"))
        if split not in splits and not needed_for_calib:
            continue
        ds = open_split(cfg, split, progress)
        exclude = chosen.get("train", set()) if split == "calib" else set()
        # Explicitly listed ids the annotations lack are skipped with that reason, not fatal:
        # the run goes on with the others and reports them.
        known = set(ds.image_ids)
        unknown = [i for i in cfg.data.image_ids.get(split, []) if i not in known]
        ids = select_split(cfg, split, ds, exclude, skip=set(unknown))
        chosen[split] = set(ids)
        if split in splits:
            out[split] = [_ref(split, ds, i, cfg.data.max_image_pixels) for i in ids] + [
                ImageRef(split, i, "", "", problem=f"{ds.instances_json}: image id {i} not in 'images' "
                                                  f"(listed in data.image_ids.{split})") for i in unknown]
    # The feature store is keyed by image id, and calibration must be held out: no image
    # may belong to two splits.
    names = sorted(chosen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = chosen[a] & chosen[b]
            if both:
                raise DatasetError(f"splits {a!r} and {b!r} share {len(both)} image ids (e.g. {sorted(both)[:5]}); "
                                   "splits must be disjoint (calibration and test images are held out)")
    return out
