"""Data pipeline: k-core filtering, leave-one-out split, padded windows.

Everything here is host-side numpy; `cat_jax.train` moves the arrays built by
`build_arrays` onto the device once (or, with sharded tables, each process
builds its own rows with `train_rows` and `eval_rows`), so no batch ever
crosses the host/device boundary during training.

Conventions (the paper's and SASRec's):
  * items are 1..N, 0 is padding;
  * users are 0..U-1 internally (their original ids are kept in `Dataset.user_ids`);
  * every sequence is in time order, oldest first;
  * leave-one-out: last item = test target, second-to-last = validation target,
    the rest = training. Users with fewer than 3 interactions are training-only.
  * train-only users (`Dataset.num_real_users`; the fake users of
    `cat_jax.poisoning`) come after the real ones: their whole sequence is
    training data, they are never evaluated and `describe` counts them apart.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

# The file formats are read by `cat_jax.readers`; callers catch
# `data.DataError`.
from cat_jax.readers import FORMATS, READERS, DataError, guess_format


class TrainOnlySequence(np.ndarray):
  """An item sequence that is training data as a whole (a fake user's).

  `Dataset` gives this type to the sequences of its train-only users, so
  that `split` (and every caller that splits `ds.sequences[u]` itself, e.g.
  `batching.train_window_lengths`) sees no validation or test item in them.
  """


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Per-user item sequences in time order, items remapped to 1..num_items.

  Attributes:
    sequences: list of int32 arrays, one per user, oldest interaction first.
    num_items: N; item ids are 1..N and 0 is padding.
    user_ids: original user id (as read) of each internal user.
    item_ids: original item id of internal item i at index i-1.
    num_real_users: users 0..num_real_users-1 are real; the ones after them
      are train-only (injected fake users, `cat_jax.poisoning`): their whole
      sequence is training data (no validation/test item), they are never
      evaluated and not counted in `describe`'s statistics. None (default)
      = every user is real; it is then set to the number of users. Their
      sequences are stored as `TrainOnlySequence`.
  """
  sequences: list
  num_items: int
  user_ids: list
  item_ids: list
  num_real_users: int | None = None

  def __post_init__(self):
    U = len(self.sequences)
    n = U if self.num_real_users is None else int(self.num_real_users)
    if not 0 <= n <= U:
      raise ValueError(f"num_real_users={self.num_real_users} is not in "
                       f"0..{U} (the number of sequences).")
    object.__setattr__(self, "num_real_users", n)
    if n < U or any(isinstance(x, TrainOnlySequence)
                    for x in self.sequences):
      object.__setattr__(self, "sequences", [
          np.asarray(x) if u < n else np.asarray(x).view(TrainOnlySequence)
          for u, x in enumerate(self.sequences)])

  @property
  def num_users(self) -> int:
    """All users, train-only ones included."""
    return len(self.sequences)

  @property
  def num_fake_users(self) -> int:
    """Train-only users (after the real ones)."""
    return self.num_users - self.num_real_users

  def is_real(self, u: int) -> bool:
    """Whether user u is a real user (not train-only)."""
    return 0 <= u < self.num_real_users

  @property
  def num_interactions(self) -> int:
    """All interactions, train-only users' included."""
    return int(sum(len(s) for s in self.sequences))


# ----------------------------------------------------------------------------
# Filtering and remapping.
# ----------------------------------------------------------------------------


def kcore_filter(raw: dict, k: int) -> dict:
  """Iteratively drops users and items with fewer than k interactions."""
  if k <= 1:
    return raw
  seqs = dict(raw)
  while True:
    counts = {}
    for items in seqs.values():
      for i in items:
        counts[i] = counts.get(i, 0) + 1
    new = {}
    for u, items in seqs.items():
      kept = [i for i in items if counts[i] >= k]
      if len(kept) >= k:
        new[u] = kept
    if new.keys() == seqs.keys() and all(
        len(new[u]) == len(seqs[u]) for u in new):
      return new
    seqs = new


def remap(raw: dict) -> Dataset:
  """Maps items to 1..N in order of first appearance, users in file order.

  For the ../shared/data files, whose ids were assigned the same way, this is
  the identity on items.
  """
  item_index = {}
  sequences, user_ids = [], []
  for u, items in raw.items():
    mapped = []
    for i in items:
      j = item_index.get(i)
      if j is None:
        j = item_index[i] = len(item_index) + 1
      mapped.append(j)
    sequences.append(np.asarray(mapped, dtype=np.int32))
    user_ids.append(u)
  return Dataset(sequences=sequences, num_items=len(item_index),
                 user_ids=user_ids, item_ids=list(item_index))


def load_dataset(path: str, fmt: str = "auto", kcore: int = 0) -> Dataset:
  """Reads, optionally k-core filters, and remaps a data file."""
  if fmt == "auto":
    fmt = guess_format(path)
  if fmt not in READERS:
    raise DataError(
        f"Unknown data format {fmt!r}; choose one of {('auto',) + FORMATS}.")
  raw = kcore_filter(READERS[fmt](path), kcore)
  if not raw:
    raise DataError(f"No users left in {path!r} after {kcore}-core filtering.")
  return remap(raw)


# ----------------------------------------------------------------------------
# Synthetic data with real sequential structure.
# ----------------------------------------------------------------------------


def synthetic_dataset(num_users: int = 2000, num_items: int = 500,
                      num_clusters: int = 20, mean_length: float = 20.0,
                      min_length: int = 5, p_next: float = 0.6,
                      p_stay: float = 0.3, zipf: float = 1.1,
                      seed: int = 0) -> Dataset:
  """Users walking a Markov chain over items grouped in clusters.

  Items are split into `num_clusters` clusters, each an ordered chain. From
  item i a user goes to the next item of i's chain with prob `p_next`, to a
  popularity-weighted item of the same cluster with prob `p_stay`, and else to
  a popularity-weighted (Zipf(`zipf`)) item anywhere. Items are not repeated
  within a user. The first item is drawn by popularity. So the last item
  predicts the next one well, and a popularity ranker does poorly.

  Returns a `Dataset`; deterministic in `seed`.
  """
  if num_items < 2 * num_clusters:
    raise ValueError("synthetic data needs at least 2 items per cluster")
  rng = np.random.default_rng(seed)
  pop = 1.0 / np.arange(1, num_items + 1) ** zipf
  pop = pop[rng.permutation(num_items)]
  pop /= pop.sum()
  cluster = rng.integers(0, num_clusters, size=num_items)
  cluster[:num_clusters] = np.arange(num_clusters)  # no empty cluster
  members = [np.flatnonzero(cluster == c) for c in range(num_clusters)]
  successor = np.empty(num_items, dtype=np.int64)
  for m in members:
    order = rng.permutation(m)
    successor[order] = np.roll(order, -1)
  cluster_pop = [pop[m] / pop[m].sum() for m in members]
  # `rng.choice(a, p=p)` rebuilds p's CDF on every call (O(items) each, most
  # of the demo's start-up); these draw the same items from the same random
  # numbers (numpy's own method: one `rng.random()`, then a search in the
  # normalised CDF).
  def cdf(p):
    c = np.cumsum(p)
    return c / c[-1]

  pop_cdf = cdf(pop)
  cluster_cdf = [cdf(p) for p in cluster_pop]

  def draw(c):
    """An index drawn with the probabilities whose CDF is `c`."""
    return int(c.searchsorted(rng.random(), side="right"))

  lengths = np.maximum(min_length, rng.poisson(mean_length, size=num_users))
  lengths = np.minimum(lengths, num_items // 2)
  sequences = []
  for length in lengths:
    seen = set()
    seq = []
    cur = draw(pop_cdf)
    for _ in range(length):
      for _ in range(20):  # a few tries to avoid a repeat
        if cur not in seen:
          break
        cur = draw(pop_cdf)
      if cur in seen:
        break
      seen.add(cur)
      seq.append(cur)
      u = rng.random()
      if u < p_next:
        cur = successor[cur]
      elif u < p_next + p_stay:
        c = cluster[cur]
        cur = int(members[c][draw(cluster_cdf[c])])
      else:
        cur = draw(pop_cdf)
    sequences.append(np.asarray(seq, dtype=np.int64) + 1)
  raw = {u: s.tolist() for u, s in enumerate(sequences)}
  return remap(raw)


# ----------------------------------------------------------------------------
# Split and padded arrays.
# ----------------------------------------------------------------------------


def split(seq: np.ndarray):
  """Leave-one-out split of one sequence: (train, valid_item, test_item).

  valid_item and test_item are 0 for users with fewer than 3 interactions,
  and for a train-only user's sequence (`TrainOnlySequence`): their whole
  sequence is training data.
  """
  if isinstance(seq, TrainOnlySequence):
    return np.asarray(seq), 0, 0
  if len(seq) < 3:
    return seq, 0, 0
  return seq[:-2], int(seq[-2]), int(seq[-1])


def left_pad(seq: Sequence[int], length: int) -> np.ndarray:
  """The last `length` items of `seq`, left-padded with 0 to `length`."""
  out = np.zeros(length, dtype=np.int32)
  tail = np.asarray(seq[-length:] if length else [], dtype=np.int32)
  if len(tail):
    out[length - len(tail):] = tail
  return out


@dataclasses.dataclass(frozen=True)
class Arrays:
  """Dense int32 arrays for the device; see `build_arrays`.

  Attributes:
    train_inputs: [U, T] left-padded training input windows.
    train_targets: [U, T] next-item targets (0 where there is none).
    history: [U, H] each user's training items, sorted ascending, padded with
      the sentinel N+1 (H = longest training history). Used for exact
      negative sampling and for excluding history from the ranking.
    train_users: [U_train] users with at least one training target.
    eval_users: [E] users with a validation and a test item.
    valid_inputs, test_inputs: [E, T] input windows for validation (training
      items) and test (training items + validation item).
    valid_targets, test_targets: [E] targets.
    num_items: N.
  """
  train_inputs: np.ndarray
  train_targets: np.ndarray
  history: np.ndarray
  train_users: np.ndarray
  eval_users: np.ndarray
  valid_inputs: np.ndarray
  valid_targets: np.ndarray
  test_inputs: np.ndarray
  test_targets: np.ndarray
  num_items: int

  @property
  def max_len(self) -> int:
    return self.train_inputs.shape[1]


def check_users(ds: Dataset):
  """Raises DataError if some user leaves no item to sample as a negative."""
  for u, seq in enumerate(ds.sequences):
    if len(split(seq)[0]) == ds.num_items:
      raise DataError(
          f"user {ds.user_ids[u]} has interacted with every item: no negative "
          "item can be sampled for it; drop it (e.g. with k-core filtering).")


def history_width(ds: Dataset) -> int:
  """H: the longest training history (at least 1)."""
  return max(1, max((len(split(s)[0]) for s in ds.sequences), default=0))


def train_user_index(ds: Dataset) -> np.ndarray:
  """[U_train] int32: users with at least one training target (2+ items),
  train-only (fake) users included."""
  return np.asarray([u for u, s in enumerate(ds.sequences)
                     if len(split(s)[0]) >= 2], np.int32)


def eval_user_index(ds: Dataset) -> np.ndarray:
  """[E] int32: real users with a validation and a test item."""
  return np.asarray([u for u, s in enumerate(ds.sequences)
                     if ds.is_real(u) and split(s)[1]], np.int32)


def train_rows(ds: Dataset, users: np.ndarray, max_len: int, width: int):
  """Training windows and histories of some users (rows of `build_arrays`).

  The training window of a user is the last max_len+1 training items: inputs
  are its first max_len, targets its last max_len (the SASRec convention).
  A train-only user's training items are its whole sequence.

  Args:
    users: [n] user indices; an index outside 0..U-1 gives an empty row
      (no inputs, no targets, no history), used to pad sharded tables.
    width: H, the history width (`history_width(ds)`).

  Returns:
    (inputs [n, T], targets [n, T], history [n, H]) int32.
  """
  T, N = max_len, ds.num_items
  inputs = np.zeros((len(users), T), np.int32)
  targets = np.zeros((len(users), T), np.int32)
  history = np.full((len(users), width), N + 1, np.int32)
  for r, u in enumerate(users):
    if not 0 <= u < ds.num_users:
      continue
    tr = split(ds.sequences[u])[0]
    window = tr[-(T + 1):]
    inputs[r] = left_pad(window[:-1], T)
    targets[r] = left_pad(window[1:], T)
    history[r, :len(tr)] = np.sort(tr)
  return inputs, targets, history


def eval_rows(ds: Dataset, users: np.ndarray, max_len: int):
  """Validation and test inputs and targets of some users with both items.

  Args:
    users: [n] user indices from `eval_user_index`; -1 gives an empty row
      (target 0, which evaluation skips), used to pad sharded tables.

  Returns:
    (valid_inputs [n, T], valid_targets [n], test_inputs [n, T],
    test_targets [n]) int32; the validation item is the last test input.
  """
  n, T = len(users), max_len
  vin, tin = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
  vt, tt = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for r, u in enumerate(users):
    if u < 0:
      continue
    tr, vt[r], tt[r] = split(ds.sequences[u])
    vin[r] = left_pad(tr, T)
    tin[r] = left_pad(np.append(tr, vt[r]), T)
  return vin, vt, tin, tt


def build_arrays(ds: Dataset, max_len: int) -> Arrays:
  """Leave-one-out split and left-padded windows of the last `max_len` items,
  for every user (see `train_rows` and `eval_rows`)."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  check_users(ds)
  inputs, targets, history = train_rows(
      ds, np.arange(ds.num_users), max_len, history_width(ds))
  eval_users = eval_user_index(ds)
  vin, vt, tin, tt = eval_rows(ds, eval_users, max_len)
  return Arrays(
      train_inputs=inputs, train_targets=targets, history=history,
      train_users=train_user_index(ds), eval_users=eval_users,
      valid_inputs=vin, valid_targets=vt, test_inputs=tin, test_targets=tt,
      num_items=ds.num_items)


def describe(ds: Dataset) -> dict:
  """Size statistics, as in the paper's Table 1, of the real users.

  With train-only (fake) users, `fake_users` and `fake_interactions` count
  them; they are in none of the other numbers.
  """
  n = ds.num_real_users
  lengths = np.array([len(s) for s in ds.sequences[:n]] or [0])
  out = {
      "users": n, "items": ds.num_items,
      "interactions": int(lengths.sum()),
      # Rounded for reading (Table 1 gives density to 2-3 digits too).
      "avg_length": round(float(lengths.mean()), 2),
      "max_length": int(lengths.max()),
      "density": float(f"{lengths.sum() / max(n * ds.num_items, 1):.3g}"),
  }
  if ds.num_fake_users:
    out["fake_users"] = ds.num_fake_users
    out["fake_interactions"] = int(sum(len(s) for s in ds.sequences[n:]))
  return out


def resolve_path(path: str, data_dir: str | None = None) -> str:
  """Finds `path` as given, or under `data_dir` / $CAT_DATA_DIR."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return path
  data_dir = data_dir or os.environ.get("CAT_DATA_DIR", "")
  if data_dir:
    return os.path.join(data_dir, path)
  return path


def load_from_config(cfg) -> Dataset:
  """Builds the clean data set named by a `config.data` ConfigDict.

  `cfg.poison` is not applied here: the data pipeline knows nothing of
  poisoning. `cat_jax.poisoning.load_from_config` loads the data of a
  config with its fake users.
  """
  if cfg.name == "synthetic":
    s = cfg.synthetic
    ds = synthetic_dataset(
        num_users=s.num_users, num_items=s.num_items,
        num_clusters=s.num_clusters, mean_length=s.mean_length,
        p_next=s.p_next, p_stay=s.p_stay, zipf=s.zipf, seed=s.seed)
  elif cfg.name != "file":
    raise DataError(
        f"Unknown data.name {cfg.name!r}; use 'synthetic' or 'file'.")
  else:
    ds = load_dataset(resolve_path(cfg.path), cfg.format, cfg.kcore)
  return ds
