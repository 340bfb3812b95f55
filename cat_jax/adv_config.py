"""What an adversarial method computes: `AdvConfig` and `method_config`.

A method name (`config.adv.method`) becomes the plain, hashable settings of
`adversarial.adv_step` (Tan et al., Sec. 4.1; the methods and every knob are
described in `adversarial`'s module docstring). Kept apart from the
perturbation math so that configs, launch-time checks and the compiled
program cache can read a method's structure without it.
"""

from __future__ import annotations

from typing import NamedTuple

METHODS = ("none", "linear", "seq", "global", "cas", "cas_temporal",
           "cas_cross")
CASCADE_METHODS = ("cas", "cas_temporal", "cas_cross")
SCOPES = ("row", "batch")
DIRECTIONS = ("input", "weighted")
BUDGETS = ("equal", "mean")
MAGNITUDES = ("uniform", "pamacf")
# AdvConfig fields that are plain numbers in every formula (never a shape or
# a branch), so they can be runtime inputs of a compiled step.
HYPERPARAMS = ("eps", "lambda1", "lambda2", "xi")


class AdvConfig(NamedTuple):
  """What `adv_step` computes; plain floats/strings so it is static under jit.

  level1: 'none', 'distance' (Eq. 4.6/4.7, L_adv1) or 'bce' (method `seq`).
  level2: whether to add L_adv2 (Eq. 4.8/4.9).
  eps: perturbation size (both levels). lambda1, lambda2: Eq. 4.10.
  xi: size of the random start for the level-1 `distance` search.
  scope: what one perturbation of size eps covers. 'row' (the issue's
    reading of Eq. 4.7/4.9): each sequence's [T, d] block at level 1, each
    d-vector at level 2. 'batch': the whole batch tensor (B, T, d) at both
    levels, so each row gets about eps / sqrt(B*T).
  relative: eps is a fraction of the norm of what is perturbed (over the
    same axes as the perturbation's norm; at level 1 over the real
    positions of S), not an absolute size.
  direction: level-1 direction, 'input' (Eq. 4.7) or 'weighted' (see the
    module docstring).
  budget: level-1 size, 'equal' (every method applies global's norm) or
    'mean' (w ⊙ A with the data-set-wide mean-1 weights).
  magnitude: per-user size, 'uniform' (eps everywhere) or 'pamacf' (eps
    times the user's factor c = sigmoid(||W|| - mean ||W||); see the module
    docstring).
  """
  level1: str = "none"
  level2: bool = False
  eps: float = 10.0
  lambda1: float = 1.0
  lambda2: float = 1.0
  xi: float = 1e-3
  scope: str = "row"
  relative: bool = False
  direction: str = "input"
  budget: str = "equal"
  magnitude: str = "uniform"

  def hyperparams(self) -> dict:
    """{'eps', 'lambda1', 'lambda2', 'xi'}: the values that change no shape.

    A train step can take them as runtime inputs (`with_hyperparams` inside
    the traced function), so that one compiled program serves every eps and
    every method that shares `structure()`.
    """
    return {k: getattr(self, k) for k in HYPERPARAMS}

  def with_hyperparams(self, hparams: dict | None) -> "AdvConfig":
    """This config with the values of `hparams` (traced arrays allowed)."""
    return self if hparams is None else self._replace(**hparams)

  def structure(self) -> "AdvConfig":
    """What shapes the computation graph: this config without the values of
    `hyperparams` (a hashable key: equal for global and the cascade methods
    at any eps, for instance)."""
    return self._replace(**{k: 0.0 for k in HYPERPARAMS})


def method_config(method: str, eps: float = 10.0, lambda1: float = 1.0,
                  lambda2: float = 1.0, xi: float = 1e-3,
                  scope: str = "row", relative: bool = False,
                  direction: str = "input",
                  budget: str = "equal",
                  magnitude: str = "uniform") -> AdvConfig:
  """AdvConfig of a named method; raises a clear error on bad values.

  Args:
    method: one of METHODS.
    eps, lambda1, lambda2, xi, scope, relative, direction, budget, magnitude:
      see `AdvConfig` (direction and budget act on level 1 only; magnitude
      on both levels, with any method).
  """
  if method not in METHODS:
    raise ValueError(
        f"Unknown adv.method {method!r}; choose one of {METHODS}.")
  if scope not in SCOPES:
    raise ValueError(f"Unknown adv.scope {scope!r}; choose one of {SCOPES}.")
  if direction not in DIRECTIONS:
    raise ValueError(f"Unknown adv.direction {direction!r}; choose one of "
                     f"{DIRECTIONS}.")
  if budget not in BUDGETS:
    raise ValueError(f"Unknown adv.budget {budget!r}; choose one of "
                     f"{BUDGETS}.")
  if magnitude not in MAGNITUDES:
    raise ValueError(f"Unknown adv.magnitude {magnitude!r}; choose one of "
                     f"{MAGNITUDES}.")
  for name, v in (("eps", eps), ("lambda1", lambda1), ("lambda2", lambda2),
                  ("xi", xi)):
    if not v >= 0:  # also catches NaN
      raise ValueError(f"adv.{name} must be >= 0, got {v}.")
  level1 = {"none": "none", "linear": "none", "seq": "bce"}.get(
      method, "distance")
  level2 = method not in ("none", "seq")
  return AdvConfig(level1=level1, level2=level2, eps=float(eps),
                   lambda1=float(lambda1), lambda2=float(lambda2), xi=float(xi),
                   scope=scope, relative=bool(relative), direction=direction,
                   budget=budget, magnitude=magnitude)
