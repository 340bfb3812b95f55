"""Adversarial training on two levels (Tan et al., Sec. 4.1, Eq. 4.6-4.10).

Level 1 perturbs the sequence item embeddings S [B, T, d] that enter the
encoder; level 2 perturbs the encoder's output W and the positive/negative item
embeddings that the BCE loss compares it with. Every perturbation is an
L2-normalized gradient computed inline with `jax.grad` and then held constant
(`stop_gradient`), so the whole thing lives inside one jitted train step.

The reusable entry point is `adv_step`: it needs only an encoder
`encode(S) -> W` (any JAX function; close over params and dropout rng), the
embeddings, and the step weights, and returns every loss term.
`level1_perturbation` returns the level-1 perturbation that `adv_step` adds
to S, to inspect what each method does.

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

Level 1 (Eq. 4.6/4.7). With w the level-1 weights ([B, T], 1/C or uniform,
0 at padding), the encoder sees S + delta, delta = w ⊙ A, and
  direction 'input' (default, Eq. 4.7): A = eps g / ||g||, g = dL/dX the
    gradient of the level-1 loss with respect to the encoder input X (for
    `distance`, taken at the random start X = S + delta_0 of virtual
    adversarial training; for `seq`, at X = S);
  direction 'weighted': A = eps g_A / ||g_A||, g_A = dL(S + w ⊙ A)/dA = w ⊙ g,
    the first-order maximizer of L(S + w ⊙ A) over ||A|| <= eps; the applied
    delta is then proportional to w^2 ⊙ g (the code before issue 12).
How much is spent (Sec. 5.5: every method adds the same total magnitude):
  budget 'equal' (default): delta is rescaled so that ||delta|| is what
    `global` applies, eps per sequence (scope 'row') or in total over the
    batch (scope 'batch'); the weights only redistribute it across positions,
    so their overall scale does not matter;
  budget 'mean': delta = w ⊙ A with the weights as given (`cascade` normalizes
    1/C to mean 1 over the whole data set), so a sequence's ||delta|| varies.
Every level-1 norm, the random start and the relative size (`relative`) are
taken over the real positions only (w > 0), and the random start is drawn per
position counted from the end of the window, so a left-padded sequence gets
the same perturbation whatever the amount of padding (same rng).

Packed rows (`packing`, `train.layout=packed`) hold several sequences per
row; `segments` ([B, T] sequence ids) then makes every per-sequence norm
and factor above a per-sequence one instead of a per-row one.

Per-user magnitude (`magnitude`, beyond the paper). 'uniform' (default): every
perturbation has size eps, as above. 'pamacf' follows PamaCF (Zhang et al.,
"Understanding and Improving Adversarial Collaborative Filtering for Robust
Recommendation", arXiv 2410.22844, Sec. 4): user u's perturbation has size
rho * c(u, t) with c(u, t) = sigmoid(||u(t)|| - mean_u' ||u'(t)||), here
rho = eps and u(t) the user embedding W [B, T, d], one per position (each
position of a sequence is one user state that the BCE compares with an item):
  c_bt = sigmoid(||W_bt|| - mean ||W||), the mean over the batch's real
  positions (loss weights > 0).
PamaCF averages over the users at the current epoch; here W is a function of
the whole sequence through the encoder, so an average over every user would
need a forward pass over the whole data set at every step: the batch mean is
the mini-batch estimate of it (padding, and the fill rows of the last batch,
are left out). The factor is held constant (`stop_gradient`), as the
perturbation itself is. `magnitude_factors` computes it.
  Level 2: W_bt, E_pos,bt and E_neg,bt are each moved by eps * c_bt. The
    item perturbations too (a choice: PamaCF names the user's magnitude;
    the positive and negative items at (b, t) enter the same loss term of
    the same user state, as in APR, and scaling W alone would mix two sizes
    in one term).
  Level 1: sequence b's size (the s of `budgeted_perturbation`, either
    budget) becomes eps * c_b with c_b the mean of c_bt over its real
    positions: the user's states over the window, with the same factors and
    centering as level 2, so that the two levels do not drift apart (the
    last position's W, the one used for ranking, is one of them). The random
    start (xi) is not scaled: it only picks where the gradient is taken.
With equal norms everywhere every factor is sigmoid(0) = 1/2, so 'pamacf'
spends on average about half of 'uniform' at the same eps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cat_jax import losses

# The method's settings live in `adv_config`; their names stay importable
# from here, the module that uses them (`adversarial.method_config`).
from cat_jax.adv_config import (  # noqa: F401
    BUDGETS, CASCADE_METHODS, DIRECTIONS, HYPERPARAMS, MAGNITUDES, METHODS,
    SCOPES, AdvConfig, method_config)


def l2_normalize(g: jax.Array, axes) -> jax.Array:
  """g / ||g||_2 over `axes` (0 where the norm is 0, never NaN)."""
  return _divide_by_norm(g, jnp.sum(jnp.square(g), axis=axes, keepdims=True))


def _divide_by_norm(g: jax.Array, sq: jax.Array) -> jax.Array:
  """g / sqrt(sq), 0 where sq is 0: `sq` is g's sum of squares over the
  entries of one norm, broadcast to g."""
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, g * jax.lax.rsqrt(safe), 0.0)


def safe_norm(x: jax.Array, axis=-1) -> jax.Array:
  """||x||_2 over `axis` with a finite gradient (0) at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def magnitude_factors(W: jax.Array, weights: jax.Array) -> jax.Array:
  """PamaCF's c = sigmoid(||W_bt|| - mean ||W||) per position, [B, T].

  c(u, t) of Zhang et al. (arXiv 2410.22844, Sec. 4) with one user
  embedding per position: ||W_bt|| is the L2 norm of W [B, T, d] over d, and
  the mean is over the batch's real positions (weights > 0; see the module
  docstring for why the batch and not every user). Constant
  (`stop_gradient`); a batch without real positions gets sigmoid(||W||).

  Args:
    W: [B, T, d] user embeddings (the encoder's output).
    weights: [B, T] loss weights, > 0 at the real positions.
  """
  norms = safe_norm(jax.lax.stop_gradient(W).astype(jnp.float32))
  real = (weights > 0).astype(norms.dtype)
  mean = jnp.sum(norms * real) / jnp.maximum(jnp.sum(real), 1.0)
  return jax.lax.stop_gradient(jax.nn.sigmoid(norms - mean))


