"""Adversarial training on two levels (Tan et al., Sec. 4.2, Eq. 4.6-4.10).

Level 1 perturbs the sequence item embeddings S [B, T, d] that enter the
encoder; level 2 perturbs the encoder's output W and the positive/negative item
embeddings that the BCE loss compares it with. Every perturbation is an
L2-normalized gradient computed inline with `jax.grad` and then held constant
(`stop_gradient`), so the whole thing lives inside one jitted train step.

The reusable entry point is `adv_step`: it needs only an encoder
`encode(S) -> W` (any JAX function; close over params and dropout rng), the
embeddings, and the step weights, and returns every loss term.

Methods (`config.adv.method`):
  none          L_B                      (keep training the base model)
  linear        L_B + l2 * L_adv2        (APR, He et al. 2018: level 2 only)
  seq           L_B + l1 * BCE(f(S + A)) (uniform sequence perturbation trained
                                          on the ranking loss: Miyato et al.
                                          2016 / SAO)
  global        L_B + l1 * L_adv1 + l2 * L_adv2   uniform level-1 weights
  cas           as global, level-1 weights 1/C (Eq. 4.11): the paper's method
  cas_temporal  as cas, C = temporal term only (1 + T - t)
  cas_cross     as cas, C = 1 + cross-user term only
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cat_jax import losses

METHODS = ("none", "linear", "seq", "global", "cas", "cas_temporal",
           "cas_cross")
CASCADE_METHODS = ("cas", "cas_temporal", "cas_cross")


class AdvConfig(NamedTuple):
  """What `adv_step` computes; plain floats/bools so it is static under jit.

  level1: 'none', 'distance' (Eq. 4.6/4.7, L_adv1) or 'bce' (method `seq`).
  level2: whether to add L_adv2 (Eq. 4.8/4.9).
  eps: perturbation size (both levels). lambda1, lambda2: Eq. 4.10.
  xi: size of the random start for the level-1 `distance` search.
  scope: what one perturbation of size eps covers. 'row' (the issue's
    reading of Eq. 4.7/4.9): each sequence's [T, d] block at level 1, each
    d-vector at level 2. 'batch': the whole batch tensor (B, T, d) at both
    levels, so each row gets about eps / sqrt(B*T).
  relative: eps is a fraction of the norm of what is perturbed (over the
    same axes as the perturbation's norm), not an absolute size.
  """
  level1: str = "none"
  level2: bool = False
  eps: float = 10.0
  lambda1: float = 1.0
  lambda2: float = 1.0
  xi: float = 1e-3
  scope: str = "row"
  relative: bool = False


SCOPES = ("row", "batch")


def method_config(method: str, eps: float = 10.0, lambda1: float = 1.0,
                  lambda2: float = 1.0, xi: float = 1e-3,
                  scope: str = "row", relative: bool = False) -> AdvConfig:
  """AdvConfig of a named method; raises a clear error on bad values."""
  if method not in METHODS:
    raise ValueError(
        f"Unknown adv.method {method!r}; choose one of {METHODS}.")
  if scope not in SCOPES:
    raise ValueError(f"Unknown adv.scope {scope!r}; choose one of {SCOPES}.")
  for name, v in (("eps", eps), ("lambda1", lambda1), ("lambda2", lambda2),
                  ("xi", xi)):
    if not v >= 0:  # also catches NaN
      raise ValueError(f"adv.{name} must be >= 0, got {v}.")
  level1 = {"none": "none", "linear": "none", "seq": "bce"}.get(
      method, "distance")
  level2 = method not in ("none", "seq")
  return AdvConfig(level1=level1, level2=level2, eps=float(eps),
                   lambda1=float(lambda1), lambda2=float(lambda2), xi=float(xi),
                   scope=scope, relative=bool(relative))


def l2_normalize(g: jax.Array, axes) -> jax.Array:
  """g / ||g||_2 over `axes` (0 where the norm is 0, never NaN)."""
  sq = jnp.sum(jnp.square(g), axis=axes, keepdims=True)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, g * jax.lax.rsqrt(safe), 0.0)


def safe_norm(x: jax.Array, axis=-1) -> jax.Array:
  """||x||_2 over `axis` with a finite gradient (0) at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def _size(eps: float, ref, axes):
  """eps, or eps * ||ref|| over `axes` when a reference (relative) is given."""
  if ref is None:
    return eps
  sq = jnp.sum(jnp.square(jax.lax.stop_gradient(ref)), axis=axes,
               keepdims=True)
  return eps * jnp.sqrt(sq)


def sequence_perturbation(grad: jax.Array, eps: float, scope: str = "row",
                          ref: jax.Array | None = None) -> jax.Array:
  """A = eps * g / ||g||_2 (Eq. 4.6) for g [B, T, d].

  The norm is over each sequence's [T, d] block (scope 'row') or over the
  whole batch (scope 'batch'). With `ref` (the clean S), the size is
  eps * ||ref|| over the same axes (relative eps).
  """
  axes = (-2, -1) if scope == "row" else None
  return jax.lax.stop_gradient(_size(eps, ref, axes) *
                               l2_normalize(grad, axes=axes))


def row_perturbation(grad: jax.Array, eps: float, scope: str = "row",
                     ref: jax.Array | None = None) -> jax.Array:
  """eps * h / ||h||_2 (Eq. 4.9) per d-vector (scope 'row') or per batch.

  With `ref`, the size is eps * ||ref|| over the same axes (relative eps).
  """
  axes = -1 if scope == "row" else None
  return jax.lax.stop_gradient(_size(eps, ref, axes) *
                               l2_normalize(grad, axes=axes))


def embedding_distance(encode: Callable, S, W, A, pert_w, weights):
  """L_adv1 (Eq. 4.7): mean over real steps of ||f(S + w*A)_t - f(S)_t||_2."""
  W_adv = encode(S + pert_w[..., None] * A)
  return losses.weighted_mean(safe_norm(W_adv - W), weights)


def level1_distance(encode, S, W, pert_w, weights, rng, cfg: AdvConfig):
  """Finds A (Eq. 4.6) and returns (L_adv1, A).

  The gradient of ||f(S + w*A) - f(S)|| is exactly zero at A = 0 (a minimum),
  so, as in virtual adversarial training (Miyato et al., 2018), the search
  starts from a random direction of size xi and takes the gradient there.
  """
  r = sequence_perturbation(jax.random.normal(rng, S.shape, S.dtype),
                            cfg.xi, cfg.scope)
  W_const = jax.lax.stop_gradient(W)
  S_const = jax.lax.stop_gradient(S)
  g = jax.grad(lambda a: embedding_distance(
      encode, S_const, W_const, a, pert_w, weights))(r)
  A = sequence_perturbation(g, cfg.eps, cfg.scope,
                            S if cfg.relative else None)
  return embedding_distance(encode, S, W, A, pert_w, weights), A


def level1_bce(encode, S, pos, neg, pert_w, weights, cfg: AdvConfig):
  """Method `seq`: BCE of the sequence perturbed along the BCE gradient."""
  def loss_at(a, S, pos, neg):
    return losses.bce_loss(encode(S + pert_w[..., None] * a), pos, neg,
                           weights)
  consts = [jax.lax.stop_gradient(x) for x in (S, pos, neg)]
  g = jax.grad(loss_at)(jnp.zeros_like(S), *consts)
  A = sequence_perturbation(g, cfg.eps, cfg.scope,
                            S if cfg.relative else None)
  return loss_at(A, S, pos, neg), A


def level2(W, pos, neg, weights, cfg: AdvConfig):
  """L_adv2 (Eq. 4.8/4.9): BCE with W, E_pos, E_neg each pushed by eps*h/||h||.

  Returns (L_adv2, (dW, dpos, dneg)).
  """
  consts = [jax.lax.stop_gradient(x) for x in (W, pos, neg)]
  grads = jax.grad(lambda w, p, n: losses.bce_loss(w, p, n, weights),
                   argnums=(0, 1, 2))(*consts)
  dW, dp, dn = (row_perturbation(g, cfg.eps, cfg.scope,
                                 x if cfg.relative else None)
                for g, x in zip(grads, consts))
  return losses.bce_loss(W + dW, pos + dp, neg + dn, weights), (dW, dp, dn)


def adv_step(encode: Callable[[jax.Array], jax.Array], S: jax.Array,
             pos: jax.Array, neg: jax.Array, weights: jax.Array,
             pert_w: jax.Array, rng: jax.Array, cfg: AdvConfig) -> dict:
  """All loss terms of Eq. 4.10 for one batch.

  Args:
    encode: S [B, T, d] -> W [B, T, d]; the model's encoder with its params
      and dropout rng bound (the same dropout mask for clean and perturbed
      passes, so their difference is due to the perturbation alone).
    S: [B, T, d] sequence item embeddings.
    pos, neg: [B, T, d] positive / negative item embeddings.
    weights: [B, T] 1 at steps with a target, 0 at padding.
    pert_w: [B, T] level-1 weights (1/C normalized, or 1 for uniform).
    rng: key for the level-1 random start.
    cfg: AdvConfig (see `method_config`).

  Returns:
    dict with 'loss' (total, Eq. 4.10), 'bce' (L_B), 'adv1', 'adv2'.
  """
  W = encode(S)
  bce = losses.bce_loss(W, pos, neg, weights)
  zero = jnp.zeros((), bce.dtype)
  adv1 = adv2 = zero
  if cfg.level1 == "distance":
    adv1, _ = level1_distance(encode, S, W, pert_w, weights, rng, cfg)
  elif cfg.level1 == "bce":
    adv1, _ = level1_bce(encode, S, pos, neg, pert_w, weights, cfg)
  elif cfg.level1 != "none":
    raise ValueError(f"unknown level1 {cfg.level1!r}")
  if cfg.level2:
    adv2, _ = level2(W, pos, neg, weights, cfg)
  total = bce + cfg.lambda1 * adv1 + cfg.lambda2 * adv2
  return {"loss": total, "bce": bce, "adv1": adv1, "adv2": adv2}


def make_objective(model, cfg: AdvConfig):
  """objective(params, batch, rng) -> (loss, terms) for the train step.

  batch: dict with 'inputs', 'targets', 'negatives' [B, T] int, 'weights' and
  'pert' [B, T] float.
  """
  def objective(params, batch, rng):
    drop_rng, adv_rng = jax.random.split(rng)
    inputs = batch["inputs"]
    mask = inputs > 0
    S = model.embed(params, inputs)
    E = model.items(params)
    pos, neg = E[batch["targets"]], E[batch["negatives"]]
    encode = lambda s: model.encode(params, s, mask, train=True, rng=drop_rng)
    terms = adv_step(encode, S, pos, neg, batch["weights"], batch["pert"],
                     adv_rng, cfg)
    return terms["loss"], terms
  return objective
