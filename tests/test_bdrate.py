"""BD-rate: known values, the non-monotonic rule, and refusal of degenerate curves."""
import math

import numpy as np
import pytest

from tasks.bdrate import METHODS, bd_rate, monotone_front


@pytest.mark.parametrize("method", METHODS)
def test_ten_percent_fewer_bits_everywhere(method):
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    q = np.array([30.0, 32.0, 33.5, 34.5, 35.2])
    res = bd_rate(r, q, 0.9 * r, q, method=method)
    assert res.bd_rate_percent == pytest.approx(-10.0, abs=0.05)
    assert not res.non_monotonic


def test_non_monotonic_points_are_dropped_and_flagged():
    r = [1, 2, 3, 4, 5, 6]
    q = [30, 32, 31, 34, 35, 36]  # the third point lost quality for more bits
    fr, fq, dropped = monotone_front(r, q)
    assert dropped == 1 and list(fr) == [1, 2, 4, 5, 6]
    assert np.all(np.diff(fq) > 0)
    res = bd_rate(r, q, r, q)
    assert res.non_monotonic and res.dropped_anchor == 1 and res.bd_rate_percent == pytest.approx(0, abs=1e-9)


def test_too_few_points_give_nan_with_reason():
    res = bd_rate([1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3])
    assert math.isnan(res.bd_rate_percent) and "fewer than 4" in res.reason
    flat = bd_rate([1, 2, 3, 4], [5, 5, 5, 5], [1, 2, 3, 4], [5, 5, 5, 5])
    assert math.isnan(flat.bd_rate_percent) and flat.non_monotonic


def test_no_overlap_gives_nan_not_an_exception():
    res = bd_rate([1, 2, 3, 4], [1, 2, 3, 4], [10, 20, 30, 40], [10, 11, 12, 13])
    assert math.isnan(res.bd_rate_percent) and res.reason
