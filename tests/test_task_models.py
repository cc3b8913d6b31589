"""Task models split into features() and heads(): shapes, exactness, weights handling."""
from pathlib import Path

import pytest
import torch

from tasks.models.demo import load_checkpoint
from tasks.models.registry import SCALES, WeightsNotFoundError, available_task_models, build_task_model

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "assets/demo-task-model/demo_task_model.pt"


def _same_detections(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_registry_lists_models():
    assert {"demo-multitask", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
            "keypointrcnn_resnet50_fpn"} <= set(available_task_models())
    with pytest.raises(ValueError, match="registered"):
        build_task_model("yolo")


def test_demo_checkpoint_is_small_and_splits_exactly():
    assert DEMO_CKPT.stat().st_size < 30 * 2 ** 20
    model = build_task_model("demo-multitask", str(DEMO_CKPT))
    torch.manual_seed(0)
    images = [torch.rand(3, 256, 256), torch.rand(3, 256, 256)]
    feats, meta = model.features(images)
    assert list(feats) == list(SCALES)
    assert [tuple(feats[s].shape[-2:]) for s in SCALES] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    for got, full in zip(model.heads(feats, meta), model.net(images)):
        _same_detections(got, full)
    assert set(model.heads(feats, meta)[0]) >= {"boxes", "masks", "keypoints"}


def test_demo_checkpoint_roi_levels_are_set_for_256_px():
    net, spec, extra = load_checkpoint(DEMO_CKPT)
    assert net.roi_heads.box_roi_pool.canonical_scale == spec.roi_canonical_scale == 64


def test_missing_coco_weights_give_one_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as e:
        build_task_model("fasterrcnn_resnet50_fpn")
    msg = str(e.value)
    assert "fasterrcnn_resnet50_fpn_coco" in msg and str(tmp_path) in msg and "task_model.checkpoint" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_task_model("fasterrcnn_resnet50_fpn", checkpoint=str(tmp_path / "x.pth"))


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_torchvision_random_init_shapes_and_head_pass(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = build_task_model(name, allow_random_weights=True)
    assert model.weights == "random-init"
    image = torch.rand(3, 480, 640)
    feats, meta = model.features([image])
    expected = {"0": (200, 272), "1": (100, 136), "2": (50, 68), "3": (25, 34), "pool": (13, 17)}
    assert {s: tuple(feats[s].shape[-2:]) for s in SCALES} == expected
    assert all(feats[s].shape[1] == 256 for s in SCALES)
    _same_detections(model.heads(feats, meta)[0], model.net([image])[0])
    # 'pool' is an exact stride-2 subsample of '3' (what derived-'pool' mode relies on).
    assert torch.equal(feats["pool"], feats["3"][..., ::2, ::2])


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "demo-multitask"])
def test_random_init_is_the_same_network_in_every_process(name, monkeypatch, tmp_path):
    """Feature extraction, precoding and evaluation build the model in different processes;
    with random weights they must still build one network, whatever the caller's seed, and
    without moving the caller's random state."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    first = build_task_model(name, allow_random_weights=True)
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = build_task_model(name, allow_random_weights=True)
    for (key, a), b in zip(first.net.state_dict().items(), second.net.state_dict().values()):
        assert torch.equal(a, b), key
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)


@pytest.mark.parametrize("name", ["demo-multitask", "fasterrcnn_resnet50_fpn"])
def test_pass_reuse_gives_the_same_detections(name, monkeypatch, tmp_path):
    """Precoding passes change one scale each; reusing the lossless RPN candidates of the
    other levels and the box outputs of unchanged proposals must not change a proposal or a
    detection."""
    from collections import OrderedDict

    from torchvision.models.detection.image_list import ImageList

    from tasks.models.registry import PassReuse, ReusingRpn, SplitMeta

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = str(Path(__file__).resolve().parents[1] / "assets/demo-task-model/demo_task_model.pt")
    model = build_task_model(name, checkpoint if name == "demo-multitask" else None, allow_random_weights=True)
    if name != "demo-multitask":  # torchvision resizes to 800 px; smaller keeps the test fast
        model.net.transform.min_size, model.net.transform.max_size = (256,), 320
    torch.manual_seed(0)
    feats, meta = model.features([torch.rand(3, 256, 320)])
    changed = [{"0"}, {"2"}, {"3", "pool"}, {"pool"}, set(), {"1"}]  # set(): the lossless pass itself
    variants = []
    for c in changed:
        v = OrderedDict(feats)
        for s in c:
            v[s] = feats[s] + 0.3 * torch.randn_like(feats[s])
        variants.append(v)
    stacked = OrderedDict((k, torch.cat([v[k] for v in variants])) for k in SCALES)
    bm = SplitMeta(meta.image_sizes * len(changed), meta.original_sizes * len(changed), meta.batch_shape)
    plain = model.heads(stacked, bm, tasks=("bbox",))
    reuse = PassReuse(model, feats, meta, changed)
    with torch.no_grad():  # the RPN stand-in alone: torchvision's proposals, level by level
        image_list = ImageList(torch.empty((len(changed), 3, *meta.batch_shape)), list(bm.image_sizes))
        want, _ = model.net.rpn(image_list, stacked)
        got, _ = ReusingRpn(model.net.rpn, reuse)(image_list, stacked)
    for a, b in zip(want, got):  # same proposals in the same order; the changed levels' head
        # ran on a batch of another size (last float bits, scaled by the decoding's exp)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-2)
    reused = model.heads(stacked, bm, tasks=("bbox",), reuse=reuse)
    assert 0 < reuse.rows["computed"] < reuse.rows["total"]  # some proposals reused, some computed
    for a, b in zip(plain, reused):
        # The same convolutions on the same inputs, but a batch of another size: MKL-DNN may
        # sum in another order, so the last float bits may differ (nothing more).
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-3, atol=1e-4)
    rh = model.net.roi_heads  # the reusing parts are removed again
    assert model.net.rpn.head.__class__.__name__ == "RPNHead" and rh.box_roi_pool.__class__.__name__ == \
        "MultiScaleRoIAlign" and rh.box_head.__class__.__name__ != "Identity"


def test_head_runs_from_several_threads_on_one_model_do_not_mix():
    """A Dask worker with several threads runs precoding tasks on one cached model; one
    task's PassReuse (modules swapped into the shared network) must never reach another
    task's passes (it did: 'PassReuse: 5 passes described, batch has 1', or silently wrong
    losses)."""
    import threading
    from collections import OrderedDict

    from tasks.models.registry import PassReuse, SplitMeta

    model = build_task_model("demo-multitask", str(DEMO_CKPT))
    torch.manual_seed(0)
    feats, meta = model.features([torch.rand(3, 256, 256)])
    changed = [{s} for s in SCALES]
    stacked = OrderedDict((k, torch.cat([feats[k] + (0.3 if k in c else 0.0) for c in changed])) for k in SCALES)
    batch_meta = SplitMeta(meta.image_sizes * len(changed), meta.original_sizes * len(changed), meta.batch_shape)
    expected_lossless = model.heads(feats, meta)
    expected_reused = model.heads(stacked, batch_meta, ("bbox",), PassReuse(model, feats, meta, changed))
    errors = []
    # Each thread sets its intra-op thread count, as tasks do (set_torch_threads): after
    # tests/test_train_codec.py in the same process this test failed on float bits of the
    # boxes, not on mixed modules.
    intra_op = torch.get_num_threads()

    def run(kind):
        torch.set_num_threads(intra_op)
        try:
            for _ in range(15):
                if kind == "lossless":
                    for a, b in zip(model.heads(feats, meta), expected_lossless):
                        _same_detections(a, b)
                else:
                    reuse = PassReuse(model, feats, meta, changed)
                    for a, b in zip(model.heads(stacked, batch_meta, ("bbox",), reuse), expected_reused):
                        _same_detections(a, b)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("lossless", "reused", "lossless", "reused")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_random_init_built_by_two_threads_at_once_is_the_same_network():
    """A worker's first two tasks build the random-init model concurrently; the global RNG
    is shared, so without one build at a time each got another network (the smoke run's
    losses then changed from run to run)."""
    import threading

    reference = build_task_model("demo-multitask", allow_random_weights=True).net.state_dict()
    for _ in range(3):
        built = [None, None]

        def build(k):
            built[k] = build_task_model("demo-multitask", allow_random_weights=True).net.state_dict()

        threads = [threading.Thread(target=build, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for state in built:
            for key, value in reference.items():
                assert torch.equal(state[key], value), key
