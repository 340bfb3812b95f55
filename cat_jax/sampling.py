"""Exact negative sampling on the device.

A negative for a user is drawn uniformly from the items 1..N that are not in
the user's *whole* training history (not only the T-long window the model
sees), by rejection: draw, test membership by binary search in the user's
sorted history row, redraw the hits, until none is left. `data.build_arrays`
refuses users who have seen every item, so the loop ends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def in_history(history: jax.Array, items: jax.Array) -> jax.Array:
  """Whether each item is in its row's history.

  Args:
    history: [B, H] int, each row sorted ascending (padded with a sentinel
      larger than every item).
    items: [B, ...] int items to test.

  Returns:
    bool array shaped like `items`.
  """
  flat = items.reshape(items.shape[0], -1)
  idx = jax.vmap(jnp.searchsorted)(history, flat)
  idx = jnp.minimum(idx, history.shape[1] - 1)
  found = jnp.take_along_axis(history, idx, axis=1) == flat
  return found.reshape(items.shape)


def sample_negatives(rng: jax.Array, history: jax.Array, shape: tuple,
                     num_items: int) -> jax.Array:
  """Uniform items from 1..num_items outside each row's history.

  Args:
    rng: PRNG key.
    history: [B, H] sorted training histories (see `in_history`).
    shape: output shape, (B, ...).
    num_items: N.

  Returns:
    int32 array of `shape`, no entry in its row's history.
  """
  return _rejection_sample(rng, shape, num_items,
                           lambda neg: in_history(history, neg))


def _rejection_sample(rng: jax.Array, shape: tuple, num_items: int,
                      taken) -> jax.Array:
  """Uniform items from 1..num_items of `shape`, each redrawn until
  `taken(items)` (bool, shaped like `shape`) is False everywhere."""
  def draw(key):
    return jax.random.randint(key, shape, 1, num_items + 1, dtype=jnp.int32)

  def body(carry):
    key, neg, bad = carry
    key, sub = jax.random.split(key)
    neg = jnp.where(bad, draw(sub), neg)
    return key, neg, taken(neg)

  key, sub = jax.random.split(rng)
  neg = draw(sub)
  _, neg, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), body,
                                 (key, neg, taken(neg)))
  return neg


def in_history_at(history: jax.Array, rows: jax.Array,
                  items: jax.Array) -> jax.Array:
  """Whether items[i] is in history[rows[i]] (any shape, elementwise).

  A binary search that gathers one history entry per item and step, so the
  [*, H] histories of the rows are never materialized (packed batches have
  one user per token).

  Args:
    history: [U, H] sorted histories (see `in_history`).
    rows: int array, the history row of each item.
    items: int array shaped like `rows`.
  """
  H = history.shape[1]
  lo = jnp.zeros(items.shape, jnp.int32)
  hi = jnp.full(items.shape, H, jnp.int32)
  for _ in range(H.bit_length()):  # enough halvings of [0, H]
    mid = (lo + hi) // 2
    right = (lo < hi) & (history[rows, jnp.minimum(mid, H - 1)] < items)
    lo = jnp.where(right, mid + 1, lo)
    hi = jnp.where(right | (lo >= hi), hi, mid)
  return history[rows, jnp.minimum(lo, H - 1)] == items


def sample_negatives_at(rng: jax.Array, history: jax.Array, rows: jax.Array,
                        num_items: int) -> jax.Array:
  """As `sample_negatives`, one draw per entry of `rows` (any shape), each
  outside the history row it names."""
  return _rejection_sample(rng, rows.shape, num_items,
                           lambda neg: in_history_at(history, rows, neg))
