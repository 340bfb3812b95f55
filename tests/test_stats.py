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


def holm_by_definition(pvalues, alpha):
  """Which hypotheses Holm's step-down procedure rejects at level alpha:
  walk the sorted p-values, reject while p_(i) <= alpha / (m - i + 1)."""
  finite = [(p, i) for i, p in enumerate(pvalues) if math.isfinite(p)]
  m, rejected = len(finite), set()
  for rank, (p, i) in enumerate(sorted(finite)):
    if p > alpha / (m - rank):
      break
    rejected.add(i)
  return rejected


def test_holm_rejects_exactly_what_the_step_down_procedure_rejects():
  rng = np.random.default_rng(0)
  for trial in range(300):
    m = int(rng.integers(1, 8))
    p = list(rng.uniform(0, 0.2, m) ** rng.uniform(0.5, 3))
    if trial % 3 == 0:
      p[int(rng.integers(m))] = float("nan")
    adj = stats.holm(p)
    for i, (raw, a) in enumerate(zip(p, adj)):
      assert math.isnan(a) == math.isnan(raw)
      if math.isfinite(raw):
        assert raw <= a <= 1.0
    for alpha in (0.01, 0.05, 0.1):
      assert {i for i, a in enumerate(adj) if a <= alpha} == (
          holm_by_definition(p, alpha)), (p, alpha)


def test_holm_known_values():
  # m = 3, sorted 0.01, 0.03, 0.04: 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, then
  # 1 * 0.04 is raised to 0.06 so that the adjusted values keep the order.
  assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
  assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
  assert stats.holm([]) == []
