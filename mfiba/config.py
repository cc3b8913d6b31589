"""One typed configuration for every stage, loaded from a named preset and CLI overrides.

Presets live as YAML in `mfiba/presets/`. Overrides are dotted paths (`data.test_count=50`);
a wrong field or value is refused before any work starts, with the field and the allowed
values in the message.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

PRESET_DIR = Path(__file__).parent / "presets"
REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "calib", "test")


class ConfigError(ValueError):
    """A configuration problem, worded for the user (field, value, what is allowed)."""


class FieldProblems(ValueError):
    """Raised by a validator for values below (or beside) the validated field: each problem
    is (path, value, reason), the path relative to the field the validator runs on (".phis[3]")
    or, for the whole configuration, absolute ("tune.rate_points[2]"). `_format_error`
    prints one line per problem: "codecs.main.phis[3] = 140: avif quality must be in 0..100"."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{p} = {_show(v)}: {r}" for p, v, r in self.problems))


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: Literal["synthetic", "coco"] = "synthetic"
    # synthetic: where the splits are rendered; coco: unused.
    root: str = "runs/data/synthetic"
    image_size: int = Field(256, ge=64, le=2048)
    # COCO: one image folder and annotation files per split (val2017 for test, train2017 otherwise).
    coco_images: dict[str, str] = Field(default_factory=dict)
    coco_instances: dict[str, str] = Field(default_factory=dict)
    coco_keypoints: dict[str, str] = Field(default_factory=dict)
    train_count: int = Field(300, ge=0)
    calib_count: int = Field(60, ge=0)
    test_count: int = Field(120, ge=0)
    # Explicit image ids per split override the seeded random selection by count.
    image_ids: dict[str, list[int]] = Field(default_factory=dict)
    seed: int = 2024
    # Larger images are skipped with their reason, read from the header before decoding (a
    # decompression bomb or a mislabelled scan must not take a worker's memory).
    max_image_pixels: int = Field(50_000_000, ge=1)

    @field_validator("coco_images", "coco_instances", "coco_keypoints", "image_ids")
    @classmethod
    def _known_splits(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split(s) {bad}; allowed: {list(SPLITS)}")
        return v

    def count(self, split: str) -> int:
        return {"train": self.train_count, "calib": self.calib_count, "test": self.test_count}[split]


class TaskModelConfig(_Strict):
    name: Literal["demo-multitask", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"] = "demo-multitask"
    # demo: the committed checkpoint; torchvision: an explicit weights file (else TORCH_HOME's cache).
    checkpoint: str | None = "assets/demo-task-model/demo_task_model.pt"
    allow_random_weights: bool = False


class TrainTaskModelConfig(_Strict):
    iterations: int = Field(6000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.04, gt=0)
    train_images: int = Field(20000, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    loader_workers: int = Field(2, ge=0)
    work_dir: str = "runs/train-task-model"


class FeaturesConfig(_Strict):
    store: str = "runs/demo/features.zarr"
    splits: list[Literal["train", "calib", "test"]] = Field(default_factory=lambda: list(SPLITS))
    batch_size: int = Field(8, ge=1)
    # Bounded memory: at most this many batches in flight per Dask worker, whatever the
    # image count.
    max_in_flight: int = Field(4, ge=1)


# The registered codecs (tasks.codecs.base.available_codecs(); importing the registry pulls in
# torch, which configuration loading avoids, so the names are listed here and
# tests/test_config.py checks the two lists agree).
CODEC_NAMES = ("bmshj2018-hyperprior", "mbt2018-mean", "elic", "elic-chandelier", "mean-scale-vbr",
               "lic-tcm", "avif", "jpegxl", "external")
# What each codec accepts as phi (checked against the codec classes by tests/test_config.py):
# learned codecs: their training lambdas (> 0; LearnedCodec refuses others); AVIF and JPEG XL:
# quality 0..100; external: its options.codec.phi_range (default 0..51, the QP range).
LEARNED_CODEC_NAMES = ("bmshj2018-hyperprior", "mbt2018-mean", "elic", "elic-chandelier", "mean-scale-vbr",
                       "lic-tcm")
QUALITY_RANGES = {"avif": (0.0, 100.0), "jpegxl": (0.0, 100.0)}
EXTERNAL_PHI_RANGE = (0.0, 51.0)


def _phi_problem(name: str, phi: float, options: dict) -> str | None:
    """Why `phi` is not a rate setting codec `name` accepts (None if it is)."""
    if name in LEARNED_CODEC_NAMES:
        return None if phi > 0 else f"{name} phis are training lambdas and must be > 0"
    if name in QUALITY_RANGES:
        low, high = QUALITY_RANGES[name]
        return None if low <= phi <= high else f"{name} quality must be in {low:g}..{high:g}"
    if name == "external":
        codec_options = options.get("codec", {}) if isinstance(options, dict) else {}
        rng = codec_options.get("phi_range", EXTERNAL_PHI_RANGE) if isinstance(codec_options, dict) else None
        try:
            low, high = (float(v) for v in rng)
        except (TypeError, ValueError):
            return None  # a malformed phi_range is the codec's to refuse, with its own message
        return None if low <= phi <= high else \
            f"the external codec's phi must be in its phi_range {low:g}..{high:g} (options.codec.phi_range)"
    return None


class CodecSpec(_Strict):
    """One feature codec: its registered architecture and where its weights are."""

    name: Literal[CODEC_NAMES] = "bmshj2018-hyperprior"
    checkpoint: str | None = None
    # Architecture sizes of learned codecs (compressai's N and M).
    N: int | None = Field(None, ge=8)
    M: int | None = Field(None, ge=8)
    # Rate points: the training Lagrange multipliers (fixed-rate families) or the phi range
    # sampled for variable-rate models; quality settings for classical codecs.
    phis: list[float] = Field(default_factory=list)
    # What the codec was trained on: "features" (retrained) or "rgb" (natural-image stand-in).
    trained_on: Literal["features", "rgb", "none"] = "features"
    # options: "arch" (constructor kwargs, e.g. ELIC groups), "train" (training overrides),
    # "codec" (codec kwargs, e.g. AVIF bit_depth or the external commands), "norm_mode".
    options: dict = Field(default_factory=dict)

    @field_validator("phis")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        bad = [(f"[{i}]", x, "rate settings must be finite and >= 0") for i, x in enumerate(v)
               if not (math.isfinite(x) and x >= 0)]
        if bad:
            raise FieldProblems(bad)
        return v

    @field_validator("phis")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        # Rate points are listed from the lowest rate up (RD curves and BD-rate rely on it).
        if sorted(v) != v or len(set(v)) != len(v):
            raise ValueError(f"rate settings must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _phis_in_codec_range(self) -> "CodecSpec":
        bad = [(f".phis[{i}]", phi, why) for i, phi in enumerate(self.phis)
               if (why := _phi_problem(self.name, phi, self.options))]
        if bad:
            raise FieldProblems(bad)
        return self


class CodecsConfig(_Strict):
    # Codecs by role; the allocation stages use `main`, reports compare the others.
    main: CodecSpec = Field(default_factory=CodecSpec)
    others: dict[str, CodecSpec] = Field(default_factory=dict)
    # 'pool' coded as the paper does, or derived at the decoder from decoded '3' for 0 bits.
    pool_mode: Literal["coded", "derived"] = "coded"


class TrainCodecConfig(_Strict):
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(8, ge=1)
    patch_size: int = Field(128, ge=64, multiple_of=64)
    lr: float = Field(1e-4, gt=0)
    aux_lr: float = Field(1e-3, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    work_dir: str = "runs/train-codec"
    # The split of the feature store the mosaics come from (the paper: 40,000 train images).
    split: Literal["train", "calib", "test"] = "train"
    # Feature crops drawn uniformly over mosaic pixels ("area", as coded images spend their
    # bits) or one item per (image, scale) ("mosaic"). RGB families ignore it.
    sampling: Literal["area", "mosaic"] = "area"


TASKS = ("bbox", "segm", "keypoints")


class PrecodeConfig(_Strict):
    """Multi-pass precoding (MFIP's input), offline: real and estimated bits per scale, task
    losses against the lossless output, and the ground-truth oracle beside them."""

    # Which splits to precode: calib feeds the fits, tuning and baselines; test only for
    # analysis (online evaluation computes its own weights).
    splits: list[Literal["train", "calib", "test"]] = Field(default_factory=lambda: ["calib"])
    # Tasks whose losses are measured (each gets its own weights); empty: all the task model's.
    tasks: list[Literal[TASKS]] = Field(default_factory=list)
    # Images per Dask task; each task codes one quality of its images.
    batch_size: int = Field(4, ge=1)
    max_in_flight: int = Field(4, ge=1)
    # Also store the per-image mAP drop against the real annotations (labelled oracle).
    oracle: bool = True


class FitConfig(_Strict):
    """Offline model fitting on the calibration split only."""

    split: Literal["calib"] = "calib"
    # MFIP normalisation per quality: "sum" (with floor) or the authors' "minmax".
    importance_mode: Literal["sum", "minmax"] = "sum"
    importance_floor: float = Field(0.01, ge=0, lt=1)
    # Loss-rate fits use this loss: the encoder-side one (vs lossless output) or the oracle.
    loss_source: Literal["loss", "oracle"] = "loss"


class AllocationConfig(_Strict):
    """How weights become per-scale rates (Eq. 3-6)."""

    # Per-scale divisors of lambda': the paper's 4^i or the authors' code's 1, 4, 16, 60, 60.
    divisors: Literal["paper", "authors"] = "paper"
    # The Cauchy loss-rate model: one pooled (alpha, beta) for all scales (Eq. 3) or one per scale.
    loss_rate_model: Literal["pooled", "per-scale"] = "pooled"
    # phi <-> rate: the paper's line R = a phi + b, or piecewise-linear through the measured
    # calibration means (for codecs whose rate is far from linear in phi, e.g. AVIF quality).
    rate_phi_mode: Literal["linear", "interpolated"] = "linear"


class TuneConfig(_Strict):
    """Calibration-split searches: finetuned MFIBA's line search, SABA sensitivities, lambda'."""

    task: Literal[TASKS] = "bbox"
    metric: Literal["AP", "AP75"] = "AP"
    # Calibration images used (the first N of the split; never test images).
    images: int = Field(16, ge=4)
    # Rate points (indices into codecs.main.phis) of the uniform anchor; the lambda' grid of
    # the allocating methods matches their mean bits. BD-rate needs at least 4.
    rate_points: list[int] = Field(default_factory=lambda: [1, 3, 5, 7], min_length=2)
    step: float = Field(0.01, gt=0, le=0.2)
    max_evaluations: int = Field(16, ge=1)
    saba_images: int = Field(8, ge=1)
    saba_quality: int = Field(2, ge=0)


METHODS = ("uniform", "mfiba", "mfiba-finetuned", "static", "saba", "oracle")
# `load_config(stages=...)` names: the CLI commands; these two run every stage.
PIPELINE_COMMANDS = ("run", "pipeline")


class EvaluateConfig(_Strict):
    """The online evaluation on test images: real bitstreams, decoded alone, COCO metrics."""

    # Test images (the first N of the split); 0: all of them.
    images: int = Field(32, ge=0)
    methods: list[Literal[METHODS]] = Field(default_factory=lambda: list(METHODS))
    # Tasks whose weights drive an allocation (each allocating method runs once per task).
    tasks: list[Literal[TASKS]] = Field(default_factory=lambda: ["bbox"])
    # Tasks scored with COCOeval on the decoded features (empty: every task of the model);
    # the heads run only the branches these need.
    score_tasks: list[Literal[TASKS]] = Field(default_factory=list)
    # Labels of codecs.others coded with one setting for every scale, as extra anchors
    # (the natural-image codec, classical codecs); their phis at the same indices as tune.rate_points.
    anchors: list[str] = Field(default_factory=list)
    # The anchor every BD-rate is measured against (same pool mode); the natural-image codec's
    # uniform line ("uniform-<label>") as well when it is among the anchors.
    natural_image_anchor: str | None = None
    pool_modes: list[Literal["coded", "derived"]] = Field(default_factory=lambda: ["coded"])
    # "lambda": one lambda' per rate point shared by all images (the paper's RD curves);
    # "budget": each image meets its own bit budget (the uniform anchor's predicted bits).
    rate_mode: Literal["lambda", "budget"] = "lambda"
    bootstrap: int = Field(100, ge=0)


class DaskConfig(_Strict):
    scheduler_address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "6GiB"
    # GPU work is tagged with this Dask resource; only workers that declare it take it.
    gpu_resource: str = "GPU"
    # When to tag: "auto" when this process sees a GPU; "always" for a cluster whose GPUs are
    # on the workers only (the flow runs on a CPU head node; workers pick their own device).
    gpu_tagging: Literal["auto", "always", "never"] = "auto"


class Config(_Strict):
    preset: str = "demo"
    description: str = ""
    # A smoke test (`mfiba run --smoke`): tiny, labelled in every report, numbers meaningless.
    smoke: bool = False
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    run_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    task_model: TaskModelConfig = Field(default_factory=TaskModelConfig)
    train_task_model: TrainTaskModelConfig = Field(default_factory=TrainTaskModelConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    codecs: CodecsConfig = Field(default_factory=CodecsConfig)
    train_codec: TrainCodecConfig = Field(default_factory=TrainCodecConfig)
    precode: PrecodeConfig = Field(default_factory=PrecodeConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @model_validator(mode="after")
    def _coco_paths(self) -> "Config":
        if self.data.source == "coco":
            missing = [s for s in self.features.splits if s not in self.data.coco_images]
            if missing:
                raise ValueError(f"data.coco_images has no folder for split(s) {missing}")
        return self

    @model_validator(mode="after")
    def _consistent_references(self, info: ValidationInfo) -> "Config":
        """Fields that point into other fields and that only the tune and evaluate stages use
        (tune.rate_points, tune.saba_quality, evaluate.anchors): checked by `load_config`
        before any work starts (a pipeline would otherwise meet them at its tune or evaluate
        stage, hours in). `load_config(stages=...)` limits the check to the stages about to
        run, so e.g. a precode or train-codec run with a single phi is not refused for rate
        points it never uses; a Config rebuilt from an already loaded dict (the flows'
        `Config(**config)`, no validation context) is not checked again."""
        context = info.context if isinstance(info.context, dict) else None
        if context is None or "stages" not in context:
            return self
        stages = context["stages"]  # None: every stage
        uses = (lambda *names: True) if stages is None else (lambda *names: bool(set(names) & set(stages)))
        problems = []
        phis = self.codecs.main.phis
        n = len(phis)
        if n and uses("tune", "evaluate", *PIPELINE_COMMANDS):
            # (empty phis: build_codec_from_spec refuses them when a stage needs the codec)
            allowed = f"an index into codecs.main.phis, which has {n} entr{'y' if n == 1 else 'ies'} (0..{n - 1})"
            problems += [(f"tune.rate_points[{k}]", q, allowed) for k, q in enumerate(self.tune.rate_points)
                         if not 0 <= q < n]
            from tasks.methods import TUNED  # the one list of the methods that need the tune stage

            tuned = sorted(TUNED & set(self.evaluate.methods))
            # The tune stage always measures SABA's sensitivities; a pipeline runs it only for
            # the methods that need it.
            tune_named = stages is not None and "tune" in stages
            if (tune_named or (tuned and uses(*PIPELINE_COMMANDS))) and not 0 <= self.tune.saba_quality < n:
                why = "SABA's sensitivities" if tune_named else f"evaluate.methods has {tuned}"
                problems.append(("tune.saba_quality", self.tune.saba_quality,
                                 f"{allowed}; the tune stage uses it ({why})"))
        if uses("evaluate", *PIPELINE_COMMANDS):
            others = sorted(self.codecs.others)
            problems += [(f"evaluate.anchors[{k}]", a, f"not a label of codecs.others (labels: {others})")
                         for k, a in enumerate(self.evaluate.anchors) if a not in self.codecs.others]
            nat = self.evaluate.natural_image_anchor
            if nat is not None and nat not in self.evaluate.anchors:
                problems.append(("evaluate.natural_image_anchor", nat,
                                 f"must be one of evaluate.anchors {self.evaluate.anchors} (its uniform line is "
                                 "the BD-rate anchor)"))
        if problems:
            raise FieldProblems(problems)
        return self

    def resolve_path(self, value: str) -> Path:
        """Relative paths are relative to the repository root, never to the caller's cwd."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    def store_url(self) -> str:
        """The feature store as a local path (relative to the repo root) or an fsspec URL."""
        s = self.features.store
        return s if "://" in s else str(self.resolve_path(s))

    def data_identity(self) -> str:
        """Hash of what decides an image's pixels (source, paths, size, seed), not of which
        images are selected: adding images to a run keeps its stored features valid."""
        d = self.data.model_dump(mode="json")
        keep = {k: d[k] for k in ("source", "root", "image_size", "coco_images", "seed")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self, *sections: str) -> str:
        """Stable hash of the given sections (all if none): what a stage output depends on."""
        d = self.model_dump(mode="json")
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _field_names(loc: tuple) -> list[str]:
    """The field names of the configuration section at `loc` (a validation error's location
    without its last part), or [] where it is not a section."""
    model: Any = Config
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[str(part)].annotation
        elif typing.get_origin(model) is dict:  # a mapping's entries: its value type
            model = typing.get_args(model)[1]
        else:
            return []
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        if isinstance(ctx.get("error"), FieldProblems):
            for path, value, reason in ctx["error"].problems:
                where = f"{field}{path}" if field else path.lstrip(".")
                lines.append(f"  {where} = {_show(value)}: {reason}")
            continue
        if "expected" in ctx and str(ctx["expected"]) not in msg:
            msg = f"{msg} (allowed: {ctx['expected']})"
        if err["type"] == "extra_forbidden":
            known = _field_names(err["loc"][:-1])
            if known:
                close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
                msg = (f"not a field here{f'; did you mean {close[0]!r}?' if close else ''} "
                       f"(fields: {', '.join(known)})")
        lines.append(f"  {field}: {msg}; got {err.get('input')!r}")
    return "\n".join(lines)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        if not isinstance(cur.get(k, {}), dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value


COCO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "coco2017-val-sample"


def smoke_overrides(sample: Path = COCO_SAMPLE) -> dict[str, Any]:
    """`mfiba run --smoke`: every stage end to end at full resolution on the COCO val2017
    sample beside the project: 2 calibration + 2 test images (disjoint), m = 2 qualities,
    two rate points, uniform and MFIBA, AVIF as the light codec (no weights needed)."""
    instances = sample / "annotations" / "instances.json"
    if not instances.exists():
        raise ConfigError(f"--smoke needs the COCO sample at {sample} (annotations/instances.json not found)")
    ids = sorted(int(im["id"]) for im in json.loads(instances.read_text())["images"])[:4]
    paths = {"coco_images": str(sample / "images"), "coco_instances": str(instances),
             "coco_keypoints": str(sample / "annotations" / "person_keypoints.json")}
    run_dir = "runs/smoke"
    return {
        "smoke": True, "run_dir": run_dir,
        **{f"data.{k}": {"calib": v, "test": v} for k, v in paths.items()},
        "data.image_ids": {"calib": ids[:2], "test": ids[2:4]},
        "data.train_count": 0, "data.calib_count": 2, "data.test_count": 2,
        "features.store": f"{run_dir}/features.zarr", "features.splits": ["calib", "test"],
        "features.batch_size": 1, "features.max_in_flight": 1,
        "codecs.main": {"name": "avif", "trained_on": "none", "phis": [20, 60]}, "codecs.others": {},
        "precode.tasks": ["bbox"], "precode.batch_size": 1,
        "tune.rate_points": [0, 1], "tune.images": 4,
        "evaluate.images": 2, "evaluate.methods": ["uniform", "mfiba"], "evaluate.tasks": ["bbox"],
        "evaluate.score_tasks": ["bbox"], "evaluate.anchors": [], "evaluate.natural_image_anchor": None,
        "evaluate.pool_modes": ["coded"], "evaluate.bootstrap": 0,
        "dask.n_workers": 1, "dask.threads_per_worker": 2,
    }


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_preset(path: Path, seen: tuple = ()) -> dict:
    """A preset's YAML; `extends: <preset>` starts from another preset and overrides it."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset is a mapping of fields, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = PRESET_DIR / f"{parent}.yaml"
    if not parent_path.exists() or parent in seen:
        raise ConfigError(f"{path}: extends {parent!r}, which is {'a cycle' if parent in seen else 'not a preset'}; "
                          f"available: {list_presets()}")
    return _merge(_read_preset(parent_path, seen + (path.stem,)), raw)


def load_config(preset: str = "demo", overrides: dict[str, Any] | list[str] | None = None,
                smoke: bool = False, stages: list[str] | tuple[str, ...] | None = None) -> Config:
    """Load a preset by name (or a YAML path) and apply overrides (dict or 'a.b=value' strings).

    Everything is validated here, before any work starts, including the fields that point
    into others (tune.rate_points into codecs.main.phis, evaluate.anchors into codecs.others).
    `stages` (CLI command names, e.g. ["precode"]) limits those cross-references to the ones
    the named stages use; None (the default) checks them for every stage."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        if path.parent != PRESET_DIR:  # given as a file
            raise ConfigError(f"preset file {str(path)!r} not found; presets by name: {list_presets()}")
        raise ConfigError(f"unknown preset {preset!r}; available: {list_presets()}")
    raw = _read_preset(path)
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like field.path=value")
            k, v = item.split("=", 1)
            parsed[k.strip()] = yaml.safe_load(v)
        overrides = parsed
    if smoke:
        # The smoke settings first, so explicit overrides still win.
        overrides = {**smoke_overrides(), **(overrides or {})}
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    try:
        return Config.model_validate(raw, context={"stages": None if stages is None else tuple(stages)})
    except ValidationError as e:
        source = f"{path} with --set {', '.join(overrides)}" if overrides else str(path)
        raise ConfigError(_format_error(e, source)) from None
