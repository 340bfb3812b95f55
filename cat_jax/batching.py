"""How users become batches: device tables, length buckets, the epoch order.

Tables. The per-user arrays of `data.build_arrays` (training windows,
targets, histories, evaluation windows) go to the device once
(`device_data`), or split by rows over a mesh with each process building only
its own rows (`sharded_device_data`). Batches are gathered from them on the
device; nothing crosses the host during an epoch.

Length buckets. Windows are left-padded to T, but on the Amazon data the
mean training window holds ~7 real items of T = 50, so most of a full-T step
is padding. Users are grouped by the number of real items in their window;
a batch of bucket b runs on the last T_b columns only. Models see windows
right-aligned (`models.Model`), so every sequence gives exactly what its
full-T window gives; only which users share a batch changes. `choose_buckets`
picks the T_b that minimize the padded work for a length distribution.

Epoch order (`TrainPlan`, `epoch_order`). Every user with a training target
is visited once per epoch. Within each bucket the users are shuffled with
the run's key; each bucket's last batch is filled with repeated users of
weight 0; then the batches of all buckets are shuffled together. That last
shuffle (which bucket comes at which step) uses a key shared by all runs of
a vectorized group (`train.order_seed`), so that stacked runs take the same
bucket at each step and one `lax.switch` serves them all; which users fill
the batches follows each run's own seed. With one bucket this is a plain
per-epoch shuffle of all users at length T.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cat_jax import data as data_lib
from cat_jax import sharding

TABLES = ("train_inputs", "train_targets", "history", "train_users",
          "eval_users", "valid_inputs", "valid_targets", "test_inputs",
          "test_targets")


def device_data(arrays: data_lib.Arrays) -> dict:
  """Puts the training and evaluation arrays on the (default) device once."""
  return {k: jnp.asarray(getattr(arrays, k)) for k in TABLES}


def sharded_device_data(ds: data_lib.Dataset, max_len: int, mesh) -> dict:
  """The tables of `device_data`, split by rows (users) over `mesh`.

  Each device holds 1/D of the user tables (training windows, histories,
  evaluation windows), and each process builds only the rows of its own
  devices: on several hosts no process holds every user's padded tables.
  Only `train_users` (one int per user) is replicated. Tables are padded to a
  multiple of the device count with empty rows: no training target, and an
  evaluation target of 0, which evaluation skips. Under `jit`, XLA gathers a
  batch from the sharded tables with a masked local gather and a sum, so
  results equal those of replicated tables.
  """
  data_lib.check_users(ds)
  n = mesh.size
  pad = lambda k: max(n, -(-k // n) * n)
  U, T, H = ds.num_users, max_len, data_lib.history_width(ds)
  eval_users = data_lib.eval_user_index(ds)
  E = len(eval_users)
  eval_users = np.concatenate(
      [eval_users, np.full(pad(E) - E, -1, np.int32)])
  cache = {}

  def rows_of(kind, index):
    sl = index[0]
    key = (kind, sl.start, sl.stop)
    if key not in cache:  # one build per device slice, shared by its tables
      if kind == "train":
        cache[key] = data_lib.train_rows(ds, np.arange(pad(U))[sl], T, H)
      else:
        cache[key] = data_lib.eval_rows(ds, eval_users[sl], T)
    return cache[key]

  def table(kind, i, shape):
    return jax.make_array_from_callback(
        shape, sharding.rows(mesh), lambda index: rows_of(kind, index)[i])

  d = {"train_inputs": table("train", 0, (pad(U), T)),
       "train_targets": table("train", 1, (pad(U), T)),
       "history": table("train", 2, (pad(U), H)),
       "valid_inputs": table("eval", 0, (pad(E), T)),
       "valid_targets": table("eval", 1, (pad(E),)),
       "test_inputs": table("eval", 2, (pad(E), T)),
       "test_targets": table("eval", 3, (pad(E),))}
  d["eval_users"] = jax.make_array_from_callback(
      (pad(E),), sharding.rows(mesh),
      lambda index: np.maximum(eval_users[index[0]], 0))
  d["train_users"] = sharding.replicate(
      jnp.asarray(data_lib.train_user_index(ds)), mesh)
  built = sum(k[2] - k[1] for k in cache if k[0] == "train")
  logging.info("process %d built %d of %d user rows (row-sharded tables)",
               jax.process_index(), built, pad(U))
  return d


# ----------------------------------------------------------------------------
# Length buckets.
# ----------------------------------------------------------------------------


def choose_buckets(lengths: Sequence[int], num_buckets: int,
                   batch_size: int = 1) -> tuple[int, ...]:
  """Bucket lengths T_1 < ... < T_k (k <= num_buckets) for window lengths.

  Minimizes the padded work sum_b T_b * (rows of bucket b rounded up to whole
  batches), by dynamic programming over the distinct lengths; a bucket's
  cost counts its last, partly filled batch in full, so tiny buckets are
  avoided. The last bucket is the longest window, so every row fits.

  Args:
    lengths: real items per window (each >= 1).
    num_buckets: the most buckets to use (1 = one bucket, no bucketing
      beyond cutting every window to the longest one).
    batch_size: rows per batch.

  Returns:
    Increasing bucket lengths.
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) == 0:
    raise ValueError("choose_buckets needs at least one window length.")
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}.")
  values, counts = np.unique(np.maximum(lengths, 1), return_counts=True)
  before = np.concatenate([[0], np.cumsum(counts)])  # rows with value < v_i

  def cost(i, j):  # one bucket holding values[i..j], run at values[j]
    rows = before[j + 1] - before[i]
    return int(values[j]) * (-(-rows // batch_size) * batch_size)

  n, k = len(values), min(num_buckets, len(values))
  best = [[cost(0, j) for j in range(n)]]  # best[b][j]: values[0..j], b+1
  choice = [[-1] * n]
  for b in range(1, k):
    row, arg = [], []
    for j in range(n):
      opts = [(best[b - 1][i] + cost(i + 1, j), i) for i in range(j)]
      c, i = min(opts) if opts else (best[b - 1][j], -1)
      row.append(c)
      arg.append(i)
    best.append(row)
    choice.append(arg)
  b = min(range(k), key=lambda b: best[b][n - 1])  # fewest buckets on ties
  bounds, j = [], n - 1
  while j >= 0 and b >= 0:
    bounds.append(int(values[j]))
    j = choice[b][j]
    b -= 1
  return tuple(sorted(bounds))


def bucket_lengths(lengths: Sequence[int], max_len: int, num_buckets: int,
                   batch_size: int, given: Sequence[int] = ()
                   ) -> tuple[int, ...]:
  """The bucket lengths to use: `given` (checked), `choose_buckets`, or
  (max_len,) when `num_buckets` is 1 (no bucketing).

  With given lengths, the longest window is added if no given length covers
  it, so every row has a bucket.
  """
  longest = int(np.max(lengths)) if len(lengths) else 1
  if not given:
    if num_buckets <= 1:
      return (max_len,)  # off: every window at its full length T
    return choose_buckets(lengths, num_buckets, batch_size)
  given = tuple(int(x) for x in given)
  if any(b <= a for a, b in zip(given, given[1:])) or given[0] < 1 or \
      given[-1] > max_len:
    raise ValueError(
        f"train.bucket_lengths={given} must increase and lie in 1..{max_len} "
        "(data.max_len).")
  return given if given[-1] >= longest else given + (longest,)


def assign(lengths: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
  """Index of the shortest bucket holding each length ([n] int)."""
  b = np.searchsorted(np.asarray(bounds), np.asarray(lengths), side="left")
  if np.any(b >= len(bounds)):
    raise ValueError(f"a window is longer than the longest bucket {bounds}")
  return b.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """The static part of the epoch order (host arrays; see `epoch_order`).

  Attributes:
    lengths: bucket lengths T_b, increasing.
    users: [n] training users, grouped by bucket (bucket 0 first).
    bucket: [n] bucket of each entry of `users` (non-decreasing).
    slot_pos: [S * B] entry of the (shuffled) grouped users that fills each
      batch slot; batch s holds slots s*B .. s*B + B-1, all of one bucket.
    slot_real: [S * B] False for the fill of a bucket's last batch.
    batch_bucket: [S] bucket of each batch.
    batch_size: B.
    mean_length: mean real items per training window (= target positions
      per user), for the loss normalization of bucketed batches.
  """
  lengths: tuple
  users: np.ndarray
  bucket: np.ndarray
  slot_pos: np.ndarray
  slot_real: np.ndarray
  batch_bucket: np.ndarray
  batch_size: int
  mean_length: float = 0.0

  @property
  def num_steps(self) -> int:
    return len(self.batch_bucket)

  def describe(self) -> str:
    sizes = np.bincount(self.bucket, minlength=len(self.lengths))
    steps = np.bincount(self.batch_bucket, minlength=len(self.lengths))
    return ", ".join(f"T={t}: {n} users/{s} steps"
                     for t, n, s in zip(self.lengths, sizes, steps))


def train_plan(users: np.ndarray, lengths: np.ndarray,
               bounds: Sequence[int], batch_size: int) -> TrainPlan:
  """Groups training users by bucket and lays out the batch slots.

  Args:
    users: [n] training users (rows of the training tables).
    lengths: [n] real items in each user's training input window.
    bounds: bucket lengths (`bucket_lengths`).
    batch_size: B.
  """
  users = np.asarray(users, np.int32)
  if len(users) == 0:
    raise data_lib.DataError("No user has two training items to learn from.")
  b_of = assign(lengths, bounds)
  order = np.argsort(b_of, kind="stable")
  users, b_of = users[order], b_of[order]
  slot_pos, slot_real, batch_bucket = [], [], []
  start = 0
  for b in range(len(bounds)):
    n = int(np.sum(b_of == b))
    if n == 0:
      continue
    steps = -(-n // batch_size)
    slots = np.arange(steps * batch_size)
    slot_pos.append(start + slots % n)  # the fill repeats the bucket's users
    slot_real.append(slots < n)
    batch_bucket.append(np.full(steps, b, np.int32))
    start += n
  return TrainPlan(lengths=tuple(int(x) for x in bounds), users=users,
                   bucket=b_of, slot_pos=np.concatenate(slot_pos),
                   slot_real=np.concatenate(slot_real),
                   batch_bucket=np.concatenate(batch_bucket),
                   batch_size=batch_size,
                   mean_length=float(np.mean(lengths)))


def order_arrays(plan: TrainPlan) -> dict:
  """The plan's arrays as device arrays, the `order` of `epoch_order`.

  Passed to the compiled epoch as inputs rather than closed over, so that
  the program holds no data (only shapes) and a cached program serves any
  plan of the same shape.
  """
  return {"users": jnp.asarray(plan.users),
          "bucket": jnp.asarray(plan.bucket, jnp.float32),
          "slot_pos": jnp.asarray(plan.slot_pos),
          "slot_real": jnp.asarray(plan.slot_real),
          "batch_bucket": jnp.asarray(plan.batch_bucket)}


def epoch_order(plan: TrainPlan, perm_key: jax.Array, order_key: jax.Array,
                order: dict | None = None):
  """One epoch's batches, on the device (traceable under `jit`/`vmap`).

  Args:
    plan: the layout (only its batch size and step count are read when
      `order` is given).
    perm_key: the run's key; shuffles users within each bucket.
    order_key: shared key; shuffles the batches of all buckets together.
    order: `order_arrays(plan)` (traced inputs); default: the plan's own
      arrays, which then become constants of the program.

  Returns:
    (bucket [S] int32, users [S, B] int32 table rows, real [S, B] bool).
  """
  B = plan.batch_size
  if order is None:
    order = order_arrays(plan)
  # Sorting by bucket + a uniform in [0, 1) shuffles within buckets only.
  noise = jax.random.uniform(perm_key, order["bucket"].shape)
  within = jnp.argsort(order["bucket"] + noise)
  shuffled = order["users"][within]
  users = shuffled[order["slot_pos"]].reshape(-1, B)
  real = order["slot_real"].reshape(-1, B)
  steps = jax.random.permutation(order_key, plan.num_steps)
  return (order["batch_bucket"][steps], users[steps], real[steps])


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Evaluation rows grouped by bucket: rows[b] run at lengths[b]."""
  lengths: tuple
  rows: tuple


def eval_plan(lengths: np.ndarray, bounds: Sequence[int]) -> EvalPlan:
  """Groups evaluation rows ([E] window lengths; 0 = padding row, skipped).

  Use the test windows' lengths: a validation window is one item shorter,
  so the same plan serves both splits.
  """
  lengths = np.asarray(lengths)
  real = np.flatnonzero(lengths > 0)
  b_of = assign(lengths[real], bounds)
  rows, lens = [], []
  for b, t in enumerate(bounds):
    r = real[b_of == b].astype(np.int32)
    if len(r):
      rows.append(r)
      lens.append(int(t))
  return EvalPlan(lengths=tuple(lens), rows=tuple(rows))


def bucketed(ranks_fn, plan: EvalPlan | None):
  """Wraps ranks(params, inputs [E, T], targets, users, extra, *rest) -> [E]
  into ranks(rows, params, inputs, ...) so that each bucket's rows run on
  their last T_b columns.

  `rows` is `plan.rows` as arrays (an input of the compiled program, not a
  constant in it, so the program holds no data); only `plan.lengths` is
  read here. The rows of each bucket are gathered, ranked, and scattered
  back; rows in no bucket (padding rows of sharded tables) keep rank 0.
  Without a plan, `rows` is ignored and every row runs at T.
  """
  def ranks(rows, params, inputs, targets, users, extra, *rest):
    if plan is None:
      return ranks_fn(params, inputs, targets, users, extra, *rest)
    T = inputs.shape[1]
    out = jnp.zeros(inputs.shape[0], jnp.int32)
    for t, r in zip(plan.lengths, rows):
      got = ranks_fn(params, inputs[r, T - t:], targets[r], users[r],
                     extra[r], *rest)
      out = out.at[r].set(got)
    return out

  return ranks


def row_arrays(plan: EvalPlan | None) -> tuple:
  """The `rows` input of a `bucketed` ranker: one int32 array per bucket."""
  return () if plan is None else tuple(jnp.asarray(r) for r in plan.rows)


def train_window_lengths(ds: data_lib.Dataset, users: np.ndarray,
                         max_len: int) -> np.ndarray:
  """[n] real items of each user's training input window (see train_rows)."""
  return np.asarray(
      [min(len(data_lib.split(ds.sequences[u])[0]) - 1, max_len)
       for u in users], np.int32)


def test_window_lengths(ds: data_lib.Dataset, max_len: int,
                        num_rows: int | None = None) -> np.ndarray:
  """[E] real items of each test input window, in `eval_user_index` order;
  0 for the padding rows up to `num_rows` (sharded tables)."""
  users = data_lib.eval_user_index(ds)
  out = [min(len(data_lib.split(ds.sequences[u])[0]) + 1, max_len)
         for u in users]
  out += [0] * ((num_rows or len(out)) - len(out))
  return np.asarray(out, np.int32)


def plan_from_table(train_inputs, train_users, batch_size: int,
                    num_buckets: int = 1,
                    given: Sequence[int] = ()) -> TrainPlan:
  """A `TrainPlan` read off host copies of the training tables.

  Args:
    train_inputs: [U, T] left-padded training input windows.
    train_users: [n] rows that train.
    batch_size, num_buckets, given: as `bucket_lengths`.
  """
  inputs = np.asarray(train_inputs)
  users = np.asarray(train_users)
  lengths = np.sum(inputs[users] > 0, axis=1)
  bounds = bucket_lengths(lengths, inputs.shape[1], num_buckets, batch_size,
                          given)
  return train_plan(users, lengths, bounds, batch_size)


def eval_plan_from_table(test_inputs, num_buckets: int,
                         batch_size: int) -> EvalPlan | None:
  """An `EvalPlan` read off a host copy of the [E, T] test windows (rows
  without a real item are left out); None when num_buckets <= 1."""
  if num_buckets <= 1:
    return None
  lens = np.sum(np.asarray(test_inputs) > 0, axis=1)
  return eval_plan(lens, choose_buckets(lens[lens > 0], num_buckets,
                                        batch_size))
