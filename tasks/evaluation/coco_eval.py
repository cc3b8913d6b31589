"""COCO evaluation (bbox, segm, keypoints) on pycocotools, with image-level bootstrap.

pycocotools prints progress on stdout and crashes on a few edge cases (empty result lists,
keypoint evaluation over categories without keypoints); these wrappers silence the prints
and handle those cases, so callers get a plain dict of metrics.
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm", "keypoints")
# Names of COCOeval.stats entries, which differ between detection and keypoint evaluation.
STAT_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]
# Fields of one result per iou type, as in the official results format. Dropping the rest
# makes COCO.loadRes derive `area` the official way (mask area for segm, keypoint extent
# for keypoints) rather than from the box, which changes which small/large detections count.
RESULT_FIELDS = {
    "bbox": ("image_id", "category_id", "bbox", "score"),
    "segm": ("image_id", "category_id", "segmentation", "score"),
    "keypoints": ("image_id", "category_id", "keypoints", "score"),
}
MASK_THRESHOLD = 0.5


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(image_id: int, det: dict, keypoint_category_ids, score_threshold: float = 0.0) -> list[dict]:
    """COCO result dicts from one torchvision R-CNN output dict (boxes xyxy, labels, scores,
    optional masks Nx1xHxW probabilities and keypoints NxKx3).

    `keypoints_scores` is accepted but unused: COCO ranks keypoint results by `score`.
    """
    boxes = _numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
    labels = _numpy(det["labels"]).astype(np.int64).reshape(-1)
    scores = _numpy(det["scores"]).astype(np.float64).reshape(-1)
    keep = np.nonzero(scores >= score_threshold)[0]
    keypoint_category_ids = {int(c) for c in keypoint_category_ids}

    rles = None
    if det.get("masks") is not None and len(keep):
        masks = _numpy(det["masks"])[keep]
        masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]) > MASK_THRESHOLD
        # encode() wants one Fortran-ordered uint8 HxWxN array.
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON-serialisable
    keypoints = _numpy(det["keypoints"]).astype(np.float64) if det.get("keypoints") is not None else None

    results = []
    for position, i in enumerate(keep):
        x0, y0, x1, y1 = boxes[i].tolist()
        result = {
            "image_id": int(image_id),
            "category_id": int(labels[i]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(scores[i]),
        }
        if rles is not None:
            result["segmentation"] = rles[position]
        if keypoints is not None and int(labels[i]) in keypoint_category_ids:
            xy = keypoints[i][:, :2]
            # COCO ignores the predicted visibility; v=1 marks every keypoint as predicted.
            result["keypoints"] = np.concatenate([xy, np.ones((len(xy), 1))], axis=1).reshape(-1).tolist()
        results.append(result)
    return results


def _load_gt(gt) -> COCO:
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, dict):
        # Deep copy: COCOeval rewrites ground-truth segmentations and flags in place.
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        with _silenced():
            coco.createIndex()
        return coco
    if isinstance(gt, (str, Path)):
        path = Path(gt)
        if not path.is_file():
            raise FileNotFoundError(f"ground truth file not found: {path}")
        with _silenced():
            return COCO(str(path))
    raise TypeError(f"gt must be a COCO, a dict or a path, got {type(gt).__name__}")


def _keypoint_sigmas(keypoint_categories: list[dict], keypoint_sigmas) -> np.ndarray | None:
    """OKS sigmas: the explicit argument, else the categories' `oks_sigmas`, else None (COCO's 17)."""
    if keypoint_sigmas is not None:
        sigmas = np.asarray(keypoint_sigmas, dtype=np.float64)
    else:
        given = {tuple(c["oks_sigmas"]) for c in keypoint_categories if c.get("oks_sigmas") is not None}
        if len(given) > 1:
            raise ValueError("keypoint categories carry different 'oks_sigmas'; COCOeval takes one set")
        sigmas = np.asarray(given.pop(), dtype=np.float64) if given else None
    counts = {len(c["keypoints"]) for c in keypoint_categories}
    expected = len(sigmas) if sigmas is not None else 17  # pycocotools' default: COCO person
    if counts - {expected}:
        raise ValueError(
            f"keypoint categories have {sorted(counts)} keypoints but there are {expected} OKS sigmas; "
            "give keypoint_sigmas or an 'oks_sigmas' category field"
        )
    return sigmas


def _load_results(gt: COCO, results: list[dict], iou_type: str, category_ids: list[int]) -> COCO:
    fields = RESULT_FIELDS[iou_type]
    selected = [
        {k: r[k] for k in fields}  # copies: loadRes adds fields to the dicts it is given
        for r in results
        if fields[2] in r and r["category_id"] in category_ids
    ]
    unknown = sorted({r["image_id"] for r in selected} - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth: {unknown[:10]}")
    if selected:
        with _silenced():
            return gt.loadRes(selected)
    # loadRes indexes results[0], so it cannot load an empty list: build the empty set directly.
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                     "annotations": []}
    with _silenced():
        empty.createIndex()
    return empty


def make_cocoeval(gt, results: list[dict], iou_type: str, image_ids=None, keypoint_sigmas=None) -> COCOeval:
    """A COCOeval that has run evaluate(), accumulate() and summarize(), silently."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt = _load_gt(gt)
    category_ids = sorted(gt.getCatIds())
    sigmas = None
    if iou_type == "keypoints":
        # pycocotools reads num_keypoints of every GT of every evaluated category.
        keypoint_categories = [c for c in gt.loadCats(category_ids) if isinstance(c.get("keypoints"), list)]
        if not keypoint_categories:
            raise ValueError("keypoint evaluation needs a ground-truth category with a 'keypoints' list")
        category_ids = [c["id"] for c in keypoint_categories]
        sigmas = _keypoint_sigmas(keypoint_categories, keypoint_sigmas)
        lacking = [a["id"] for a in gt.loadAnns(gt.getAnnIds(catIds=category_ids)) if "num_keypoints" not in a]
        if lacking:
            raise ValueError(
                f"{len(lacking)} ground-truth annotations of keypoint categories lack 'num_keypoints' "
                f"(first ids {lacking[:5]}); load the person_keypoints file"
            )

    dt = _load_results(gt, results, iou_type, category_ids)
    cocoeval = COCOeval(gt, dt, iou_type)
    cocoeval.params.catIds = category_ids
    if sigmas is not None:
        cocoeval.params.kpt_oks_sigmas = sigmas
    if image_ids is not None:
        cocoeval.params.imgIds = sorted(int(i) for i in image_ids)
    with _silenced():
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return cocoeval


