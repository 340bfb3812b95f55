"""Packed training rows: several users' windows in one T-long row.

Why. Length buckets (`batching`) cut most padding, but each bucket is its own
branch of the compiled epoch, so the program compiles once per bucket
(benchmarks/RESULTS.md, "Compilation": 4 buckets compile 4-6x longer than 1).
Packing puts the real items of several training windows side by side in rows
of T columns, so every step has one shape: one branch, and rows nearly full.

Layout (`PackedPlan`, built once on the host). The users' window lengths are
packed into rows of capacity T by best-fit decreasing (`pack_lengths`). Each
packed place ("slot") holds a sequence of one fixed length; the slots, sorted
by length, match the users sorted by length one for one. A token of a row
knows its slot, its column in its user's left-padded window (which is also
its position: windows are right-aligned, `models.Model`) and the column at
which its sequence starts in the row (what tells sequences apart).

Epoch order (`epoch_order`, on the device). Users of the same length are
shuffled among the slots of that length, and the rows are shuffled into
batches, both with the run's key: which users share a row and a batch
changes every epoch; which lengths share a row does not. Every user with a
training target is visited once per epoch; the rows added to fill the last
batch are empty (weight 0).

What the model and the methods need (`models`, `adversarial`): attention
that is causal and within one sequence, positions per sequence, the GRU
state reset at each sequence start, and every per-sequence quantity of the
methods (row-scope level-1 norms, PamaCF's sequence factors) taken per
sequence: `batch_rows` hands these out as `segments` and `positions`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def pack_lengths(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
  """Best-fit decreasing bin packing of integer lengths.

  Each length goes, longest first, into the open row with the least room
  that still holds it, or into a new row.

  Args:
    lengths: [n] ints in 1..capacity.
    capacity: T, the row length.

  Returns:
    (row [n], start [n]): the row of each length and its first column.
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
    raise ValueError(f"lengths must lie in 1..{capacity}, got "
                     f"{lengths.min()}..{lengths.max()}")
  by_room = [[] for _ in range(capacity + 1)]  # open rows by room left
  fill = []
  row = np.zeros(len(lengths), np.int64)
  start = np.zeros(len(lengths), np.int64)
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    room = next((c for c in range(n, capacity) if by_room[c]), None)
    if room is None:  # no open row holds it: a new row
      r = len(fill)
      fill.append(0)
    else:
      r = by_room[room].pop()
    row[i], start[i] = r, fill[r]
    fill[r] += n
    if fill[r] < capacity:
      by_room[capacity - fill[r]].append(r)
  return row, start


@dataclasses.dataclass(frozen=True)
class PackedPlan:
  """The static part of a packed epoch (host arrays; see `epoch_order`).

  Attributes:
    length: T, the row length (= data.max_len).
    users: [n] training users, sorted by window length.
    klass: [n] window length of each entry of `users` (non-decreasing);
      users are shuffled within a length.
    tok_slot: [R, T] the slot (entry of the shuffled `users`) each token of
      each row belongs to; -1 for an empty token.
    tok_col: [R, T] column of the token in its user's window (its position);
      0 for an empty token.
    tok_start: [R, T] column of the row where the token's sequence starts;
      0 for an empty token.
    rows_per_batch: rows per optimizer step.
    mean_length: mean real items per training window.
    tokens_per_step: real tokens (target positions) per step on average,
      the loss normalization (`epoch.epoch_program`).
  """
  length: int
  users: np.ndarray
  klass: np.ndarray
  tok_slot: np.ndarray
  tok_col: np.ndarray
  tok_start: np.ndarray
  rows_per_batch: int
  mean_length: float
  tokens_per_step: float

  @property
  def num_steps(self) -> int:
    return self.tok_slot.shape[0] // self.rows_per_batch

  @property
  def lengths(self) -> tuple:
    """One shape: every step runs on rows of T columns."""
    return (self.length,)

  def describe(self) -> str:
    real = int(np.sum(self.tok_slot >= 0))
    used = int(np.sum(np.any(self.tok_slot >= 0, axis=1)))
    return (f"packed: {len(self.users)} users in {used} rows of "
            f"{self.length} ({real / max(used * self.length, 1):.1%} full), "
            f"{self.rows_per_batch} rows/{self.num_steps} steps")


def auto_rows_per_batch(batch_size: int, mean_length: float,
                        length: int) -> int:
  """Rows per step that hold `batch_size` users on average (at least 1)."""
  return max(1, int(round(batch_size * mean_length / length)))