def sequence_factors(W: jax.Array, weights: jax.Array,
                     segments: jax.Array | None = None) -> jax.Array:
  """[B]: each sequence's level-1 factor, the mean of `magnitude_factors`
  over its real positions (0 for a sequence without one).

  With `segments` ([B, T] ids of packed sequences, `packing`), [B, T]: the
  factor of each position's own sequence.
  """
  c = magnitude_factors(W, weights)
  real = (weights > 0).astype(c.dtype)
  if segments is not None:
    return (sequence_sum(c * real, segments) /
            jnp.maximum(sequence_sum(real, segments), 1.0))
  return jnp.sum(c * real, axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1.0)


def sequence_sum(x: jax.Array, segments: jax.Array) -> jax.Array:
  """[B, T]: at each position, the sum of x [B, T] over its sequence.

  segments: [B, T] int ids in 0..B*T (`packing.batch_rows`); positions
  with equal ids belong to one sequence, wherever they are in the batch.
  """
  B, T = x.shape
  total = jax.ops.segment_sum(x.ravel(), segments.ravel(),
                              num_segments=B * T + 1)
  return total[segments]


def _level1_sq(x: jax.Array, scope: str,
               segments: jax.Array | None = None) -> jax.Array:
  """Sum of squares of x [B, T, d] over each level-1 norm's entries,
  broadcastable to x: per sequence (scope 'row'; per packed sequence with
  `segments`) or over the batch."""
  if scope == "row" and segments is not None:
    return sequence_sum(jnp.sum(jnp.square(x), axis=-1), segments)[..., None]
  return jnp.sum(jnp.square(x), axis=_level1_axes(scope), keepdims=True)


def _size(eps: float, ref, axes):
  """eps, or eps * ||ref|| over `axes` when a reference (relative) is given."""
  if ref is None:
    return eps
  sq = jnp.sum(jnp.square(jax.lax.stop_gradient(ref)), axis=axes,
               keepdims=True)
  return eps * jnp.sqrt(sq)


def _level1_axes(scope: str):
  """Axes of one level-1 norm of a [B, T, d] tensor."""
  return (-2, -1) if scope == "row" else None


def sequence_perturbation(grad: jax.Array, eps: float, scope: str = "row",
                          ref: jax.Array | None = None) -> jax.Array:
  """A = eps * g / ||g||_2 (Eq. 4.7) for g [B, T, d].

  The norm is over each sequence's [T, d] block (scope 'row') or over the
  whole batch (scope 'batch'). With `ref` (the clean S), the size is
  eps * ||ref|| over the same axes (relative eps).
  """
  axes = _level1_axes(scope)
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


