"""Data poisoning: fake users that promote target items, and target metrics.

Beyond the paper (issue 14). Tan et al. test robustness only by replacing
items in a test user's history (`cat_jax.robustness`); the other threat is
poisoning: fake users injected into the training data to push target items
into real users' recommendations (shilling attacks; PamaCF, Zhang et al.,
arXiv 2410.22844, measures it with T-HR@50 / T-NDCG@50).

The attack (`poison`, or `data.poison` in the config):
  * Targets: `num_targets` items drawn uniformly, without replacement, among
    the less popular half of the items: items 1..N sorted by training
    popularity (interactions in the real users' training parts), ties by
    item id, the first N // 2 of them. Deterministic in `seed` and the data
    only (not in the attack or share), so every attack and the clean
    reference have the same targets.
  * Fake users: max(1, round(share * U)) of them for share > 0, U the number
    of real users; fake user k promotes target k mod num_targets (each
    target gets the same number of fake users, +-1).
  * Layout of a fake sequence: `repeats` blocks of `filler_len` distinct
    filler items followed by the target,
      [f_1 .. f_k, t, f_k+1 .. f_2k, t, ..., t]      (length repeats*(k+1)).
    A sequential model learns "what comes next": the target must follow the
    fillers to be learned as their continuation (a target placed first
    would only be an input), and each block adds one more training step
    whose next item is the target, from a different context. Fillers are
    never a target item and do not repeat within a fake user.
  * Fillers: 'random' draws them uniformly among all items (random attack);
    'bandwagon' among the ceil(popular_share * N) most popular items (at
    least the fillers one fake user needs; equal counts by increasing item
    id), so that the target is learned as the continuation of what many
    real users have seen (bandwagon attack).
  * Fake users are appended after the real users as train-only users
    (`data.Dataset.num_real_users`): their whole sequence is training data,
    they are never evaluated and never count in the clean metrics. They use
    existing items only; their user ids are 'fake0', 'fake1', ... (with a
    '_' prefix added until no real id collides).

Target metrics (`evaluate_targets`): for every real evaluated user (the test
input windows; the user's training items and validation item are history)
and every target item not in that user's history, the target's full-ranking
rank among the candidates (pessimistic ties and history excluded, as
`metrics.target_rank`);
  T-HR@K   = mean over (user, target) pairs of [rank <= K],
  T-NDCG@K = mean over the pairs of 1/log2(1 + rank) if rank <= K else 0.
Sums and the pair count are taken on the host in float64.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import data as data_lib
from cat_jax import evaluate

ATTACKS = ("none", "random", "bandwagon")


def item_popularity(ds: data_lib.Dataset) -> np.ndarray:
  """[N+1] int64: interactions of each item in the real users' training
  parts (the leave-one-out training items; index 0 is 0)."""
  counts = np.zeros(ds.num_items + 1, np.int64)
  for u in range(ds.num_real_users):
    np.add.at(counts, np.asarray(data_lib.split(ds.sequences[u])[0],
                                 np.int64), 1)
  counts[0] = 0
  return counts


def popularity_order(ds: data_lib.Dataset,
                     descending: bool = False) -> np.ndarray:
  """Items 1..N from least to most popular (`item_popularity`), or from
  most to least with `descending`; equal counts by increasing item id."""
  pop = item_popularity(ds)[1:]
  return np.lexsort((np.arange(1, ds.num_items + 1),
                     -pop if descending else pop)) + 1


def choose_targets(ds: data_lib.Dataset, num_targets: int,
                   seed: int) -> np.ndarray:
  """[num_targets] target items, sorted: drawn uniformly without replacement
  among the N // 2 least popular items (`popularity_order`), from `seed`.

  Only the real users count, so a poisoned data set gives the targets of
  its clean one.
  """
  pool = popularity_order(ds)[:ds.num_items // 2]
  if not 1 <= num_targets <= len(pool):
    raise ValueError(f"data.poison.num_targets must be in 1..{len(pool)} "
                     f"(half of the {ds.num_items} items), got {num_targets}.")
  rng = np.random.default_rng([seed, 0])
  return np.sort(rng.choice(pool, size=num_targets, replace=False)).astype(
      np.int32)


def num_fake_users(num_real: int, share: float) -> int:
  """max(1, round(share * num_real)) for share > 0, else 0."""
  if share <= 0:
    return 0
  return max(1, int(round(share * num_real)))


def filler_pool(ds: data_lib.Dataset, attack: str, targets,
                popular_share: float, needed: int) -> np.ndarray:
  """Items a fake user's fillers are drawn from (never a target).

  'random': every item; 'bandwagon': the ceil(popular_share * N) most popular
  items (at least `needed`; equal counts by increasing item id).
  """
  if attack == "random":
    pool = np.arange(1, ds.num_items + 1)
  elif attack == "bandwagon":
    top = max(int(math.ceil(popular_share * ds.num_items)), needed)
    pool = popularity_order(ds, descending=True)[:top]
  else:
    raise ValueError(f"Unknown data.poison.attack {attack!r}; choose one of "
                     f"{ATTACKS}.")
  pool = pool[~np.isin(pool, targets)]
  if len(pool) < needed:
    raise ValueError(f"The {attack} attack needs {needed} distinct filler "
                     f"items per fake user but has only {len(pool)}; lower "
                     "data.poison.filler_len or data.poison.repeats.")
  return pool


def fake_sequences(ds: data_lib.Dataset, attack: str, num_fake: int,
                   targets, filler_len: int, repeats: int,
                   popular_share: float, seed: int) -> list:
  """The fake users' sequences (module docstring for the layout).

  Returns:
    num_fake int32 arrays of length repeats * (filler_len + 1); fake user k
    ends each of its blocks with targets[k % len(targets)].
  """
  if filler_len < 1 or repeats < 1:
    raise ValueError("data.poison.filler_len and data.poison.repeats must be "
                     f">= 1, got {filler_len} and {repeats}.")
  targets = np.asarray(targets, np.int64)
  need = filler_len * repeats
  pool = filler_pool(ds, attack, targets, popular_share, need)
  rng = np.random.default_rng([seed, 1])
  out = []
  for k in range(num_fake):
    fill = rng.choice(pool, size=need, replace=False).reshape(repeats,
                                                              filler_len)
    t = np.full((repeats, 1), targets[k % len(targets)])
    out.append(np.concatenate([fill, t], axis=1).ravel().astype(np.int32))
  return out


def fake_user_ids(ds: data_lib.Dataset, num_fake: int) -> list:
  """'fake0', 'fake1', ...; '_' prefixes are added until no id collides."""
  existing = set(map(str, ds.user_ids))
  prefix = "fake"
  while any(f"{prefix}{k}" in existing for k in range(num_fake)):
    prefix = "_" + prefix
  return [f"{prefix}{k}" for k in range(num_fake)]


def poison(ds: data_lib.Dataset, attack: str, share: float = 0.01,
           num_targets: int = 5, filler_len: int = 4, repeats: int = 3,
           popular_share: float = 0.05,
           seed: int = 0) -> tuple[data_lib.Dataset, np.ndarray]:
  """(poisoned data set, targets): `ds` with fake users appended.

  Args:
    ds: the clean data set (fake users already in it stay, after the real
      ones, before the new ones).
    attack: one of ATTACKS; 'none' returns `ds` itself (and the targets).
    share: fake users per real user.
    num_targets, filler_len, repeats, popular_share: module docstring.
    seed: of the targets and the fake users; the same arguments give the
      same data set.

  The fake users are train-only (`data.Dataset.num_real_users`).
  """
  if attack not in ATTACKS:
    raise ValueError(f"Unknown data.poison.attack {attack!r}; choose one of "
                     f"{ATTACKS}.")
  if not share >= 0:
    raise ValueError(f"data.poison.share must be >= 0, got {share}.")
  if attack == "bandwagon" and not 0 < popular_share <= 1:
    raise ValueError("data.poison.popular_share must be in (0, 1], got "
                     f"{popular_share}.")
  targets = choose_targets(ds, num_targets, seed)
  if attack == "none":
    return ds, targets
  n = num_fake_users(ds.num_real_users, share)
  fakes = fake_sequences(ds, attack, n, targets, filler_len, repeats,
                         popular_share, seed)
  return data_lib.Dataset(
      sequences=list(ds.sequences) + fakes, num_items=ds.num_items,
      user_ids=list(ds.user_ids) + fake_user_ids(ds, n),
      item_ids=list(ds.item_ids),
      num_real_users=ds.num_real_users), targets


def _kwargs(cfg) -> dict:
  return dict(attack=cfg.attack, share=float(cfg.share),
              num_targets=int(cfg.num_targets),
              filler_len=int(cfg.filler_len), repeats=int(cfg.repeats),
              popular_share=float(cfg.popular_share), seed=int(cfg.seed))


def poison_from_config(ds: data_lib.Dataset, cfg) -> data_lib.Dataset:
  """`poison` with the fields of a `config.data.poison` ConfigDict."""
  return poison(ds, **_kwargs(cfg))[0]


def load_from_config(cfg) -> data_lib.Dataset:
  """The data set of a `config.data` ConfigDict, with its fake users.

  `data.load_from_config` (the clean data), then, with `cfg.poison.attack`
  other than 'none', the fake users of `poison_from_config` appended as
  train-only users (deterministic in `cfg.poison.seed`). Training, the
  analyses and the recommendation command load a config's data here.
  """
  ds = data_lib.load_from_config(cfg)
  poison_cfg = cfg.get("poison")
  if poison_cfg is not None and poison_cfg.get("attack", "none") != "none":
    ds = poison_from_config(ds, poison_cfg)
  return ds


def targets_from_config(ds: data_lib.Dataset, cfg) -> np.ndarray:
  """The target items of `config.data.poison` (whatever its attack; the
  same for `ds` clean or poisoned by it)."""
  return choose_targets(ds, int(cfg.num_targets), int(cfg.seed))


# ----------------------------------------------------------------------------
# Target metrics.
# ----------------------------------------------------------------------------


def target_ranks(score_fn: Callable, params, data: dict, num_items: int,
                 targets: Sequence[int], batch_size: int, plan=None,
                 mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of each target for every evaluated user, and which pairs count.

  Uses `evaluate.make_ranker` on the test split (history = the user's
  training items and validation item, pessimistic ties), one call per
  target with every row's target set to it.

  Args:
    score_fn: score_fn(params, inputs [B, T]) -> [B, N+1].
    data: device tables (`batching.device_data`): test_inputs,
      test_targets, valid_targets, eval_users, history.
    targets: the target items.
    plan: optional `batching.EvalPlan` of the test windows (same ranks).

  Returns:
    (ranks [n_targets, E] int32, valid [n_targets, E] bool). valid is False
    where the target is in the user's history (training items or validation
    item) and on padding rows (test target 0); those ranks are meaningless.
  """
  ranker = evaluate.make_ranker(score_fn, num_items, batch_size, mesh,
                                plan=plan)
  inputs, real_targets, users, extra = evaluate.split_inputs(data, "test")
  history = data["history"]

  in_history = jax.jit(lambda h, u, e, j: jnp.any(h[u] == j, axis=1) |
                       (e == j))

  ranks, valid = [], []
  for j in targets:
    tj = jnp.full(real_targets.shape, int(j), real_targets.dtype)
    ranks.append(np.asarray(ranker(params, inputs, tj, users, extra,
                                   history)))
    valid.append(np.asarray(real_targets > 0) &
                 ~np.asarray(in_history(history, users, extra, int(j))))
  E = int(real_targets.shape[0])
  if not ranks:
    return np.zeros((0, E), np.int32), np.zeros((0, E), bool)
  return np.stack(ranks), np.stack(valid)


