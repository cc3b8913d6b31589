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
    ("data.nope=1", ["data.nope", "not a field here", "test_count"]),
    ("data.test_cuont=1", ["data.test_cuont", "did you mean 'test_count'?"]),
    ("codecs.others.vbr.phiss=[1]", ["codecs.others.vbr.phiss", "did you mean 'phis'?", "checkpoint"]),
    ("data.image_ids={val: [1]}", ["data.image_ids", "unknown split"]),
    ("codecs.main.name=vtm", ["codecs.main.name", "'avif'", "'vtm'"]),
    ("codecs.main.phis=[-0.1]", ["codecs.main.phis", ">= 0"]),
    ("codecs.main.phis=[0.2, 0.1]", ["codecs.main.phis", "strictly increasing"]),
    ("codecs.pool_mode=skip", ["codecs.pool_mode", "'coded' or 'derived'"]),
])
def test_wrong_values_name_field_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    for w in words + [f"with --set {override.split('=')[0]}"]:  # the override, not only the preset file
        assert w in str(e.value)


def test_a_preset_file_that_is_missing_or_not_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match="preset file '.*nope.yaml' not found; presets by name"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1\nseed: 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=f"{bad}: a preset is a mapping of fields, got list"):
        load_config(str(bad))


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available"):
        load_config("nope")


def test_relative_paths_resolve_to_repo_root():
    cfg = load_config("demo")
    assert cfg.resolve_path(cfg.features.store).is_absolute()
    assert cfg.resolve_path(cfg.task_model.checkpoint).exists()


# -- rate settings each codec accepts, and fields that point into other fields ---------------------
@pytest.mark.parametrize("overrides, line", [
    (["codecs.main.phis=[10, 20, 30, 140]"], "codecs.main.phis[3] = 140: avif quality must be in 0..100"),
    (["codecs.main={name: jpegxl, trained_on: none, phis: [50, 100.5]}"],
     "codecs.main.phis[1] = 100.5: jpegxl quality must be in 0..100"),
    (["codecs.others.vbr.phis=[0, 0.1]"],
     "codecs.others.vbr.phis[0] = 0: mean-scale-vbr phis are training lambdas and must be > 0"),
    (["codecs.main={name: lic-tcm, phis: [0.0, 0.013]}"],
     "codecs.main.phis[0] = 0: lic-tcm phis are training lambdas and must be > 0"),
    (["codecs.main={name: external, trained_on: none, phis: [22, 60], "
      "options: {codec: {encode_cmd: e, decode_cmd: d}}}"],
     "codecs.main.phis[1] = 60: the external codec's phi must be in its phi_range 0..51 (options.codec.phi_range)"),
    (["codecs.main.phis=[-0.1, 10]"], "codecs.main.phis[0] = -0.1: rate settings must be finite and >= 0"),
    (["codecs.main.phis=[10, .nan]"], "codecs.main.phis[1] = nan: rate settings must be finite and >= 0"),
    (["codecs.others.hyperprior.phis=[0.0018, .inf]"],
     "codecs.others.hyperprior.phis[1] = inf: rate settings must be finite and >= 0"),
    (["tune.rate_points=[-1, 2]"],
     "tune.rate_points[0] = -1: an index into codecs.main.phis, which has 8 entries (0..7)"),
    (["tune.rate_points=[1, 3, 8]"],
     "tune.rate_points[2] = 8: an index into codecs.main.phis, which has 8 entries (0..7)"),
    (["codecs.main.phis=[20, 60]"],  # the demo's rate points [1..5] no longer fit
     "tune.rate_points[1] = 2: an index into codecs.main.phis, which has 2 entries (0..1)"),
    (["codecs.main.phis=[20, 60]", "tune.rate_points=[0, 1]", "evaluate.methods=[uniform, saba]"],
     "tune.saba_quality = 2: an index into codecs.main.phis, which has 2 entries (0..1); the tune stage uses it"),
    (["evaluate.anchors=[vbr, vbr-natural]"],
     "evaluate.anchors[1] = 'vbr-natural': not a label of codecs.others (labels: ['hyperprior',"),
    (["evaluate.anchors=[vbr]", "evaluate.natural_image_anchor=vbr-rgb"],
     "evaluate.natural_image_anchor = 'vbr-rgb': must be one of evaluate.anchors ['vbr']"),
    (["codecs.others.x={name: vtm, phis: [1]}"], "codecs.others.x.name: Input should be 'bmshj2018-hyperprior'"),
])
def test_bad_rate_settings_are_refused_at_load_naming_the_field(overrides, line):
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides)
    assert f"\n  {line}" in str(e.value), str(e.value)


