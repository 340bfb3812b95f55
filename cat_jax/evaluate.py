"""Full-ranking evaluation of every user, batched and jitted.

The device computes one integer rank per user (see `metrics.target_rank`);
the host turns ranks into sums and a denominator in float64 and divides, so
the numbers do not depend on the batch size or the device count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cat_jax import batching, compilation, metrics, sharding


def history_mask(history: jax.Array, extra: jax.Array,
                 num_items: int) -> jax.Array:
  """[B, N+1] bool: True at each row's history items and at `extra`.

  Args:
    history: [B, H] item ids; ids > N (the sentinel) are ignored.
    extra: [B] one more item per row to exclude (0 for none).
    num_items: N.
  """
  B = history.shape[0]
  rows = jnp.arange(B)
  mask = jnp.zeros((B, num_items + 1), jnp.bool_)
  mask = mask.at[rows[:, None], history].set(True, mode="drop")
  return mask.at[rows, extra].set(True)


def user_embeddings(model, params, inputs):
  """W_T [B, d]: the user embedding after the last step of each window."""
  S = model.embed(params, inputs)
  return model.encode(params, S, inputs > 0, train=False)[:, -1]


def model_scores(model) -> Callable:
  """scores(params, inputs [B, T]) -> [B, N+1]: <W_T, E_j> at the last step."""
  def scores(params, inputs):
    return user_embeddings(model, params, inputs) @ model.items(params).T
  return scores


def map_batches(fn: Callable, arrays: tuple, batch_size: int) -> jax.Array:
  """fn(batch_index, *batch) over row batches of `arrays`, in one `lax.map`.

  The rows (leading axis, E of them) are zero-padded to a multiple of
  batch_size, so every batch has the same shape and compiles once; fn's
  outputs ([batch_size, ...]) are concatenated and trimmed back to E rows.
  Memory is that of one batch, whatever E is.
  """
  E = arrays[0].shape[0]
  nb = -(-E // batch_size)
  pad = nb * batch_size - E

  def batched(x):
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((nb, batch_size) + x.shape[1:])

  out = jax.lax.map(lambda xs: fn(*xs),
                    (jnp.arange(nb),) + tuple(batched(a) for a in arrays))
  return out.reshape((nb * batch_size,) + out.shape[2:])[:E]


def make_ranker(score_fn: Callable, num_items: int, batch_size: int,
                mesh=None, runs: bool = False,
                plan: batching.EvalPlan | None = None, program=None):
  """Jitted ranks(params, inputs, targets, users, extra, history) -> [E] int32.

  Args of the returned function:
    params: anything `score_fn` takes.
    inputs: [E, T] input windows; targets: [E] items.
    users: [E] row of each user in `history`.
    extra: [E] one more item to exclude (the validation item when testing).
    history: [U, H] training histories (sorted, padded with N+1).

  With a `mesh`, the users of each batch are split across its devices and
  the ranks come back replicated (readable on every host). With `runs=True`,
  params carry a leading run axis and ranks are [R, E]. Rows whose target is
  0 (padding of sharded tables) get rank 0, which `summarize` skips.
  With a length-bucket `plan` (`batching.eval_plan`), each bucket's rows are
  scored on their last T_b columns only; the ranks are the same.
  `program`: the `.program` of an earlier ranker of the same arguments
  (plans of the same shape), reused instead of building a new one.
  """
  sharding.check_divisible(batch_size, mesh, "eval.batch_size")
  if program is not None:
    return _with_rows(program, plan, mesh)

  def ranks(params, inputs, targets, users, extra, history):
    def one(_, *xs):
      x, t, u, e = (sharding.shard_rows(a, mesh) for a in xs)
      exclude = history_mask(history[u], e, num_items)
      return _skip_padding(
          metrics.target_rank(score_fn(params, x), t, exclude), t)

    return map_batches(one, (inputs, targets, users, extra), batch_size)

  ranks = batching.bucketed(ranks, plan)
  if runs:
    ranks = jax.vmap(ranks, in_axes=(None, 0) + (None,) * 5)
  return _with_rows(_jit_replicated(ranks, mesh), plan, mesh)


def _with_rows(program, plan, mesh):
  """ranks(params, ...) calling the jitted `program(rows, params, ...)` of a
  `batching.bucketed` ranker with the plan's rows; `.program` is the jitted
  function (its compile cache, `lower`)."""
  rows = batching.row_arrays(plan)
  if mesh is not None:
    rows = sharding.replicate(rows, mesh)

  def ranks(*args):
    return program(rows, *args)

  ranks.program = program
  ranks._cache_size = program._cache_size  # noqa: SLF001 (as jax's)
  return ranks


def _skip_padding(ranks, targets):
  return jnp.where(targets > 0, ranks, 0)


def _jit_replicated(fn, mesh):
  options = compilation.compiler_options()
  if mesh is None:
    return jax.jit(fn, compiler_options=options)
  return jax.jit(fn, out_shardings=sharding.replicated(mesh),
                 compiler_options=options)


def make_chunked_ranker(model, num_items: int, batch_size: int,
                        item_chunk: int, mesh=None, shard_items: bool = False,
                        plan: batching.EvalPlan | None = None, program=None):
  """As `make_ranker` for a model, holding [batch, item_chunk] scores at most.

  For catalogs whose [batch_size, N+1] score matrix does not fit: the items
  are scored `item_chunk` at a time and only counts are kept, so memory is
  O(batch_size * item_chunk) whatever N is. The rank is the same pessimistic
  full-ranking rank, 1 + #{candidates j != target : score_j >= score_target}.

  With `shard_items=True` and a mesh of D devices, the catalog is split
  instead of the users: each device scores every user of the batch against
  its N/D items (`jax.shard_map`), and the per-device counts are summed
  (`psum`). Ranks need counts only, so there is no top-k to merge.
  A length-bucket `plan` and `program` work as in `make_ranker`.
  """
  if program is not None:
    return _with_rows(program, plan, mesh)
  n_dev = mesh.size if (shard_items and mesh is not None) else 1
  if n_dev == 1:
    sharding.check_divisible(batch_size, mesh, "eval.batch_size")
  n_chunks = -(-(num_items + 1) // item_chunk)
  n_chunks = -(-n_chunks // n_dev) * n_dev

  def count_chunks(table, W, target_score, t, taken, first_chunk):
    """#candidates beating the target in table [chunks, item_chunk, d]."""
    rows = jnp.arange(W.shape[0])[:, None]

    def count(c):
      start = (first_chunk + c) * item_chunk
      ids = start + jnp.arange(item_chunk)
      # History items outside this chunk go to an out-of-range slot.
      local = jnp.where(taken >= start, taken - start, item_chunk)
      excluded = jnp.zeros((W.shape[0], item_chunk), jnp.bool_).at[
          rows, local].set(True, mode="drop")
      candidate = ((ids >= 1) & (ids <= num_items))[None] & ~excluded & (
          ids[None] != t[:, None])
      beats = (W @ table[c].T) >= target_score[:, None]
      return jnp.sum(beats & candidate, axis=1, dtype=jnp.int32)

    return jnp.sum(jax.lax.map(count, jnp.arange(table.shape[0])), axis=0)

  if n_dev > 1:
    def per_device(table, *xs):
      first = jax.lax.axis_index(sharding.AXIS) * table.shape[0]
      return jax.lax.psum(count_chunks(table, *xs, first), sharding.AXIS)

    counter = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(sharding.AXIS),) + (P(),) * 4,
        out_specs=P())
  else:
    counter = lambda table, *xs: count_chunks(table, *xs, 0)

  def ranks(params, inputs, targets, users, extra, history):
    E = model.items(params)
    table = jnp.concatenate(
        [E, jnp.zeros((n_chunks * item_chunk - E.shape[0], E.shape[1]),
                      E.dtype)]).reshape(n_chunks, item_chunk, -1)

    def one(_, x, t, u, e):
      if n_dev == 1:
        x, t, u, e = (sharding.shard_rows(a, mesh) for a in (x, t, u, e))
      W = user_embeddings(model, params, x)
      target_score = jnp.sum(W * E[t], axis=-1)
      taken = jnp.concatenate([history[u], e[:, None]], axis=1)
      return _skip_padding(1 + counter(table, W, target_score, t, taken), t)

    return map_batches(one, (inputs, targets, users, extra), batch_size)

  return _with_rows(_jit_replicated(batching.bucketed(ranks, plan), mesh),
                    plan, mesh)


