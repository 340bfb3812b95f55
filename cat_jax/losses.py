"""The base ranking loss (Eq. 3.5): BCE with one sampled negative per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bce_terms(W: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Per-position BCE, -log s(<W,pos>) - log(1 - s(<W,neg>)).

  Args:
    W: [..., d] user embeddings.
    pos, neg: [..., d] positive and negative item embeddings.

  Returns:
    [...] losses.
  """
  pos_logit = jnp.sum(W * pos, axis=-1)
  neg_logit = jnp.sum(W * neg, axis=-1)
  return jax.nn.softplus(-pos_logit) + jax.nn.softplus(neg_logit)


def weighted_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(x * w) / max(sum(w), 1): the mean over real (non-padding) steps."""
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def bce_loss(W, pos, neg, weights):
  """Eq. 3.5 averaged over the positions with weight 1 ([B, T] weights)."""
  return weighted_mean(bce_terms(W, pos, neg), weights)