def budgeted_perturbation(direction: jax.Array, pert_w: jax.Array, eps,
                          cfg: AdvConfig,
                          ref: jax.Array | None = None,
                          segments: jax.Array | None = None) -> jax.Array:
  """The applied level-1 perturbation delta [B, T, d] along `direction`.

  Eq. 4.6/4.7 with the budget rule of `cfg.budget` (module docstring):
    'equal': delta = s * (w ⊙ d) / ||w ⊙ d||  (||delta|| = s, global's size);
    'mean':  delta = w ⊙ (s * d / ||d||).
  s is `eps`, or eps * ||ref|| with `ref` (relative eps); every norm is over
  each sequence's real positions (scope 'row') or the batch's (scope
  'batch'). Padding positions (w <= 0) get 0.

  Args:
    direction: [B, T, d], e.g. the gradient g of Eq. 4.7.
    pert_w: [B, T] level-1 weights; w > 0 marks the real positions.
    eps: size (python float or array broadcastable to [B, 1, 1]).
    cfg: AdvConfig (its scope and budget).
    ref: optional [B, T, d] reference (S) for a relative size.
    segments: optional [B, T] ids of packed sequences (`packing`): the
      'row' norms are then taken per sequence, not per row.
  """
  real = (pert_w > 0)[..., None]
  w = jnp.where(real, pert_w[..., None], 0.0).astype(direction.dtype)
  d = jnp.where(real, direction, 0.0)
  sq = lambda x: _level1_sq(x, cfg.scope, segments)
  size = eps if ref is None else eps * jnp.sqrt(
      sq(jax.lax.stop_gradient(jnp.where(real, ref, 0.0))))
  if cfg.budget == "equal":
    return size * _divide_by_norm(w * d, sq(w * d))
  if cfg.budget == "mean":
    return w * (size * _divide_by_norm(d, sq(d)))
  raise ValueError(f"Unknown adv.budget {cfg.budget!r}; choose one of "
                   f"{BUDGETS}.")


