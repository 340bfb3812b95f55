"""Small statistics for reports: mean/std, a paired t-test and Holm's
correction (no SciPy)."""

from __future__ import annotations

import math
from typing import Sequence


def mean_std(x: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  n = len(x)
  m = sum(x) / n
  if n < 2:
    return m, 0.0
  return m, math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (Lentz)."""
  tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 300):
    m2 = 2 * m
    for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
               -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-12:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
  front = math.exp(lbeta + a * math.log(x) + b * math.log(1.0 - x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def paired_ttest(x: Sequence[float], y: Sequence[float]) -> dict:
  """Two-sided paired t-test of mean(x - y) = 0.

  Returns {'t', 'p', 'n'}; p is NaN for fewer than 2 pairs or zero spread.
  """
  if len(x) != len(y):
    raise ValueError("paired_ttest needs equally long samples")
  d = [a - b for a, b in zip(x, y)]
  n = len(d)
  m, s = mean_std(d)
  if n < 2 or s == 0.0:
    return {"t": float("nan"), "p": float("nan"), "n": n}
  t = m / (s / math.sqrt(n))
  df = n - 1
  p = betainc(df / 2.0, 0.5, df / (df + t * t))
  return {"t": t, "p": p, "n": n}


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values of one family of tests.

  With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted
  p_(i) is max over j <= i of min(1, (m - j + 1) p_(j)) (Holm 1979); a test
  is rejected at level a when its adjusted p-value is <= a, which controls
  the family-wise error rate at a. NaN p-values (no spread, one seed) are
  not tests: they stay NaN and do not count in m. Returns the adjusted
  values in the input order.
  """
  order = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
  m = len(order)
  out = [float("nan")] * len(pvalues)
  running = 0.0
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out
