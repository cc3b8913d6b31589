"""Batched precoding gives the same losses and MFIP weights as the reference loop."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mfiba.config import load_config
from tasks.codecs.base import build_codec_from_spec
from tasks.datasets.synthetic import SyntheticSpec, categories_json, render
from tasks.importance import mfip_weights
from tasks.models.registry import SCALES, build_task_model
from tasks.models.training import image_to_tensor
from tasks.precoding import coded_scales, precode_batched, precode_reference

CFG = load_config("demo")


def _demo_image(index: int):
    """The demo task model and the features of synthetic test image `index`."""
    model = build_task_model("demo-multitask", str(CFG.resolve_path(CFG.task_model.checkpoint)))
    data, rec, _ = render(SyntheticSpec(), "test", index)
    feats, meta = model.features([image_to_tensor(Image.open(io.BytesIO(data)))])
    return model, feats, meta, rec


@pytest.mark.parametrize("pool_mode", ["coded", "derived"])
def test_batched_equals_reference_loop(pool_mode):
    # The learned codec: the batched path's synthesis of the quantised latent is what is tested.
    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    model, feats, meta, rec = _demo_image(0)
    phis = CFG.codecs.others["vbr"].phis[::3]
    a = precode_reference(model, codec, rec["id"], feats, meta, phis, categories_json(), ("bbox",), pool_mode)
    b = precode_batched(model, codec, rec["id"], feats, meta, phis, categories_json(), ("bbox",), pool_mode)
    n = len(coded_scales(pool_mode))
    assert len(a.rows) == len(b.rows) == len(phis) * n
    la = np.array([r["loss_bbox"] for r in a.rows]).reshape(len(phis), n)
    lb = np.array([r["loss_bbox"] for r in b.rows]).reshape(len(phis), n)
    assert la.max() > 0  # the codec's low rates do cost accuracy
    np.testing.assert_allclose(mfip_weights(la).weights, mfip_weights(lb).weights, atol=1e-6)
    # Real bits from the loop; the batched path (MFIP: losses only) skips the rate estimate.
    assert all(r["bits"] > 0 for r in a.rows) and all(r["estimated_bits"] is None for r in b.rows)


def test_shared_passes_for_both_pool_modes_and_all_qualities_equal_separate_precoding():
    """Online MFIP stacks every quality's passes of both 'pool' modes (shared passes once):
    the same rows, in the same order, as precoding each quality and mode alone."""
    from tasks.precoding import decode_all_qualities, lossless_pass, precode_quality, precode_qualities_modes

    codec = build_codec_from_spec(CFG.codecs.others["vbr"], "vbr", CFG.resolve_path)
    model, feats, meta, rec = _demo_image(1)
    ref, _ = lossless_pass(model, rec["id"], feats, meta, categories_json(), ("bbox",))
    phis = CFG.codecs.others["vbr"].phis[:3]
    decoded = decode_all_qualities(codec, feats, SCALES, phis)
    both = precode_qualities_modes(model, rec["id"], feats, meta, phis, decoded, ref, ("bbox",))
    for mode in ("coded", "derived"):
        alone = []
        for q, phi in enumerate(phis):
            alone += precode_quality(model, codec, rec["id"], feats, meta, q, phi, ref, ("bbox",), mode).rows
        assert [(r["quality"], r["scale"]) for r in both[mode].rows] == [(r["quality"], r["scale"]) for r in alone]
        np.testing.assert_allclose([r["loss_bbox"] for r in both[mode].rows],
                                   [r["loss_bbox"] for r in alone], atol=1e-9)
        np.testing.assert_allclose([r["estimated_bits"] for r in both[mode].rows],
                                   [r["estimated_bits"] for r in alone], rtol=1e-9)


def test_pass_batches_cut_by_size_give_the_same_detections():
    """A COCO-size pyramid is too big to stack all m x scales passes: pass_detections cuts
    the batches at max_batch_bytes, with the same detections as one batch (up to the last
    float bit that MKL-DNN's sums can change with the batch size)."""
    from tasks.precoding import pass_detections

    model, feats, meta, rec = _demo_image(1)
    passes = [(s, feats[s][0] * (1 + 0.05 * k), "coded") for k in range(1, 3) for s in SCALES]
    one = pass_detections(model, feats, meta, passes, ("bbox",))
    pass_bytes = sum(f.numel() * f.element_size() for f in feats.values())
    cut = pass_detections(model, feats, meta, passes, ("bbox",), max_batch_bytes=3 * pass_bytes)
    assert len(one) == len(cut) == len(passes)
    for a, b in zip(one, cut):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_lossless_pass_through_the_images_reuse_is_the_plain_lossless_pass():
    """precode_batched and the precode/evaluate stages take the lossless detections from the
    image's PassReuse (nothing recomputed): the same detections as the plain heads, bit for
    bit, for every task branch."""
    from tasks.models.registry import PassReuse
    from tasks.precoding import lossless_pass

    model, feats, meta, rec = _demo_image(2)
    tasks = tuple(model.tasks)
    reuse = PassReuse(model, feats, meta)
    plain = model.heads(feats, meta, tasks=tasks)[0]
    reused = model.heads(feats, meta, tasks=tasks, reuse=reuse.for_passes([set()]))[0]
    assert set(plain) == set(reused)
    for key in plain:
        assert torch.equal(plain[key], reused[key]), key
    ref_plain, _ = lossless_pass(model, rec["id"], feats, meta, categories_json(), tasks)
    ref_reused, _ = lossless_pass(model, rec["id"], feats, meta, categories_json(), tasks, reuse=reuse)
    assert ref_plain == ref_reused
