"""Allocation properties: closed form, monotone in weight, budget met, KKT, degenerate weights."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.allocation import (AUTHORS_DIVISORS, PAPER_DIVISORS, LossRateModel, allocate, allocate_budget,
                              rate_to_phi)

# The authors' fitted ELIC constants (REFERENCE.md): d = a * R^b per scale, b = -beta.
ELIC = LossRateModel(alpha=(10.953, 10.567, 22.266, 25.237, 10.241), beta=(0.552, 0.678, 0.64, 0.741, 0.742))
PIXELS = np.array([200 * 272, 100 * 136, 50 * 68, 25 * 34, 13 * 17], float)
weights_st = st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5).filter(lambda w: sum(w) > 1e-3)


def test_closed_form_matches_the_paper_formula():
    w = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    lam = 0.05
    a = allocate(w, ELIC, PIXELS, lam)
    alpha, beta = np.array(ELIC.alpha), np.array(ELIC.beta)
    expected = (w * alpha * beta / (lam / np.array(PAPER_DIVISORS))) ** (1 / (beta + 1))
    np.testing.assert_allclose(a.rates, expected)
    np.testing.assert_allclose(a.bits, expected * PIXELS)


@settings(max_examples=60, deadline=None)
@given(weights_st, st.integers(0, 4), st.floats(0.01, 0.5))
def test_more_weight_never_means_fewer_bits(w, i, extra):
    w = np.array(w)
    budget = 0.5 * PIXELS.sum()
    base = allocate_budget(w, ELIC, PIXELS, budget, r_min=0.01)
    more = w.copy()
    more[i] += extra
    boosted = allocate_budget(more, ELIC, PIXELS, budget, r_min=0.01)
    assert boosted.bits[i] >= base.bits[i] * (1 - 1e-3)


@settings(max_examples=60, deadline=None)
@given(weights_st, st.floats(0.05, 4.0), st.sampled_from([PAPER_DIVISORS, AUTHORS_DIVISORS]))
def test_budget_is_met_and_kkt_holds(w, bpp, divisors):
    w = np.array(w)
    budget = bpp * PIXELS.sum()
    a = allocate_budget(w, ELIC, PIXELS, budget, divisors=divisors, r_min=1e-4, r_max=50.0)
    if not a.clamped.all():
        assert a.total_bits == pytest.approx(budget, rel=1e-3)
    # KKT: on unclamped scales with weight, the marginal loss reduction per bit equals lambda'
    # (d/dR of w*alpha*R^-beta = lambda' / div).
    alpha, beta, div = np.array(ELIC.alpha), np.array(ELIC.beta), np.array(divisors)
    free = (~a.clamped) & (w > 0)
    marginal = w * alpha * beta * a.rates ** (-beta - 1) * div
    np.testing.assert_allclose(marginal[free], a.lambda_prime, rtol=1e-6)


def test_zero_weight_gets_the_lowest_rate_never_nothing():
    a = allocate_budget([0.0, 0.5, 0.5, 0.0, 0.0], ELIC, PIXELS, 0.3 * PIXELS.sum(), r_min=0.02)
    assert a.rates[0] == pytest.approx(0.02) and a.clamped[0]
    assert np.all(a.rates > 0)


def test_one_scale_only_takes_the_whole_budget_above_the_floor():
    budget = 0.3 * PIXELS.sum()
    a = allocate_budget([1, 0, 0, 0, 0], ELIC, PIXELS, budget, r_min=0.01)
    assert a.total_bits == pytest.approx(budget, rel=1e-3)
    assert np.all(a.rates[1:] == 0.01)


def test_all_zero_weights_and_impossible_budgets_clamp():
    assert np.all(allocate_budget([0] * 5, ELIC, PIXELS, 1e6, r_min=0.01).rates == 0.01)
    tiny = allocate_budget([0.2] * 5, ELIC, PIXELS, 1.0, r_min=0.01)
    assert tiny.clamped.all() and np.all(tiny.rates == 0.01)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="weights"):
        allocate([-0.1, 0.5, 0.5, 0, 0], ELIC, PIXELS, 0.1)
    with pytest.raises(ValueError, match="lambda"):
        allocate([0.2] * 5, ELIC, PIXELS, 0.0)
    with pytest.raises(ValueError, match="positive finite alpha"):
        LossRateModel(alpha=(1.0,), beta=(-0.5,))


def test_rate_to_phi_inverts_clamps_and_snaps():
    assert rate_to_phi(0.5, a=10.0, b=0.1, phi_range=(0.0, 1.0)) == pytest.approx(0.04)
    assert rate_to_phi(100.0, a=10.0, b=0.1, phi_range=(0.0, 1.0)) == 1.0
    assert rate_to_phi(0.5, a=10.0, b=0.1, phi_range=(0.0, 1.0), levels=[0.0018, 0.0483, 0.18]) == 0.0483
