"""Allocation methods, the lambda' grid, the finetuning line search, SABA's group->scale
mapping and the result tables they are stored in."""
import numpy as np
import pandas as pd
import pytest

from storage.results import PartTable, StaleTableError
from tasks.finetune import line_search
from tasks.methods import RateModels, allocate_phis, lambda_grid, method_weights, predicted_bits
from tasks.saba import saba_scale_weights

SCALES = ("0", "1", "2", "3", "pool")
PIXELS = np.array([64 * 64, 32 * 32, 16 * 16, 8 * 8, 4 * 4])


def _models(**kw):
    return RateModels(SCALES, (2.0,), (0.7,), {s: (10.0, 0.01) for s in SCALES},
                      static_weights={s: 0.2 for s in SCALES}, **kw)


def test_more_weight_gets_a_higher_phi_and_phis_stay_in_range():
    m = _models()
    low = allocate_phis(np.array([0.1, 0.2, 0.2, 0.2, 0.3]), m, PIXELS, 1.0, (0.0018, 0.18))[0]
    high = allocate_phis(np.array([0.5, 0.2, 0.1, 0.1, 0.1]), m, PIXELS, 1.0, (0.0018, 0.18))[0]
    assert high["0"] > low["0"]
    for phis in (low, high):
        assert all(0.0018 <= p <= 0.18 for p in phis.values())
    # A fixed-rate family snaps to its nearest level.
    levels = [0.0018, 0.0067, 0.025, 0.0932, 0.18]
    snapped = allocate_phis(np.full(5, 0.2), m, PIXELS, 1.0, (0.0018, 0.18), levels)[0]
    assert set(snapped.values()) <= set(levels)


def test_method_weights_sum_to_one_and_finetuned_is_quantised():
    m = _models(weight_correction={"0": 0.013, "1": 0, "2": 0, "3": -0.01, "pool": 0})
    mfip = {"0": 0.3, "1": 0.25, "2": 0.2, "3": 0.15, "pool": 0.1}
    for method in ("mfiba", "mfiba-finetuned", "static", "oracle"):
        w = method_weights(method, m, mfip, mfip)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    raw = np.round(np.array([0.313, 0.25, 0.2, 0.14, 0.1]), 2)
    np.testing.assert_allclose(method_weights("mfiba-finetuned", m, mfip), raw / raw.sum())
    with pytest.raises(ValueError, match="SABA weights has no entry"):
        method_weights("saba", m, mfip)
    with pytest.raises(ValueError, match="unknown allocating method"):
        method_weights("nope", m, mfip)


def test_lambda_grid_matches_target_mean_bits():
    m = _models()
    weights = [np.array([0.4, 0.3, 0.1, 0.1, 0.1]), np.array([0.1, 0.1, 0.2, 0.3, 0.3])]
    pixels = [PIXELS, PIXELS]
    lo_bits = np.mean([predicted_bits(m, {s: 0.0018 for s in SCALES}, p) for p in pixels])
    hi_bits = np.mean([predicted_bits(m, {s: 0.18 for s in SCALES}, p) for p in pixels])
    targets = list(np.linspace(lo_bits * 1.5, hi_bits * 0.7, 4))
    grid = lambda_grid(weights, m, pixels, targets, (0.0018, 0.18))
    assert grid == sorted(grid, reverse=True)  # more bits, smaller lambda'
    for lam, target in zip(grid, targets):
        got = np.mean([predicted_bits(m, allocate_phis(w, m, p, lam, (0.0018, 0.18))[0], p)
                       for w, p in zip(weights, pixels)])
        assert got == pytest.approx(target, rel=1e-3)


def test_line_search_walks_to_the_optimum_in_steps():
    target = {"0": 0.03, "1": -0.02, "2": 0.0}
    calls = []

    def bd(corr):
        calls.append(corr)
        return sum((corr[s] - target[s]) ** 2 for s in target) * 1e4 - 5.0

    res = line_search(bd, list(target), step=0.01, max_evaluations=50)
    assert res.correction == pytest.approx(target)
    assert res.bd_rate < res.start_bd_rate and res.evaluations == len(calls)
    # NaN BD-rates (curves that cannot be compared) never count as an improvement.
    res = line_search(lambda c: float("nan") if c["0"] != 0 else 1.0, ["0"], max_evaluations=5)
    assert res.correction == {"0": 0.0}


def test_saba_scale_weights_sum_groups_and_handle_insensitive_features():
    per_image = [{"0": np.array([0.1, 0.3]), "1": np.array([0.0, 0.0]), "2": np.array([0.2, 0.0])},
                 {"0": np.array([0.1, 0.1]), "1": np.array([0.0, 0.2]), "2": np.array([0.0, 0.0])}]
    weights, mean = saba_scale_weights(per_image)
    np.testing.assert_allclose(mean["0"], [0.1, 0.2])
    assert weights["0"] == pytest.approx(0.3 / 0.5) and sum(weights.values()) == pytest.approx(1.0)
    flat, _ = saba_scale_weights([{"0": np.zeros(2), "1": np.zeros(2)}])
    assert flat == {"0": 0.5, "1": 0.5}


def test_part_table_is_resumable_atomic_and_refuses_other_identities(tmp_path):
    t = PartTable(str(tmp_path / "t"), {"codec": "a"})
    t.write("image=1-q=0", pd.DataFrame({"image_id": [1], "bits": [10]}))
    t.write("image=2-q=0", pd.DataFrame({"image_id": [2], "bits": [20]}))
    (tmp_path / "t" / "parts" / ".image=3-q=0.parquet.abc.tmp").write_bytes(b"half")  # an interrupted write
    assert PartTable(str(tmp_path / "t"), {"codec": "a"}).keys() == {"image=1-q=0", "image=2-q=0"}
    assert t.has("image=1-q=0") and not t.has("image=3-q=0")  # one lookup; a temporary file is no part
    frame = t.consolidate(sort_by=["image_id"])
    assert frame.bits.tolist() == [10, 20]
    assert PartTable.load(str(tmp_path / "t")).equals(frame)
    with pytest.raises(StaleTableError, match=r"different \['codec'\]"):
        PartTable(str(tmp_path / "t"), {"codec": "b"})
    assert PartTable(str(tmp_path / "t"), {"codec": "b"}, overwrite=True).keys() == set()
    with pytest.raises(ValueError, match="invalid part key"):
        t.write("../escape", pd.DataFrame())
    with pytest.raises(ValueError, match="invalid part key"):
        t.has("../escape")


def test_part_table_behind_an_fsspec_url():
    url = "memory://mfiba-tests/precode-table"
    t = PartTable(url, {"codec": "a"})
    t.write("image=1-q=0", pd.DataFrame({"image_id": [1], "bits": [10]}))
    assert PartTable(url, {"codec": "a"}).keys() == {"image=1-q=0"}
    assert t.has("image=1-q=0") and not t.has("image=2-q=0")
    t.consolidate()
    assert PartTable.load(url).bits.tolist() == [10]
    other = PartTable.for_identity("memory://mfiba-tests/t", {"codec": "b"})
    assert other.url.startswith("memory://mfiba-tests/t-") and other.keys() == set()
