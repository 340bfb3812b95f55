"""Recommendations out of a trained model: the top-K next items of each user.

Library (internal item ids 1..N, 0 = padding):

  from cat_jax import recommend
  ids, scores = recommend.top_k(model, params, histories, k=20)
  # ids [U, k] int32, scores [U, k] float32, best first

Command (the data's own user and item ids in and out):

  python -m cat_jax.recommend --workdir=runs/x --phase=cas --k=20 --out=recs.jsonl
  python -m cat_jax.recommend --workdir=runs/x --phase=cas --k=20 \\
      --users=users.txt --out=recs.jsonl

Without `--users` every user of the run's data is recommended for, from the
whole sequence (all interactions known, validation and test items
included). With `--users=FILE` the histories are `uid item item ...` lines in
the data's original ids (oldest first), and the command needs only
`<workdir>/config.json`, `<workdir>/item_ids.txt` and the checkpoint, not the
data file. Each output line is
`{"user": uid, "items": [original ids, best first], "scores": [...]}`; with
`--users`, also `"unknown": [...]`, the tokens of that line that are not
items of the run (skipped, and counted in one warning line).

Item ids are mapped back through `<workdir>/item_ids.txt` (`write_item_ids`:
line i is the original id of internal item i, as a JSON value, so integer
ids stay integers and string ids strings).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cat_jax import data as data_lib
from cat_jax import evaluate, sharding
from cat_jax.writer import is_chief

ITEM_IDS = "item_ids.txt"


class RecommendError(ValueError):
  """A problem with the command's inputs; the message is one line."""


# ----------------------------------------------------------------------------
# Top-K on the device.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Original ids.
# ----------------------------------------------------------------------------


