"""Full-ranking metrics: HR@K, NDCG@K and MRR over the whole catalog.

Protocol (stated once, used everywhere): every item 1..N is a candidate except
the padding item 0 and the items in `exclude` (the user's history); the target
itself is always a candidate. Ties count against the target:

  rank = #{candidates j : score_j >= score_target}      (so rank >= 1)
  HR@K = [rank <= K],  NDCG@K = [rank <= K] / log2(1 + rank),  MRR = 1 / rank.

A model that gives every item the same score therefore gets rank = #candidates
and HR@10 = 0, never a lucky hit.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def target_rank(scores: jax.Array, targets: jax.Array,
                exclude: jax.Array) -> jax.Array:
  """1-based pessimistic rank of each target among the candidates.

  Args:
    scores: [B, N+1] float, column 0 is the padding item.
    targets: [B] int, target item of each row (1..N).
    exclude: [B, N+1] bool, items that are not candidates. Column 0 and the
      target are handled here whatever `exclude` says.

  Returns:
    [B] int32 ranks.
  """
  # NumPy inputs work too (`.at` below needs JAX arrays).
  scores, targets, exclude = map(jnp.asarray, (scores, targets, exclude))
  rows = jnp.arange(scores.shape[0])
  target_score = scores[rows, targets]
  candidate = ~exclude
  candidate = candidate.at[:, 0].set(False).at[rows, targets].set(True)
  beats = (scores >= target_score[:, None]) & candidate
  return jnp.sum(beats, axis=1, dtype=jnp.int32)


def metrics_from_rank(rank: jax.Array, ks: Sequence[int] = (10,)) -> dict:
  """Per-row `ndcg@K`, `hr@K` for K in ks, and `mrr`, from 1-based ranks."""
  rank = jnp.asarray(rank)
  rank_f = rank.astype(jnp.float32)
  out = {}
  for k in ks:
    hit = rank <= k
    out[f"hr@{k}"] = hit.astype(jnp.float32)
    out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(rank_f + 1.0), 0.0)
  out["mrr"] = 1.0 / rank_f
  return out


def full_ranking_metrics(scores: jax.Array, targets: jax.Array,
                         exclude: jax.Array,
                         ks: Sequence[int] = (10,)) -> dict:
  """Per-user full-ranking metrics.

  Args:
    scores: [B, N+1] scores of every item (column 0 = padding).
    targets: [B] target items.
    exclude: [B, N+1] bool, history items to drop from the ranking (the
      target is kept even if marked).
    ks: cut-offs.

  Returns:
    dict with [B] float32 arrays "ndcg@K" and "hr@K" for each K, and "mrr".
  """
  return metrics_from_rank(target_rank(scores, targets, exclude), ks)
