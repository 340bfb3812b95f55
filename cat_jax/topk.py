"""Top-K recommendation on the device: the k best items of each user.

`top_k(model, params, histories, k)` scores every item 1..N against each
user's embedding after its last item, leaves out the user's history, and
keeps the k best, in bounded memory for large catalogs (`item_chunk`) and
over several devices (`mesh`, `shard_items`). The command and the mapping
to the data's own ids are in `cat_jax.recommend`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cat_jax import evaluate, sharding


class TopK(NamedTuple):
  """What `make_top_k` returns; call it as fn(params, histories, ...)."""
  fn: Callable
  num_items: int
  max_len: int
  k: int
  batch_size: int

  def __call__(self, params, histories, exclude_history: bool = True):
    return self.fn(params, histories, exclude_history)


def make_top_k(model, k: int, *, batch_size: int = 256, item_chunk: int = 0,
               mesh=None, shard_items: bool = False,
               approx: bool | None = None, recall_target: float = 0.95,
               num_items: int | None = None,
               max_len: int | None = None) -> TopK:
  """A reusable top-K recommender (compiled once per history width).

  `top_k` builds one of these per call; keep one to recommend several
  times with the same shapes without compiling again. Arguments as in
  `top_k`; `num_items` and `max_len` default to `model.module`'s.
  """
  N = int(num_items if num_items is not None else model.module.num_items)
  T = int(max_len if max_len is not None else model.module.max_len)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if item_chunk < 0:
    raise ValueError(f"item_chunk must be >= 0, got {item_chunk}")
  if shard_items and mesh is None:
    raise ValueError("shard_items=True needs a mesh (sharding.make_mesh()).")
  if approx is None:
    approx = jax.default_backend() == "tpu"
  n_dev = mesh.size if (shard_items and mesh is not None) else 1
  if n_dev == 1 and mesh is not None:
    # Users are split over the devices: whole batches per device.
    batch_size = -(-batch_size // mesh.size) * mesh.size
  C = item_chunk or -(-(N + 1) // n_dev)
  n_chunks = -(-(N + 1) // C)
  n_chunks = -(-n_chunks // n_dev) * n_dev
  kc = min(k, C)

  def select(scores):
    if approx:
      return jax.lax.approx_max_k(scores, kc, recall_target=recall_target)
    return jax.lax.top_k(scores, kc)

  def scan_chunks(table, W, taken, first_chunk, vary=lambda x: x):
    """Running top-k of W against table [chunks, C, d] (items from
    first_chunk * C on), best first, ties to the lower item id."""
    B = W.shape[0]
    rows = jnp.arange(B)[:, None]

    def step(carry, xs):
      vals, ids = carry
      c, tab = xs
      start = (first_chunk + c) * C
      cid = start + jnp.arange(C)
      # History items outside this chunk go to an out-of-range slot.
      local = jnp.where(taken >= start, taken - start, C)
      excluded = jnp.zeros((B, C), jnp.bool_).at[rows, local].set(
          True, mode="drop")
      ok = ((cid >= 1) & (cid <= N))[None] & ~excluded
      s = jnp.where(ok, W @ tab.T, -jnp.inf)
      cv, ci = select(s)
      # The running list holds lower ids than this chunk, and lax.top_k
      # keeps the lower index first among equals: ties go to the lower id.
      v, j = jax.lax.top_k(jnp.concatenate([vals, cv], axis=1), k)
      new_ids = jnp.take_along_axis(
          jnp.concatenate([ids, start + ci.astype(jnp.int32)], axis=1), j,
          axis=1)
      return (v, new_ids), None

    init = (vary(jnp.full((B, k), -jnp.inf, jnp.float32)),
            vary(jnp.zeros((B, k), jnp.int32)))
    (v, ids), _ = jax.lax.scan(
        step, init, (jnp.arange(table.shape[0]), table))
    return v, ids

  if n_dev > 1:
    def per_device(table, W, taken):
      first = jax.lax.axis_index(sharding.AXIS) * table.shape[0]
      # The running lists differ per device (shard_map's varying type).
      return scan_chunks(
          table, W, taken, first,
          lambda x: jax.lax.pcast(x, (sharding.AXIS,), to="varying"))

    # Each device's [B, k] list, side by side in device order: [B, D * k].
    per_device_lists = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(sharding.AXIS), P(), P()),
        out_specs=(P(None, sharding.AXIS), P(None, sharding.AXIS)))

    def ranker(table, W, taken):
      v, ids = per_device_lists(table, W, taken)
      # Device d holds lower item ids than device d+1, so the device order
      # keeps the lower-id-first rule among equal scores in this merge.
      v, j = jax.lax.top_k(v, k)
      return v, jnp.take_along_axis(ids, j, axis=1)
  else:
    def ranker(table, W, taken):
      return scan_chunks(table, W, taken, 0)

  def make_table(params):
    """E padded to whole chunks: [n_chunks, C, d], built once per call."""
    E = model.items(params).astype(jnp.float32)
    return jnp.concatenate(
        [E, jnp.zeros((n_chunks * C - E.shape[0], E.shape[1]), E.dtype)]
    ).reshape(n_chunks, C, -1)

  def batch(params, table, inputs, taken):
    if n_dev == 1:
      inputs, taken = (sharding.shard_rows(a, mesh) for a in (inputs, taken))
    W = evaluate.user_embeddings(model, params, inputs).astype(jnp.float32)
    v, ids = ranker(table, W, taken)
    # Slots without a candidate (k > #candidates): id 0, score -inf.
    return v, jnp.where(v == -jnp.inf, 0, ids)

  if mesh is None:
    tabulate, jitted = jax.jit(make_table), jax.jit(batch)
  else:
    # With item sharding each device keeps only its share of the table.
    tabulate = jax.jit(make_table, out_shardings=NamedSharding(
        mesh, P(sharding.AXIS) if n_dev > 1 else P()))
    jitted = jax.jit(batch, out_shardings=sharding.replicated(mesh))

  def run(params, histories, exclude_history=True):
    flat, lengths = _flatten(histories, N)
    U = len(lengths)
    if U == 0:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    H = _pow2(int(lengths.max(initial=1))) if exclude_history else 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    table = tabulate(params)
    out = []
    for lo in range(0, U, batch_size):
      hi = min(lo + batch_size, U)
      inputs, taken = _batch_arrays(flat, offsets, lengths, lo, hi,
                                    batch_size, T, H, N, exclude_history)
      out.append(jitted(params, table, inputs, taken))  # dispatched asynchronously
    scores = np.concatenate([np.asarray(v) for v, _ in out])[:U]
    ids = np.concatenate([np.asarray(i) for _, i in out])[:U]
    return ids.astype(np.int32), scores.astype(np.float32)

  return TopK(fn=run, num_items=N, max_len=T, k=k, batch_size=batch_size)


def top_k(model, params, histories, k: int, exclude_history: bool = True, *,
          batch_size: int = 256, item_chunk: int = 0, mesh=None,
          shard_items: bool = False, approx: bool | None = None,
          recall_target: float = 0.95, num_items: int | None = None,
          max_len: int | None = None):
  """The k best items of each user by <W_T, E_j>, best first.

  Args:
    model, params: a `models.Model` and its parameters (e.g. from
      `train.selected_params`).
    histories: each user's internal item ids (1..N), oldest first: a list of
      sequences (ragged) or a 2-D array where 0 is padding (left- or
      right-padded). The model sees the last T = max_len items, left-padded
      as in training.
    k: items per user (>= 1).
    exclude_history: leave out every item of the user's whole history (not
      only the last T). Item 0 (padding) is never recommended.
    batch_size: users per device call; every call has this shape (the last
      batch is padded), so it compiles once (per history width, which is
      rounded up to a power of two). With a mesh and no item sharding it is
      rounded up to a multiple of the device count.
    item_chunk: score the catalog this many items at a time and merge
      running top-k lists, so memory is O(batch_size * (item_chunk + k))
      whatever N is (0: all N+1 items at once).
    mesh: a `sharding.make_mesh` mesh. Without `shard_items` the users of
      each batch are split across its devices.
    shard_items: split the catalog across the mesh's devices instead
      (`jax.shard_map`): each device finds the top-k of its share (in
      chunks of `item_chunk` if given), and the per-device lists are
      gathered and merged.
    approx: select each chunk's top-k with `jax.lax.approx_max_k`
      (`recall_target`) instead of the exact `jax.lax.top_k`. The default
      (None) uses it on TPU only, where it is much faster; it is
      APPROXIMATE: a true top-k item can be missed (expected recall about
      `recall_target`), and the tie rule below is not guaranteed. The merges
      of running and per-device lists are always exact. Elsewhere (CPU,
      GPU) the default is the exact `lax.top_k`.
    num_items, max_len: N and T when `model.module` does not carry them.

  Returns:
    (ids [U, k] int32, scores [U, k] float32) numpy arrays, sorted by score
    descending; equal scores are ordered by the lower item id first, the
    same in every path (full, chunked, user- or item-sharded). When a user
    has fewer than k candidates (N minus the excluded history), the
    remaining slots are id 0 with score -inf.

  Raises:
    ValueError: an item id outside 1..N in `histories`.
  """
  fn = make_top_k(model, k, batch_size=batch_size, item_chunk=item_chunk,
                  mesh=mesh, shard_items=shard_items, approx=approx,
                  recall_target=recall_target, num_items=num_items,
                  max_len=max_len)
  return fn(params, histories, exclude_history)


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _flatten(histories, num_items: int):
  """(flat int32 items, lengths [U]) with padding zeros dropped; checks ids."""
  if isinstance(histories, (np.ndarray, jax.Array)):
    arr = np.asarray(histories)
    if arr.ndim != 2:
      raise ValueError(f"histories as an array must be 2-D [users, length], "
                       f"got shape {arr.shape}")
    rows = [r[r != 0] for r in arr]
  else:
    rows = [np.asarray(h).reshape(-1) for h in histories]
    rows = [r[r != 0] for r in rows]
  lengths = np.asarray([len(r) for r in rows], np.int64)
  flat = (np.concatenate(rows) if len(rows) else np.zeros(0)).astype(np.int64)
  bad = (flat < 1) | (flat > num_items)
  if bad.any():
    u = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(bad)[0],
                            side="right"))
    raise ValueError(
        f"history of user row {u} has item id {int(flat[bad][0])}, outside "
        f"the internal ids 1..{num_items} (0 is padding); map original ids "
        "with recommend.map_histories first.")
  return flat.astype(np.int32), lengths


def _batch_arrays(flat, offsets, lengths, lo, hi, batch_size, T, H, N,
                  exclude):
  """inputs [B, T] (last T items, left-padded) and taken [B, H] (the whole
  history, padded with the sentinel N+1) of users lo..hi-1."""
  lens = lengths[lo:hi]
  seg = flat[offsets[lo]:offsets[hi]]
  row = np.repeat(np.arange(hi - lo), lens)
  pos = np.arange(len(seg)) - np.repeat(offsets[lo:hi] - offsets[lo], lens)
  from_end = lens[row] - pos  # 1 = the last item
  keep = from_end <= T
  inputs = np.zeros((batch_size, T), np.int32)
  inputs[row[keep], T - from_end[keep]] = seg[keep]
  taken = np.full((batch_size, H), N + 1, np.int32)
  if exclude:
    taken[row, pos] = seg
  return inputs, taken