def test_settings_in_each_codecs_range_load():
    cfg = load_config("demo", ["codecs.main.phis=[0, 100]", "tune.rate_points=[0, 1]"])
    assert cfg.codecs.main.phis == [0, 100]
    spec = ("codecs.main={name: external, trained_on: none, phis: [10, 60], "
            "options: {codec: {encode_cmd: e, decode_cmd: d, phi_range: [0, 63]}}}")
    assert load_config("demo", [spec, "tune.rate_points=[0, 1]"]).codecs.main.phis == [10, 60]


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["codecs.main.phis=[10, 20, 30, 40, 50, 60, 70, 120]", "codecs.others.vbr.phis=[0, 0.1]"])
    assert "codecs.main.phis[7] = 120" in str(e.value) and "codecs.others.vbr.phis[0] = 0" in str(e.value)


def test_rate_points_are_checked_only_for_the_stages_that_use_them():
    one_phi = {"codecs.main": {"name": "bmshj2018-hyperprior", "N": 16, "M": 24, "phis": [0.013]}}
    for stages in (["train-codec"], ["features"], ["precode"], ["fit"]):
        assert load_config("demo", one_phi, stages=stages).codecs.main.phis == [0.013]
    for stages in (None, ["tune"], ["evaluate"], ["run"]):
        with pytest.raises(ConfigError, match=r"tune.rate_points\[0\] = 1: an index into codecs.main.phis, which "
                                              r"has 1 entry \(0..0\)"):
            load_config("demo", one_phi, stages=stages)
    # A codec's own range is checked for every stage.
    with pytest.raises(ConfigError, match=r"codecs.main.phis\[0\] = 0: bmshj2018-hyperprior phis are training"):
        load_config("demo", {"codecs.main": {**one_phi["codecs.main"], "phis": [0]}}, stages=["train-codec"])
    # `mfiba tune` always measures SABA's sensitivities at saba_quality; a pipeline only for its methods.
    two = ["codecs.main.phis=[20, 60]", "tune.rate_points=[0, 1]"]
    load_config("demo", two, stages=["run"])
    with pytest.raises(ConfigError, match=r"tune.saba_quality = 2: .*\(SABA's sensitivities\)"):
        load_config("demo", two, stages=["tune"])


def test_codec_lists_agree_with_the_codec_registry():
    """mfiba.config names and ranges codecs without importing them (torch); they must agree."""
    import inspect

    from mfiba.config import CODEC_NAMES, EXTERNAL_PHI_RANGE, LEARNED_CODEC_NAMES, QUALITY_RANGES
    from tasks.codecs.base import CLASSICAL_CODECS, available_codecs
    from tasks.codecs.classical import AvifCodec, ExternalCommandCodec, JpegXlCodec

    assert sorted(CODEC_NAMES) == available_codecs()
    assert sorted(LEARNED_CODEC_NAMES) == sorted(set(available_codecs()) - set(CLASSICAL_CODECS))
    assert QUALITY_RANGES == {"avif": AvifCodec.phi_range, "jpegxl": JpegXlCodec.phi_range}
    assert EXTERNAL_PHI_RANGE == inspect.signature(ExternalCommandCodec).parameters["phi_range"].default


def test_config_loading_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from mfiba.config import load_config; load_config('demo-full'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