def summarize(ranks: np.ndarray, ks: Sequence[int]) -> dict:
  """Means of hr@K, ndcg@K, mrr over users, from 1-based ranks (float64).

  Ranks of 0 mark padding rows (no target) and are left out.
  """
  r = np.asarray(ranks, np.float64)
  r = r[r > 0]
  n = max(len(r), 1)
  out = {}
  for k in ks:
    hit = r <= k
    out[f"ndcg@{k}"] = float(np.sum(np.where(hit, 1.0 / np.log2(r + 1), 0.0)) / n)
    out[f"hr@{k}"] = float(np.sum(hit) / n)
  out["mrr"] = float(np.sum(1.0 / r) / n)
  out["users"] = int(len(r))
  return out


def split_inputs(data: dict, split: str):
  """(inputs, targets, users, extra) of 'valid' or 'test' from device data."""
  if split == "valid":
    return (data["valid_inputs"], data["valid_targets"], data["eval_users"],
            jnp.zeros_like(data["valid_targets"]))
  if split == "test":
    # The validation item is history at test time.
    return (data["test_inputs"], data["test_targets"], data["eval_users"],
            data["valid_targets"])
  raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def _popularity_scores(counts, inputs):
  """The same scores (item counts) for every user: [B, N+1]."""
  return jnp.broadcast_to(counts, (inputs.shape[0], counts.shape[0]))


