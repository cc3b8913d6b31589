"""COCO 2017 reader on pycocotools, validated on load.

Reads the official layout (instances JSON plus an optional person_keypoints JSON, whose
annotations are the same person instances with `keypoints` added) and the project's
synthetic layout (one JSON holding both, the keypoint category carrying `oks_sigmas`).
Every problem found in the files is raised as a `DatasetError` naming the file and field,
so a bad download fails at load time rather than deep inside an evaluation.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

REQUIRED_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
# Fields each entry needs for the indexing below; anything else is passed through untouched.
REQUIRED_ENTRY_FIELDS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id"),
    "categories": ("id", "name"),
}
# Fields the keypoint file adds to an instance annotation with the same id.
KEYPOINT_FIELDS = ("keypoints", "num_keypoints")
# Category fields the keypoint file adds to the instance category with the same id.
KEYPOINT_CATEGORY_FIELDS = ("keypoints", "skeleton", "oks_sigmas")


class DatasetError(ValueError):
    """The dataset files are missing, malformed or inconsistent."""


def _read_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in REQUIRED_TOP_LEVEL_KEYS:
        if key not in data:
            raise DatasetError(f"{path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}")
    for key, fields in REQUIRED_ENTRY_FIELDS.items():
        for index, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: {key}[{index}] must be an object")
            for field in fields:
                if field not in entry:
                    raise DatasetError(f"{path}: {key}[{index}] lacks field '{field}'")
    return data


def _check_references(path: Path, annotations: list[dict], image_ids: set, categories: dict[int, dict]) -> None:
    for index, ann in enumerate(annotations):
        where = f"{path}: annotations[{index}] (id {ann['id']})"
        if ann["category_id"] not in categories:
            raise DatasetError(f"{where} field 'category_id' = {ann['category_id']!r} is not a known category id")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where} field 'image_id' = {ann['image_id']!r} is not a known image id")
        if "keypoints" in ann:
            names = categories[ann["category_id"]].get("keypoints")
            expected = 3 * len(names) if isinstance(names, list) else 0
            if not isinstance(ann["keypoints"], list) or len(ann["keypoints"]) != expected:
                got = len(ann["keypoints"]) if isinstance(ann["keypoints"], list) else type(ann["keypoints"]).__name__
                raise DatasetError(
                    f"{where} field 'keypoints' has length {got}, expected {expected} "
                    f"(3 x {0 if expected == 0 else len(names)} keypoints of category {ann['category_id']})"
                )


def _quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO index over an in-memory dataset, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. PIL's own convert() clips 16-bit values instead of scaling."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG/TIFF open as I;16 or I): scale 0..65535 onto 0..255.
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    # CMYK, L, LA, P, RGBA, YCbCr ...: PIL converts these correctly.
    return img.convert("RGB") if img.mode != "RGB" else img


def read_rgb(path: str | Path, image_id: int | None = None, check_size=None) -> Image.Image:
    """An image file as 8-bit RGB; DatasetError names the file (and image id, when given) for
    a missing, unreadable or truncated one. `check_size(width, height)` runs on the header,
    before any pixel is decoded."""
    path = Path(path)
    which = f" (image id {image_id})" if image_id is not None else ""
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found{which}" +
                           (" (the path is a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: empty file (0 bytes){which}")
    try:
        with Image.open(path) as img:
            if check_size is not None:
                check_size(*img.size)
            img.load()  # decodes now, so truncated or corrupt data raises here
            return _to_rgb8(img)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        raise DatasetError(f"{path}: unreadable or truncated image{which}: {e}") from e


def image_to_tensor(img: Image.Image):
    """8-bit RGB image -> float (3, H, W) tensor in [0, 1], the task models' input."""
    import torch

    arr = np.asarray(_to_rgb8(img), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CocoDataset:
    """A COCO-format detection dataset: images on disk plus validated annotations."""

    def __init__(self, image_dir: str | Path, instances_json: str | Path, keypoints_json: str | Path | None = None):
        self.image_dir = Path(image_dir)
        self.instances_json = Path(instances_json)
        self.keypoints_json = Path(keypoints_json) if keypoints_json is not None else None
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image directory not found")

        instances = _read_coco_json(self.instances_json)
        categories = {c["id"]: dict(c) for c in instances["categories"]}
        images = {img["id"]: img for img in instances["images"]}
        _check_references(self.instances_json, instances["annotations"], set(images), categories)
        # Shallow copies: merging keypoints in must not touch the caller-visible JSON objects.
        annotations = {ann["id"]: dict(ann) for ann in instances["annotations"]}

        if self.keypoints_json is not None:
            self._merge_keypoints(_read_coco_json(self.keypoints_json), images, categories, annotations)

        for ann in annotations.values():
            # pycocotools' keypoint evaluation reads num_keypoints; derive it when a file omits it.
            if "keypoints" in ann and "num_keypoints" not in ann:
                ann["num_keypoints"] = int(sum(1 for v in ann["keypoints"][2::3] if v > 0))

        self._dataset = {
            "info": instances.get("info", {}),
            "licenses": instances.get("licenses", []),
            "images": list(images.values()),
            "annotations": list(annotations.values()),
            "categories": list(categories.values()),
        }
        self._coco = _quiet_coco(self._dataset)
        self._image_ids = sorted(images)

    def _merge_keypoints(self, keypoints: dict, images: dict, categories: dict, annotations: dict) -> None:
        path = self.keypoints_json
        kp_categories = {c["id"]: c for c in keypoints["categories"]}
        for index, cat in enumerate(keypoints["categories"]):
            if cat["id"] not in categories:
                raise DatasetError(
                    f"{path}: categories[{index}] field 'id' = {cat['id']!r} is not a category of {self.instances_json}"
                )
            for field in KEYPOINT_CATEGORY_FIELDS:
                if field in cat:
                    categories[cat["id"]][field] = cat[field]
        # Image ids are checked against the instances file: that is the image list we serve.
        _check_references(path, keypoints["annotations"], set(images), kp_categories)
        unknown = [ann["id"] for ann in keypoints["annotations"] if ann["id"] not in annotations]
        if unknown:
            raise DatasetError(
                f"{path}: {len(unknown)} annotation(s) field 'id' not found in {self.instances_json} "
                f"(first: {unknown[:5]}); the files do not belong together"
            )
        for ann in keypoints["annotations"]:
            target = annotations[ann["id"]]
            for field in KEYPOINT_FIELDS:
                if field in ann:
                    target[field] = ann[field]

    # -- queries ---------------------------------------------------------------------------

    @property
    def image_ids(self) -> list[int]:
        return list(self._image_ids)

    @property
    def categories(self) -> list[dict]:
        return copy.deepcopy(self._dataset["categories"])

    @property
    def keypoint_categories(self) -> list[dict]:
        return [c for c in self.categories if isinstance(c.get("keypoints"), list)]

    def __len__(self) -> int:
        return len(self._image_ids)

    def _require_image(self, image_id: int) -> None:
        if image_id not in self._coco.imgs:
            raise DatasetError(f"{self.instances_json}: image id {image_id!r} not in 'images'")

    def image_info(self, image_id: int) -> dict:
        self._require_image(image_id)
        return dict(self._coco.imgs[image_id])

    def annotations(self, image_id: int) -> list[dict]:
        """The image's instance annotations (keypoints merged in), as copies the caller may edit."""
        self._require_image(image_id)
        return copy.deepcopy(self._coco.imgToAnns[image_id])

    def select(self, count: int | None = None, ids=None, seed: int = 0) -> list[int]:
        """Image ids to work on: the given `ids`, a seeded random `count` of them, or all."""
        if count is not None and ids is not None:
            raise DatasetError("select: give either count or ids, not both")
        if ids is not None:
            ids = [int(i) for i in ids]
            missing = sorted(set(ids) - set(self._coco.imgs))
            if missing:
                raise DatasetError(f"{self.instances_json}: image id(s) {missing} not in 'images'")
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise DatasetError(f"select: duplicate image id(s) {duplicates}")
            return ids
        if count is None:
            return list(self._image_ids)
        if count < 0:
            raise DatasetError(f"select: count must be >= 0, got {count}")
        if count > len(self._image_ids):
            raise DatasetError(
                f"select: asked for {count} images but {self.instances_json} has only {len(self._image_ids)}"
            )
        # Drawn from the sorted id list, so the subset depends only on (ids, count, seed).
        chosen = np.random.default_rng(seed).choice(len(self._image_ids), size=count, replace=False)
        return sorted(self._image_ids[i] for i in chosen)

    def load_image(self, image_id: int) -> Image.Image:
        """The image as 8-bit RGB, pixels as stored (COCO annotations ignore EXIF orientation)."""
        info = self.image_info(image_id)
        path = self.image_dir / info["file_name"]
        rgb = read_rgb(path, image_id)
        expected = (info.get("width"), info.get("height"))
        if None not in expected and rgb.size != expected:
            raise DatasetError(
                f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but {self.instances_json} says "
                f"{expected[0]}x{expected[1]} (image id {image_id})"
            )
        return rgb

    def to_coco(self, image_ids=None) -> COCO:
        """A fresh pycocotools COCO over (a subset of) the merged annotations, for evaluation.

        A deep copy, because COCOeval rewrites ground-truth segmentations in place.
        """
        if image_ids is None:
            dataset = copy.deepcopy(self._dataset)
        else:
            keep = set(self.select(ids=image_ids))
            dataset = copy.deepcopy({
                **self._dataset,
                "images": [img for img in self._dataset["images"] if img["id"] in keep],
                "annotations": [a for a in self._dataset["annotations"] if a["image_id"] in keep],
            })
        return _quiet_coco(dataset)