def _plain(x):
  """A JSON-able id: Python int for integer ids, else str."""
  if isinstance(x, (bool, np.bool_)):
    return str(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  return str(x)


def write_item_ids(workdir: str, dataset) -> str:
  """Writes `<workdir>/item_ids.txt`: line i = original id of internal item i.

  Each line is a JSON value (`123` or `"B00X"`), so the ids read back with
  their type. Written atomically (a temporary file, then renamed), by
  process 0 only. `dataset` is a `data.Dataset` or its `item_ids` list.
  Returns the path.
  """
  ids = dataset.item_ids if hasattr(dataset, "item_ids") else dataset
  n = getattr(dataset, "num_items", len(ids))
  if len(ids) != n:
    raise ValueError(f"the data set has {n} items but {len(ids)} item ids")
  path = os.path.join(workdir, ITEM_IDS)
  if not is_chief():
    return path
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for x in ids:
      f.write(json.dumps(_plain(x)) + "\n")
  os.replace(tmp, path)
  return path


def read_item_ids(workdir: str) -> list:
  """The original item ids of a run: element i-1 is internal item i (as
  `Dataset.item_ids`). FileNotFoundError if the run has no item_ids.txt."""
  path = os.path.join(workdir, ITEM_IDS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (written by training; or run "
                            "without --users to read the ids from the data)")
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        raise RecommendError(f"{path}:{lineno}: not a JSON id: "
                             f"{line.strip()[:80]!r}") from None
  return out


_INT = re.compile(r"^[+-]?\d+$")


def _id_token(token: str):
  """A user id token as output: an int if it is an integer, else the str."""
  return int(token) if _INT.match(token) else token


class UserLine(NamedTuple):
  lineno: int
  user: object
  items: list


def read_users(path: str) -> list:
  """`uid item item ...` lines (original ids, oldest first) -> [UserLine].

  Blank lines are skipped; a line with no item, a user on two lines or a
  file with no user is a RecommendError naming the file and line.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise RecommendError(f"users file {path!r} not found") from None
  except IsADirectoryError:
    raise RecommendError(f"users file {path!r} is a directory") from None
  except UnicodeDecodeError as e:
    raise RecommendError(f"users file {path!r} is not UTF-8 text ({e.reason} "
                         f"at byte {e.start})") from None
  out, seen = [], {}
  for lineno, line in enumerate(lines, 1):
    tokens = line.split()
    if not tokens:
      continue
    if len(tokens) < 2:
      raise RecommendError(
          f"{path}:{lineno}: expected 'user item1 item2 ...', got "
          f"{line.strip()[:80]!r} (a user with no items)")
    if tokens[0] in seen:
      raise RecommendError(f"{path}:{lineno}: user {tokens[0]} is also on "
                           f"line {seen[tokens[0]]}")
    seen[tokens[0]] = lineno
    out.append(UserLine(lineno, _id_token(tokens[0]), tokens[1:]))
  if not out:
    raise RecommendError(f"users file {path!r} has no user lines")
  return out


class Mapped(NamedTuple):
  """Histories in internal ids, from original ids (`map_histories`)."""
  histories: list    # [U] int32 arrays of internal ids
  unknown: list      # [U] lists of the tokens that are not items of the run
  num_unknown: int   # total unknown tokens, skipped
  message: str       # one line describing them ('' when there are none)


def map_histories(users: Sequence[UserLine], item_ids: Sequence,
                  source: str = "users") -> Mapped:
  """Maps original item ids to 1..N; unknown ones are skipped and counted.

  A token matches an item whose id has the same text (`"123"` matches the
  integer id 123 and the string id "123"); an integer token also matches
  its canonical form (`"007"` -> 7). Nothing else is guessed.
  """
  index = {}
  for i, x in enumerate(item_ids, 1):
    index.setdefault(str(_plain(x)), i)
  hist, unknown = [], []
  first = None
  for u in users:
    mapped, miss = [], []
    for tok in u.items:
      j = index.get(tok)
      if j is None and _INT.match(tok):
        j = index.get(str(int(tok)))
      if j is None:
        miss.append(_id_token(tok))
        if first is None:
          first = (u.lineno, tok)
      else:
        mapped.append(j)
    hist.append(np.asarray(mapped, np.int32))
    unknown.append(miss)
  n = sum(len(m) for m in unknown)
  message = ""
  if n:
    m = sum(1 for x in unknown if x)
    message = (f"{source}: skipped {n} unknown item id(s) in {m} user(s) "
               f"(not among the run's {len(item_ids)} items); first: line "
               f"{first[0]}, item {first[1]!r}")
  return Mapped(hist, unknown, n, message)


def to_original(ids: np.ndarray, scores: np.ndarray, item_ids: Sequence):
  """One user's ([original ids], [scores]); padding slots (id 0) dropped."""
  keep = ids > 0
  return ([_plain(item_ids[i - 1]) for i in ids[keep]],
          [float(f"{s:.7g}") for s in scores[keep]])


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's resolved `<workdir>/config.json` (JSON lists back to tuples)."""
  if not os.path.isdir(workdir):
    raise RecommendError(f"workdir {workdir!r} not found")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RecommendError(f"{path} not found: {workdir!r} is not the workdir "
                         "of a training run")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(_tuples(json.load(f)))
  except json.JSONDecodeError as e:
    raise RecommendError(f"{path} is not valid JSON: {e}") from None


def _trained_phases(workdir: str) -> list:
  out = []
  if os.path.isdir(workdir):
    for name in sorted(os.listdir(workdir)):
      sel = os.path.join(workdir, name, "best.json")
      try:
        with open(sel) as f:
          if json.load(f).get("epoch", -1) >= 0:
            out.append(name)
      except (OSError, ValueError):
        pass
  return out


def phase_dir(config, workdir: str, phase: str) -> str:
  """The run directory holding `<phase>/best`: the workdir, or for
  'pretrain' of a run that reused another's phase 1, train.pretrain_dir."""
  if not phase or "/" in phase or phase in (".", ".."):
    raise RecommendError(f"--phase must be a phase name, got {phase!r}")
  candidates = [workdir]
  pre = config.get("train", {}).get("pretrain_dir", "")
  if phase == "pretrain" and pre:
    candidates.append(pre)
  for d in candidates:
    if phase in _trained_phases(d):
      return d
  trained = _trained_phases(workdir)
  raise RecommendError(
      f"phase {phase!r} is not trained in {workdir} (no "
      f"{os.path.join(workdir, phase, 'best.json')} with a selected epoch); "
      f"trained phases: {', '.join(trained) if trained else 'none'}")


def recommend_run(workdir: str, phase: str, k: int, out: str,
                  users: str | None = None, exclude_history: bool = True,
                  batch_size: int = 256, item_chunk: int | None = None,
                  shard_items: bool | None = None, devices: int = 1,
                  log=print) -> dict:
  """What the command does; returns a summary dict.

  Args:
    workdir, phase: a finished run and one of its phases ('pretrain',
      'cas', ...).
    out: the JSON-lines file to write ('-': stdout).
    users: a file of `uid item ...` lines in original ids (None: every user
      of the run's data, with their whole sequence).
    item_chunk, shard_items: as in `top_k`; None takes the run's
      eval.item_chunk / eval.shard_items.
    devices: devices of the mesh (0 = all visible; 1 = no mesh).
    log: where the warning and summary lines go.
  """
  if k < 1:
    raise RecommendError(f"--k must be >= 1, got {k}")
  config = load_run_config(workdir)
  run_dir = phase_dir(config, workdir, phase)
  mapped = None
  if users is not None:
    user_lines = read_users(users)
    try:
      item_ids = read_item_ids(workdir)
    except FileNotFoundError:
      item_ids = _item_ids_from_data(config, workdir)
    mapped = map_histories(user_lines, item_ids, source=users)
    if mapped.message:
      log(f"warning: {mapped.message}")
    histories = mapped.histories
    user_ids = [u.user for u in user_lines]
  else:
    ds = _load_data(config)
    item_ids = ds.item_ids
    stored = _stored_item_ids(workdir)
    if stored is not None and [_plain(x) for x in stored] != [
        _plain(x) for x in item_ids]:
      raise RecommendError(
          f"the data now read from {config.data.get('path') or 'the config'}"
          f" does not match {os.path.join(workdir, ITEM_IDS)} (the data the "
          "run was trained on changed)")
    histories = ds.sequences
    user_ids = ds.user_ids
  from cat_jax import train  # heavy: imported once the inputs are checked
  N = len(item_ids)
  try:
    model, params = train.selected_params(config, run_dir, phase, N)
  except FileNotFoundError as e:
    raise RecommendError(str(e)) from None
  mesh = sharding.make_mesh(devices) if devices != 1 else None
  if mesh is not None and mesh.size == 1:
    mesh = None
  if item_chunk is None:
    item_chunk = int(config.eval.get("item_chunk", 0))
  if shard_items is None:
    shard_items = bool(config.eval.get("shard_items", False))
  shard_items = shard_items and mesh is not None
  with train.matmul_precision(config):
    ids, scores = top_k(model, params, histories, k, exclude_history,
                        batch_size=batch_size, item_chunk=item_chunk,
                        mesh=mesh, shard_items=shard_items)
  n_short = int(np.sum(ids[:, -1] == 0)) if len(ids) else 0
  if is_chief():
    _write_lines(out, user_ids, ids, scores, item_ids,
                 mapped.unknown if mapped else None)
  summary = {"users": len(user_ids), "k": k, "phase": phase, "out": out,
             "items": N, "fewer_than_k": n_short}
  if mapped is not None:
    summary["unknown_items"] = mapped.num_unknown
    summary["users_with_unknown"] = sum(1 for x in mapped.unknown if x)
  return summary


def _load_data(config):
  try:
    return data_lib.load_from_config(config.data)
  except data_lib.DataError as e:
    raise RecommendError(f"cannot read the run's data: {e}") from None


def _stored_item_ids(workdir):
  try:
    return read_item_ids(workdir)
  except FileNotFoundError:
    return None


def _item_ids_from_data(config, workdir):
  try:
    return data_lib.load_from_config(config.data).item_ids
  except data_lib.DataError as e:
    raise RecommendError(
        f"{os.path.join(workdir, ITEM_IDS)} not found, and the run's data "
        f"cannot be read to map the ids instead: {e}") from None


def _write_lines(out, user_ids, ids, scores, item_ids, unknown):
  def lines():
    for u, uid in enumerate(user_ids):
      items, s = to_original(ids[u], scores[u], item_ids)
      rec = {"user": _plain(uid), "items": items, "scores": s}
      if unknown is not None:
        rec["unknown"] = unknown[u]
      yield json.dumps(rec) + "\n"

  if out == "-":
    sys.stdout.writelines(lines())
    sys.stdout.flush()
    return
  d = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(d):
    raise RecommendError(f"the folder of --out={out!r} does not exist")
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines())
  os.replace(tmp, out)


def main(argv):
  from absl import flags
  from cat_jax import writer
  if len(argv) > 1:
    print(f"recommend: error: unexpected arguments {argv[1:]}",
          file=sys.stderr)
    sys.exit(2)
  writer.quiet_library_logs()
  F = flags.FLAGS
  try:
    summary = recommend_run(
        F.workdir, F.phase, F.k, F.out, users=F.users,
        exclude_history=F.exclude_history, batch_size=F.batch_size,
        item_chunk=F.item_chunk if F.item_chunk >= 0 else None,
        shard_items=F.shard_items, devices=F.devices,
        log=lambda m: print(m, file=sys.stderr))
  except (RecommendError, data_lib.DataError, FileNotFoundError,
          ValueError, OSError) as e:
    msg = " ".join(str(e).split())
    print(f"recommend: error: {msg}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary), file=sys.stderr)


def define_flags():
  """Command-line flags (not defined on import)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "Workdir of a finished run.",
                      required=True)
  flags.DEFINE_string("phase", None, "Phase whose selected checkpoint "
                      "recommends: pretrain, cas, none, ...", required=True)
  flags.DEFINE_integer("k", 20, "Items per user.")
  flags.DEFINE_string("users", None, "File of 'uid item item ...' lines in "
                      "original ids (default: every user of the run's data, "
                      "whole sequence).")
  flags.DEFINE_string("out", "-", "Output JSON-lines file ('-': stdout).")
  flags.DEFINE_bool("exclude_history", True, "Never recommend an item of "
                    "the user's history.")
  flags.DEFINE_integer("batch_size", 256, "Users per device call.")
  flags.DEFINE_integer("item_chunk", -1, "Score this many items at a time "
                       "(0: all at once; -1: the run's eval.item_chunk).")
  flags.DEFINE_bool("shard_items", None, "Split the catalog across the "
                    "devices (default: the run's eval.shard_items).")
  flags.DEFINE_integer("devices", 1, "Devices to use (0: all visible).")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