def popularity_counts(history: jax.Array, num_items: int) -> jax.Array:
  """[N+1] training-interaction counts per item (the popularity ranker).

  Computed on the device, so that it also works on history tables sharded
  over several hosts; the sentinel N+1 and padding 0 are not counted.
  """
  counts = jnp.zeros(num_items + 2, jnp.float32).at[history.ravel()].add(1.0)
  return counts[:num_items + 1].at[0].set(0.0)


def popularity_ranks(counts: np.ndarray, targets: np.ndarray,
                     users: np.ndarray, extra: np.ndarray,
                     history: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """[E] the ranks of `make_ranker(_popularity_scores)`, computed on the host.

  Every user sees the same scores (the counts), so a rank needs no [E, N+1]
  matrix: it is the number of items 1..N scoring >= the target, less the
  user's distinct excluded items (history and `extra`, not the target)
  that do. Same pessimistic protocol as `metrics.target_rank`.

  Args:
    counts: [N+1] item scores (index 0 = padding).
    targets, users, extra: [E] as for `make_ranker` (target 0: rank 0).
    history: [U, H] histories padded with N+1.
    chunk: rows per step (memory: chunk x H).
  """
  counts = np.asarray(counts, np.float64)
  N = counts.shape[0] - 1
  ordered = np.sort(counts[1:])
  out = np.zeros(len(targets), np.int64)
  for lo in range(0, len(targets), chunk):
    sl = slice(lo, lo + chunk)
    t = np.asarray(targets[sl])
    c_t = counts[t]
    at_least = N - np.searchsorted(ordered, c_t, side="left")
    taken = np.concatenate([np.asarray(history)[np.asarray(users[sl])],
                            np.asarray(extra[sl])[:, None]], axis=1)
    taken = np.sort(taken, axis=1)
    first = np.ones_like(taken, bool)
    first[:, 1:] = taken[:, 1:] != taken[:, :-1]  # count repeats once
    valid = first & (taken >= 1) & (taken <= N) & (taken != t[:, None])
    scores = counts[np.clip(taken, 0, N)]
    excluded = np.sum(valid & (scores >= c_t[:, None]), axis=1)
    out[sl] = np.where(t > 0, at_least - excluded, 0)
  return out


def evaluate_popularity(data: dict, num_items: int, batch_size: int,
                        ks: Sequence[int], split: str = "valid",
                        mesh=None) -> dict:
  """Metrics of ranking by training popularity (a sanity baseline).

  On the host when every table is in this process (`popularity_ranks`:
  nothing to compile); on the devices when the tables are split over
  several processes.
  """
  inputs = split_inputs(data, split)
  if all(x.is_fully_addressable for x in (data["history"], *inputs)):
    history = np.asarray(data["history"])
    counts = np.bincount(history.ravel(), minlength=num_items + 2)
    counts = counts[:num_items + 1].astype(np.float32)
    counts[0] = 0.0  # as `popularity_counts`
    r = popularity_ranks(counts, *(np.asarray(x) for x in inputs[1:]),
                         history)
  else:
    counts = jax.jit(popularity_counts, static_argnums=1)(
        data["history"], num_items)
    ranker = make_ranker(_popularity_scores, num_items, batch_size, mesh)
    r = ranker(counts, *inputs, data["history"])
  return summarize(np.asarray(r), ks)
