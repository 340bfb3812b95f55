"""Cascade scores (Tan et al., Sec. 4.2, Eq. 4.11) and perturbation weights.

An interaction's cascade score counts how often its embedding is touched by
gradient updates during training: the later an item sits in a sequence, the
fewer later steps use it (temporal term), and the fewer other users share it,
the fewer times other batches update it (cross term). For the interaction of
user i at window position t (1..T) with item v = v_i^t:

  C(i, t) = (1 + T - t) + (b / m) * sum_{k != i} sum_{l : v_k^l = v} (1 + T - l)

with b the batch size and m the number of users (so b/m is the chance that a
given other user shares the batch). Level-1 perturbations are scaled by 1/C,
so rarely-trained interactions get larger ones (Sec. 4.1). How much each
sequence gets in total is set in `adversarial` (`adv.budget`): by default
every sequence gets the norm that uniform weights give, so only the ratios of
1/C within a sequence matter; with budget 'mean' the data-set-wide mean-1
normalization of `perturbation_weights` sets it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _position_values(seqs: jax.Array) -> jax.Array:
  """(1 + T - t) at real positions t = 1..T of the window, 0 at padding."""
  T = seqs.shape[1]
  value = (T - jnp.arange(T, dtype=jnp.float32))[None, :]  # 1 + T - t
  return jnp.where(seqs > 0, value, 0.0)


def cascade_scores(seqs: jax.Array, batch_size: int, *, temporal: bool = True,
                   cross: bool = True, num_items: int | None = None,
                   num_users: int | None = None) -> jax.Array:
  """Eq. 4.11 for every interaction of the training windows.

  Args:
    seqs: [m, T] int, left-padded training input windows (0 = padding), as
      the train step sees them.
    batch_size: b.
    temporal: keep the (1 + T - t) term; else it becomes the constant 1.
    cross: keep the cross-user term; else C = 1 + T - t.
    num_items: N (items are 1..N); defaults to seqs.max(), which needs a
      concrete array (pass it under `jit`).
    num_users: m of the b/m factor; defaults to the number of rows. Pass it
      when `seqs` has extra empty rows (tables padded for sharding).

  Returns:
    [m, T] float32, 0 at padding.

  Cost: one segment sum over items and one over (user, item) runs, so time
  and memory are linear in m*T (plus a per-row sort of length T).
  """
  if not (temporal or cross):
    raise ValueError("cascade_scores needs temporal=True or cross=True")
  seqs = jnp.asarray(seqs)
  m, T = seqs.shape
  real = seqs > 0
  p = _position_values(seqs)
  if num_items is None:
    num_items = int(jnp.max(seqs))
  if cross:
    # Sum over all users of (1 + T - l) per item, then remove user i's own
    # occurrences of the same item (the k != i of Eq. 4.11). Own occurrences
    # are found by sorting each row and summing runs of equal items.
    per_item = jax.ops.segment_sum(p.ravel(), seqs.ravel(),
                                   num_segments=num_items + 1)
    order = jnp.argsort(seqs, axis=1, stable=True)
    sorted_items = jnp.take_along_axis(seqs, order, axis=1)
    sorted_p = jnp.take_along_axis(p, order, axis=1)
    new_run = jnp.concatenate(
        [jnp.ones((m, 1), bool), sorted_items[:, 1:] != sorted_items[:, :-1]],
        axis=1)
    run_id = jnp.cumsum(new_run, axis=1) - 1 + (jnp.arange(m) * T)[:, None]
    run_sum = jax.ops.segment_sum(sorted_p.ravel(), run_id.ravel(),
                                  num_segments=m * T)
    own_sorted = run_sum[run_id]
    own = jnp.zeros_like(p).at[jnp.arange(m)[:, None], order].set(own_sorted)
    others = per_item[seqs] - own
    cross_term = (batch_size / (num_users or m)) * others
  else:
    cross_term = 0.0
  base = p if temporal else 1.0
  return jnp.where(real, base + cross_term, 0.0)


def perturbation_weights(C: jax.Array, mask: jax.Array) -> jax.Array:
  """Level-1 weights 1/C, re-normalized to mean 1 over the real positions.

  The paper re-normalizes the average cascade value to 1 so that every method
  spends the same total perturbation (Sec. 5.5); this does it for the weights
  that multiply the perturbation over the whole data set (uniform weights
  are exactly 1). That is what `adv.budget='mean'` spends; the default
  `adv.budget='equal'` rescales each sequence's perturbation to the norm
  uniform weights give (`adversarial.budgeted_perturbation`), where the
  overall scale of these weights cancels. Weights are > 0 exactly at the
  real positions, which is how `adversarial` tells them from padding.

  Args:
    C: [m, T] cascade scores (> 0 where mask).
    mask: [m, T] bool, real (non-padding) positions.

  Returns:
    [m, T] float32, 0 at padding, mean 1 over `mask`.
  """
  inv = jnp.where(mask, 1.0 / jnp.where(mask, C, 1.0), 0.0)
  return inv * (jnp.sum(mask) / jnp.maximum(jnp.sum(inv), 1e-30))


def weights_for_method(seqs, batch_size: int, method: str,
                       num_users: int | None = None):
  """[m, T] level-1 weights of a training method (see adversarial.METHODS).

  `num_users` is m of Eq. 4.11 when `seqs` has padding rows (see
  `cascade_scores`).
  """
  seqs = jnp.asarray(seqs)
  variants = {"cas": (True, True), "cas_temporal": (True, False),
              "cas_cross": (False, True)}
  if method not in variants:
    return (seqs > 0).astype(jnp.float32)  # uniform
  temporal, cross = variants[method]
  return _cascade_weights(seqs, batch_size, temporal, cross,
                          int(jnp.max(seqs)), num_users)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _cascade_weights(seqs, batch_size, temporal, cross, num_items, num_users):
  """1/C weights as one compiled program (op by op, the segment sums and
  sorts of Eq. 4.11 each compile on their own: ~2 s on a CPU)."""
  C = cascade_scores(seqs, batch_size, temporal=temporal, cross=cross,
                     num_items=num_items, num_users=num_users)
  return perturbation_weights(C, seqs > 0)
