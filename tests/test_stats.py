import math

import numpy as np
import pytest

from cat_jax import stats


def test_mean_std():
  m, s = stats.mean_std([1.0, 2.0, 4.0])
  assert m == pytest.approx(7 / 3)
  assert s == pytest.approx(np.std([1, 2, 4], ddof=1))
  assert stats.mean_std([3.0]) == (3.0, 0.0)


def test_paired_ttest_known_value_and_monte_carlo():
  # d = a + (0, 1, -1) has sd 1, so t = a * sqrt(3); t = 4.302653 with 2
  # degrees of freedom is the two-sided 5% critical value.
  a = 4.302653 / math.sqrt(3)
  r = stats.paired_ttest([a, a + 1, a - 1], [0.0] * 3)
  assert r["t"] == pytest.approx(4.302653, rel=1e-9)
  assert r["p"] == pytest.approx(0.05, abs=1e-6)
  # Against simulation at another t and df.
  x, y = [0.3, 1.2, 0.8, 1.9, 0.4], [0.1, 0.9, 1.0, 1.1, 0.2]
  r = stats.paired_ttest(x, y)
  sims = np.random.default_rng(0).standard_t(4, size=400_000)
  assert r["p"] == pytest.approx(np.mean(np.abs(sims) >= abs(r["t"])),
                                 abs=0.003)
  assert stats.betainc(1.0, 0.5, 0.75) == pytest.approx(
      1 - math.sqrt(1 - 0.75), rel=1e-9)


def test_degenerate_cases():
  assert math.isnan(stats.paired_ttest([1.0], [0.0])["p"])
  assert math.isnan(stats.paired_ttest([1.0, 1.0], [0.0, 0.0])["p"])
  with pytest.raises(ValueError):
    stats.paired_ttest([1.0], [1.0, 2.0])