def target_metrics(ranks: np.ndarray, valid: np.ndarray, k: int = 50,
                   targets: Sequence[int] | None = None) -> dict:
  """T-HR@k and T-NDCG@k over the valid (user, target) pairs (float64).

  Returns:
    {'t_hr@k', 't_ndcg@k', 'pairs', 'hits'} and, with `targets`,
    'per_target': {item: {'t_hr@k', 'pairs'}}.
  """
  r = np.asarray(ranks, np.float64)
  v = np.asarray(valid, bool)
  hit = v & (r >= 1) & (r <= k)
  gain = np.where(hit, 1.0 / np.log2(np.where(hit, r, 1.0) + 1.0), 0.0)
  n = int(v.sum())
  out = {f"t_hr@{k}": float(hit.sum() / max(n, 1)),
         f"t_ndcg@{k}": float(gain.sum() / max(n, 1)),
         "pairs": n, "hits": int(hit.sum())}
  if targets is not None:
    out["per_target"] = {
        str(int(t)): {f"t_hr@{k}": float(hit[i].sum() / max(v[i].sum(), 1)),
                      "pairs": int(v[i].sum())}
        for i, t in enumerate(targets)}
  return out


def evaluate_targets(model, params, data: dict, num_items: int, targets,
                     batch_size: int = 256, k: int = 50, plan=None,
                     mesh=None) -> dict:
  """`target_metrics` of a model (`evaluate.model_scores`) on the test
  windows of `data` (the real users only: fake users are never evaluated)."""
  ranks, valid = target_ranks(evaluate.model_scores(model), params, data,
                              num_items, targets, batch_size, plan, mesh)
  return target_metrics(ranks, valid, k, targets)