def stats_dict(cocoeval: COCOeval) -> dict[str, float]:
    """COCOeval.stats by name, with -1 (no ground truth in that area range) as NaN."""
    names = STAT_NAMES[cocoeval.params.iouType]
    return {name: (float("nan") if value == -1 else float(value)) for name, value in zip(names, cocoeval.stats)}


def evaluate(gt, results: list[dict], iou_type: str, image_ids=None, keypoint_sigmas=None) -> dict[str, float]:
    """COCO metrics ('AP', 'AP50', 'AP75', 'APs' (not for keypoints), 'APm', 'APl' and the ARs).

    `gt` is a COCO object, a dict in COCO format or a path to a COCO JSON.
    """
    return stats_dict(make_cocoeval(gt, results, iou_type, image_ids, keypoint_sigmas))


# -- bootstrap over images -----------------------------------------------------------------

def _area_index(cocoeval: COCOeval, area: str) -> int:
    labels = list(cocoeval.params.areaRngLbl)
    if area not in labels:
        raise ValueError(f"area must be one of {labels} for iou type {cocoeval.params.iouType!r}, got {area!r}")
    return labels.index(area)


def _check_evaluated(cocoeval: COCOeval) -> None:
    if not cocoeval.evalImgs or not hasattr(cocoeval, "_paramsEval"):
        raise ValueError("bootstrap needs a COCOeval on which evaluate() has run")


def _resampled_ap(cocoeval: COCOeval, area_index: int, image_indices: np.ndarray) -> float:
    """AP@[.5:.95] over the images at `image_indices` (repeats allowed), from the stored evalImgs.

    evalImgs is laid out [category][area range][image] over _paramsEval's lists. The copy
    keeps one area range and the largest maxDets (which evaluate() already truncated to)
    and renames the images 0..n-1 so that repeated images count once per draw.
    """
    source = cocoeval._paramsEval
    n_images, n_areas = len(source.imgIds), len(source.areaRng)
    n_categories = len(source.catIds) if source.useCats else 1
    evaluated = cocoeval.evalImgs
    images = [int(i) for i in image_indices]
    resampled = []
    for k in range(n_categories):
        start = k * n_areas * n_images + area_index * n_images
        resampled += [evaluated[start + i] for i in images]

    params = copy.copy(source)
    params.imgIds = list(range(len(images)))
    params.areaRng = [source.areaRng[area_index]]
    params.areaRngLbl = [source.areaRngLbl[area_index]]
    params.maxDets = [source.maxDets[-1]]
    params.catIds = list(source.catIds)

    view = copy.copy(cocoeval)  # shares the GT/DT indexes; only the fields accumulate() reads change
    view.params = params
    view._paramsEval = copy.copy(params)
    view.evalImgs = resampled
    with _silenced():
        view.accumulate()
    precision = view.eval["precision"][:, :, :, 0, 0]  # IoU x recall x category
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _bootstrap_indices(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))


def bootstrap_ap(cocoeval: COCOeval, n_boot: int = 200, seed: int = 0, area: str = "all") -> np.ndarray:
    """AP@[.5:.95] for each of `n_boot` resamples of the images (with replacement)."""
    _check_evaluated(cocoeval)
    area_index = _area_index(cocoeval, area)
    draws = _bootstrap_indices(len(cocoeval._paramsEval.imgIds), n_boot, seed)
    return np.array([_resampled_ap(cocoeval, area_index, draw) for draw in draws])


def paired_bootstrap_delta(ev_a: COCOeval, ev_b: COCOeval, n_boot: int = 200, seed: int = 0,
                           area: str = "all") -> np.ndarray:
    """AP_a - AP_b for each resample, both measured on the same resampled images."""
    _check_evaluated(ev_a)
    _check_evaluated(ev_b)
    if list(ev_a._paramsEval.imgIds) != list(ev_b._paramsEval.imgIds):
        raise ValueError("paired bootstrap needs both evaluations over the same image ids in the same order")
    if list(ev_a._paramsEval.catIds) != list(ev_b._paramsEval.catIds) or ev_a.params.iouType != ev_b.params.iouType:
        raise ValueError("paired bootstrap needs both evaluations of the same iou type and categories")
    area_a, area_b = _area_index(ev_a, area), _area_index(ev_b, area)
    draws = _bootstrap_indices(len(ev_a._paramsEval.imgIds), n_boot, seed)
    return np.array([
        _resampled_ap(ev_a, area_a, draw) - _resampled_ap(ev_b, area_b, draw) for draw in draws
    ])

