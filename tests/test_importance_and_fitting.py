"""MFIP weights and the offline fits: known answers, options, degenerate inputs."""
import numpy as np
import pytest

from tasks.fitting import FitError, fit_cauchy, fit_quadratic, fit_rate_phi
from tasks.importance import mfip_weights


def test_sum_normalisation_averages_over_qualities():
    losses = [[0.4, 0.2, 0.2, 0.2, 0.0], [0.2, 0.2, 0.1, 0.0, 0.0]]
    w = mfip_weights(losses, floor=0.0).weights
    expected = np.mean([[0.4, 0.2, 0.2, 0.2, 0.0], [0.4, 0.4, 0.2, 0.0, 0.0]], axis=0)
    np.testing.assert_allclose(w, expected / expected.sum())


def test_floor_keeps_every_weight_positive_and_minmax_matches_the_authors():
    losses = [[0.5, 0.1, 0.0, 0.0, 0.0]]
    assert np.all(mfip_weights(losses).weights > 0)
    mm = mfip_weights(losses, mode="minmax").weights
    assert mm[2] == 0 and mm[0] == pytest.approx(1 / 1.2)


def test_all_zero_losses_give_uniform_flagged_weights():
    imp = mfip_weights(np.zeros((3, 4)))
    assert imp.degenerate and np.allclose(imp.weights, 0.25)


def test_bad_losses_refused():
    with pytest.raises(ValueError, match="NaN"):
        mfip_weights([[np.nan, 0.1]])
    with pytest.raises(ValueError, match="shape"):
        mfip_weights([0.1, 0.2])


def test_cauchy_recovers_its_parameters_and_beats_quadratic_on_cauchy_data():
    r = np.linspace(0.05, 2.0, 20)
    d = 10.953 * r ** -0.552
    c = fit_cauchy(r, d)
    assert c.params["alpha"] == pytest.approx(10.953, rel=1e-6) and c.params["beta"] == pytest.approx(0.552, rel=1e-6)
    assert c.cc == pytest.approx(1.0) and c.rmse < 1e-6
    assert fit_quadratic(r, d).rmse > c.rmse


def test_rate_phi_linear_fit():
    phi = np.array([0.0018, 0.0035, 0.0067, 0.013, 0.025])
    f = fit_rate_phi(phi, 3.0 * phi + 0.1)
    assert f.params["a"] == pytest.approx(3.0) and f.params["b"] == pytest.approx(0.1)


@pytest.mark.parametrize("x, y, match", [
    ([1.0], [1.0], "at least"),
    ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], "all x values are equal"),
    ([1.0, np.nan], [1.0, 2.0], "at least"),
])
def test_degenerate_fits_raise_clear_errors(x, y, match):
    with pytest.raises(FitError, match=match):
        fit_cauchy(x, y)
    with pytest.raises(FitError, match="slope 0|at least|equal"):
        fit_rate_phi(x, [5.0] * len(x))