def start_noise(rng: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """[B, T, d] standard normal noise, drawn per position from the window's end.

  Position t uses the key fold_in(rng, T - 1 - t), so the noise at the last
  k positions does not depend on T: a sequence run with less left padding
  (a shorter window) sees the same noise on its items.
  """
  B, T, d = shape
  offsets = T - 1 - jnp.arange(T)
  noise = jax.vmap(lambda o: jax.random.normal(jax.random.fold_in(rng, o),
                                               (B, d), dtype))(offsets)
  return jnp.swapaxes(noise, 0, 1)


def level1_start(rng: jax.Array, pert_w: jax.Array, shape,
                 cfg: AdvConfig, dtype=jnp.float32,
                 segments: jax.Array | None = None) -> jax.Array:
  """delta_0 [B, T, d]: the random start of the level-1 search.

  The gradient of ||f(S + delta) - f(S)|| is exactly zero at delta = 0 (a
  minimum), so, as in virtual adversarial training (Miyato et al., 2018),
  it is taken at a random perturbation of size xi: `start_noise` on the real
  positions, spent by the same budget rule as the final perturbation
  (`budgeted_perturbation` with eps = xi, never relative).
  """
  return budgeted_perturbation(start_noise(rng, shape, dtype), pert_w,
                               cfg.xi, cfg, segments=segments)


def level1_perturbation(encode: Callable[[jax.Array], jax.Array],
                        S: jax.Array, pert_w: jax.Array, rng: jax.Array,
                        cfg: AdvConfig, *, weights: jax.Array | None = None,
                        pos: jax.Array | None = None,
                        neg: jax.Array | None = None,
                        W: jax.Array | None = None,
                        segments: jax.Array | None = None) -> jax.Array:
  """The level-1 perturbation delta [B, T, d] that `adv_step` adds to S.

  Eq. 4.6: the encoder sees S + delta with delta = w ⊙ A (here w = pert_w
  stands for 1/C_i); Eq. 4.7: A = eps g / ||g||. For `cfg.level1`:
    'distance' (L_adv1, methods global and cas*): g is the gradient of
      L_adv1 = mean_t ||f(X)_t - f(S)_t|| with respect to the encoder input
      X, at X = S + `level1_start` (rng);
    'bce' (method seq): g is the gradient of the BCE loss f(X) vs pos/neg at
      X = S (rng unused);
    'none': zeros.
  `cfg.direction` 'weighted' uses w ⊙ g instead of g (the gradient with
  respect to A); `cfg.budget` sets the size (`budgeted_perturbation`), and
  `cfg.magnitude` 'pamacf' multiplies each sequence's eps by
  `sequence_factors(W, weights)` (module docstring).
  The result is a constant (`stop_gradient`).

  Args:
    encode: S [B, T, d] -> W [B, T, d].
    S: [B, T, d] sequence item embeddings.
    pert_w: [B, T] level-1 weights, > 0 exactly at the real positions (1/C
      normalized, or 1 for uniform; `cascade.weights_for_method`).
    rng: key of the random start.
    cfg: AdvConfig (`method_config`).
    weights: [B, T] loss weights (1 at steps with a target); defaults to
      pert_w > 0.
    pos, neg: [B, T, d] positive / negative item embeddings (level1 'bce').
    W: encode(S), when already computed (saves one encoder pass; also
      what the 'pamacf' factors are computed from).
    segments: [B, T] ids of packed sequences (`packing`; `encode` must
      use the same): every per-sequence norm and factor is then per
      sequence, not per row.

  Returns:
    [B, T, d], 0 at padding positions.
  """
  S = jax.lax.stop_gradient(S)
  if cfg.level1 == "none":
    return jnp.zeros_like(S)
  if weights is None:
    weights = (pert_w > 0).astype(S.dtype)
  if cfg.level1 == "distance":
    W = jax.lax.stop_gradient(encode(S) if W is None else W)
    X0 = S + level1_start(rng, pert_w, S.shape, cfg, S.dtype, segments)
    loss = lambda x: losses.weighted_mean(safe_norm(encode(x) - W), weights)
  elif cfg.level1 == "bce":
    if pos is None or neg is None:
      raise ValueError("level1 'bce' (method seq) needs pos and neg.")
    pos, neg = jax.lax.stop_gradient(pos), jax.lax.stop_gradient(neg)
    X0 = S
    loss = lambda x: losses.bce_loss(encode(x), pos, neg, weights)
  else:
    raise ValueError(f"unknown level1 {cfg.level1!r}")
  g = jax.grad(loss)(X0)
  if cfg.direction == "weighted":
    g = pert_w[..., None].astype(g.dtype) * g
  elif cfg.direction != "input":
    raise ValueError(f"Unknown adv.direction {cfg.direction!r}; choose one "
                     f"of {DIRECTIONS}.")
  eps = _level1_eps(encode, S, W, weights, cfg, segments)
  delta = budgeted_perturbation(g, pert_w, eps, cfg,
                                S if cfg.relative else None, segments)
  return jax.lax.stop_gradient(delta)


def _level1_eps(encode, S, W, weights, cfg: AdvConfig, segments=None):
  """eps, or per sequence eps * c_b [B, 1, 1] with magnitude 'pamacf'
  ([B, T, 1] with packed `segments`)."""
  if cfg.magnitude == "uniform":
    return cfg.eps
  if cfg.magnitude != "pamacf":
    raise ValueError(f"Unknown adv.magnitude {cfg.magnitude!r}; choose one "
                     f"of {MAGNITUDES}.")
  W = jax.lax.stop_gradient(encode(S) if W is None else W)
  c = sequence_factors(W, weights, segments)
  c = c[..., None] if segments is not None else c[:, None, None]
  return cfg.eps * c.astype(S.dtype)


def embedding_distance(encode: Callable, S, W, delta, weights):
  """L_adv1 (Eq. 4.6): mean over real steps of ||f(S + delta)_t - f(S)_t||_2.

  delta [B, T, d] is the applied perturbation (w ⊙ A).
  """
  W_adv = encode(S + delta)
  return losses.weighted_mean(safe_norm(W_adv - W), weights)


def level1_distance(encode, S, W, pert_w, weights, rng, cfg: AdvConfig,
                    segments=None):
  """(L_adv1, delta): Eq. 4.6 at delta = `level1_perturbation` (distance)."""
  delta = level1_perturbation(encode, S, pert_w, rng,
                              cfg._replace(level1="distance"),
                              weights=weights, W=W, segments=segments)
  return embedding_distance(encode, S, W, delta, weights), delta


def level1_bce(encode, S, pos, neg, pert_w, weights, cfg: AdvConfig,
               segments=None):
  """Method `seq`: (BCE of f(S + delta), delta), delta along its gradient."""
  delta = level1_perturbation(encode, S, pert_w, None,
                              cfg._replace(level1="bce"), weights=weights,
                              pos=pos, neg=neg, segments=segments)
  return losses.bce_loss(encode(S + delta), pos, neg, weights), delta


def level2(W, pos, neg, weights, cfg: AdvConfig):
  """L_adv2 (Eq. 4.8/4.9): BCE with W, E_pos, E_neg each pushed by eps*h/||h||.

  With magnitude 'pamacf', eps becomes eps * c_bt at each position
  (`magnitude_factors(W, weights)`, for all three; module docstring).
  Returns (L_adv2, (dW, dpos, dneg)).
  """
  consts = [jax.lax.stop_gradient(x) for x in (W, pos, neg)]
  grads = jax.grad(lambda w, p, n: losses.bce_loss(w, p, n, weights),
                   argnums=(0, 1, 2))(*consts)
  if cfg.magnitude == "uniform":
    eps = cfg.eps
  elif cfg.magnitude == "pamacf":
    eps = cfg.eps * magnitude_factors(consts[0], weights)[..., None].astype(
        consts[0].dtype)
  else:
    raise ValueError(f"Unknown adv.magnitude {cfg.magnitude!r}; choose one "
                     f"of {MAGNITUDES}.")
  dW, dp, dn = (row_perturbation(g, eps, cfg.scope,
                                 x if cfg.relative else None)
                for g, x in zip(grads, consts))
  return losses.bce_loss(W + dW, pos + dp, neg + dn, weights), (dW, dp, dn)


def adv_step(encode: Callable[[jax.Array], jax.Array], S: jax.Array,
             pos: jax.Array, neg: jax.Array, weights: jax.Array,
             pert_w: jax.Array, rng: jax.Array, cfg: AdvConfig,
             segments: jax.Array | None = None) -> dict:
  """All loss terms of Eq. 4.10 for one batch.

  Args:
    encode: S [B, T, d] -> W [B, T, d]; the model's encoder with its params
      and dropout rng bound (the same dropout mask for clean and perturbed
      passes, so their difference is due to the perturbation alone).
    S: [B, T, d] sequence item embeddings.
    pos, neg: [B, T, d] positive / negative item embeddings.
    weights: [B, T] 1 at steps with a target, 0 at padding.
    pert_w: [B, T] level-1 weights (1/C normalized, or 1 for uniform), 0
      exactly at padding.
    rng: key for the level-1 random start.
    cfg: AdvConfig (see `method_config`). The level-1 perturbation is
      `level1_perturbation(encode, S, pert_w, rng, cfg, weights=weights,
      pos=pos, neg=neg)`.
    segments: optional [B, T] ids of the sequences of packed rows
      (`packing.batch_rows`; `encode` must use the same): level-1 norms and
      factors are then per sequence. Level 2 is per position either way.

  Returns:
    dict with 'loss' (total, Eq. 4.10), 'bce' (L_B), 'adv1', 'adv2'.
  """
  W = encode(S)
  bce = losses.bce_loss(W, pos, neg, weights)
  zero = jnp.zeros((), bce.dtype)
  adv1 = adv2 = zero
  if cfg.level1 != "none":
    delta = level1_perturbation(encode, S, pert_w, rng, cfg, weights=weights,
                                pos=pos, neg=neg, W=W, segments=segments)
    if cfg.level1 == "distance":
      adv1 = embedding_distance(encode, S, W, delta, weights)
    else:  # 'bce' (seq)
      adv1 = losses.bce_loss(encode(S + delta), pos, neg, weights)
  if cfg.level2:
    adv2, _ = level2(W, pos, neg, weights, cfg)
  total = bce + cfg.lambda1 * adv1 + cfg.lambda2 * adv2
  return {"loss": total, "bce": bce, "adv1": adv1, "adv2": adv2}


def make_objective(model, cfg: AdvConfig):
  """objective(params, batch, rng, hparams=None) -> (loss, terms).

  batch: dict with 'inputs', 'targets', 'negatives' [B, T] int, 'weights' and
  'pert' [B, T] float; packed rows add 'segments' and 'positions' [B, T]
  int (`packing.batch_rows`). `hparams` ({'eps', 'lambda1', 'lambda2',
  'xi'}, scalars that may be traced) replace those values of `cfg`: then only
  `cfg.structure()` is baked into a compiled step.
  """
  def objective(params, batch, rng, hparams=None):
    cfg_ = cfg.with_hyperparams(hparams)
    drop_rng, adv_rng = jax.random.split(rng)
    inputs = batch["inputs"]
    mask = inputs > 0
    S = model.embed(params, inputs)
    E = model.items(params)
    pos, neg = E[batch["targets"]], E[batch["negatives"]]
    segments = batch.get("segments")
    encode = lambda s: model.encode(params, s, mask, train=True, rng=drop_rng,
                                    segments=segments,
                                    positions=batch.get("positions"))
    terms = adv_step(encode, S, pos, neg, batch["weights"], batch["pert"],
                     adv_rng, cfg_, segments=segments)
    return terms["loss"], terms
  return objective