def packed_plan(users, lengths, length: int, batch_size: int,
                rows_per_batch: int = 0) -> PackedPlan:
  """Packs the training windows into rows (see the module docstring).

  Args:
    users: [n] training users (rows of the training tables).
    lengths: [n] real items of each user's training input window (1..T).
    length: T.
    batch_size: users per batch of the unpacked layout (`train.batch_size`).
    rows_per_batch: rows per step; 0 = `auto_rows_per_batch` (never
      rounded to the device count, so that results do not depend on it).
  """
  users = np.asarray(users, np.int32)
  lengths = np.asarray(lengths, np.int64)
  if len(users) == 0:
    raise ValueError("No user has two training items to learn from.")
  if rows_per_batch < 0:
    raise ValueError(f"train.pack_rows must be >= 0 (0 = auto), got "
                     f"{rows_per_batch}.")
  order = np.argsort(lengths, kind="stable")
  users, lengths = users[order], lengths[order]
  row, start = pack_lengths(lengths, length)
  mean_length = float(np.mean(lengths))
  if rows_per_batch == 0:
    rows_per_batch = auto_rows_per_batch(batch_size, mean_length, length)
  used = int(row.max()) + 1
  steps = -(-used // rows_per_batch)
  R = steps * rows_per_batch
  # Token j of slot k sits at row[k], column start[k] + j, and holds column
  # T - n_k + j of the user's window.
  slot = np.repeat(np.arange(len(users)), lengths)
  j = np.arange(len(slot)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  flat = row[slot] * length + start[slot] + j
  tok_slot = np.full(R * length, -1, np.int32)
  tok_col = np.zeros(R * length, np.int32)
  tok_start = np.zeros(R * length, np.int32)
  tok_slot[flat] = slot
  tok_col[flat] = length - lengths[slot] + j
  tok_start[flat] = start[slot]
  shape = (R, length)
  return PackedPlan(length=int(length), users=users,
                    klass=lengths.astype(np.int32),
                    tok_slot=tok_slot.reshape(shape),
                    tok_col=tok_col.reshape(shape),
                    tok_start=tok_start.reshape(shape),
                    rows_per_batch=int(rows_per_batch), mean_length=mean_length,
                    tokens_per_step=float(np.sum(lengths)) / steps)


def order_arrays(plan: PackedPlan) -> dict:
  """The plan's arrays on the device: inputs of the compiled epoch, so that
  the program holds shapes only (as `batching.order_arrays`)."""
  return {"users": jnp.asarray(plan.users),
          "klass": jnp.asarray(plan.klass, jnp.float32),
          "tok_slot": jnp.asarray(plan.tok_slot),
          "tok_col": jnp.asarray(plan.tok_col),
          "tok_start": jnp.asarray(plan.tok_start)}


def epoch_order(plan: PackedPlan, perm_key: jax.Array, order: dict):
  """One epoch's order, on the device (traceable under `jit`/`vmap`).

  Returns:
    (rows [S, rows_per_batch] int32: the plan's rows of each step,
     slot_user [n] int32: the user (table row) in each slot).
  """
  user_key, row_key = jax.random.split(perm_key)
  # Sorting by length + a uniform in [0, 1) shuffles within a length only,
  # so each slot still gets a user of its length.
  noise = jax.random.uniform(user_key, order["klass"].shape)
  slot_user = order["users"][jnp.argsort(order["klass"] + noise)]
  R = plan.tok_slot.shape[0]
  rows = jax.random.permutation(row_key, R).astype(jnp.int32)
  return rows.reshape(plan.num_steps, plan.rows_per_batch), slot_user


def batch_rows(order: dict, rows: jax.Array, slot_user: jax.Array,
               tables: dict) -> dict:
  """The tokens of `rows` [Rb]: users, columns and sequence layout.

  Args:
    order: `order_arrays(plan)`.
    rows: [Rb] rows of the plan in this step.
    slot_user: [n] from `epoch_order`.
    tables: {name: [U, T] table} to gather per token (e.g. train_inputs,
      train_targets, the level-1 weights); empty tokens get 0.

  Returns:
    dict with every name of `tables` ([Rb, T]), 'users' ([Rb, T] table row
    of each token, 0 where empty), 'real' ([Rb, T] bool), 'segments'
    ([Rb, T] int32 in 0..Rb*T: one id per sequence in the batch, unique
    across rows; Rb*T for empty tokens), 'positions' ([Rb, T] int32, each
    token's column in its window).
  """
  slot = order["tok_slot"][rows]
  col = order["tok_col"][rows]
  real = slot >= 0
  users = jnp.where(real, slot_user[jnp.maximum(slot, 0)], 0)
  T = slot.shape[1]
  # Empty tokens get an id of their own (Rb * T), never a sequence's.
  segments = jnp.where(
      real, jnp.arange(slot.shape[0], dtype=jnp.int32)[:, None] * T +
      order["tok_start"][rows], slot.size)
  out = {name: jnp.where(real, table[users, col], 0).astype(table.dtype)
         for name, table in tables.items()}
  out.update(users=users, real=real, segments=segments, positions=col)
  return out
