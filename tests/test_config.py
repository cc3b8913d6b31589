"""The typed configuration: presets load, overrides apply, wrong values are refused clearly."""
import pytest

from mfiba.config import ConfigError, list_presets, load_config


def test_presets_load():
    assert {"demo", "coco-paper", "coco-sample"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name


def test_paper_preset_has_the_paper_splits():
    cfg = load_config("coco-paper")
    assert (cfg.data.train_count, cfg.data.calib_count, cfg.data.test_count) == (40000, 500, 2000)
    assert cfg.task_model.name == "fasterrcnn_resnet50_fpn" and not cfg.task_model.allow_random_weights


def test_overrides_apply_and_change_the_digest():
    base = load_config("demo")
    cfg = load_config("demo", ["data.test_count=7", "dask.n_workers=1"])
    assert cfg.data.test_count == 7 and cfg.dask.n_workers == 1
    assert cfg.digest("data") != base.digest("data")
    assert cfg.digest("task_model") == base.digest("task_model")


@pytest.mark.parametrize("override, words", [
    ("device=gpu", ["device", "'cpu', 'cuda' or 'auto'", "'gpu'"]),
    ("task_model.name=yolo", ["task_model.name", "fasterrcnn_resnet50_fpn", "'yolo'"]),
    ("data.test_count=-3", ["data.test_count", "greater than or equal to 0"]),
    ("data.nope=1", ["data.nope", "Extra inputs"]),
    ("data.image_ids={val: [1]}", ["data.image_ids", "unknown split"]),
    ("codecs.main.name=vtm", ["codecs.main.name", "'avif'", "'vtm'"]),
    ("codecs.main.phis=[-0.1]", ["codecs.main.phis", ">= 0"]),
    ("codecs.main.phis=[0.2, 0.1]", ["codecs.main.phis", "strictly increasing"]),
    ("codecs.pool_mode=skip", ["codecs.pool_mode", "'coded' or 'derived'"]),
])
def test_wrong_values_name_field_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available"):
        load_config("nope")


def test_relative_paths_resolve_to_repo_root():
    cfg = load_config("demo")
    assert cfg.resolve_path(cfg.features.store).is_absolute()
    assert cfg.resolve_path(cfg.task_model.checkpoint).exists()
