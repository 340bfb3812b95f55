"""Robustness under item replacement (Tan et al., Sec. 5.6, Fig. 5 and 6).

`evaluate_robustness` attacks the test (or validation) windows with a rule of
`cat_jax.attacks` (positions first / middle / last and the last K; modes
minimal, cosine, step, snap, random: see that module's docstring), ranks
the attacked windows with the clean evaluation's full-ranking protocol, and
reports the relative drops and what the replacements are like.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import batching, evaluate
# The attack rules, re-exported: `robustness.<name>` is their public path too.
from cat_jax.attacks import (ANCHORS, MODE_ALIASES, MODES, POSITIONS,
                             STEP_MODES, allowed_replacements, attack_batch,
                             attack_positions, make_attack,
                             median_nn_distance, minimal_replacements,
                             pick_distinct, random_replacements,
                             replace_items, resolve_mode, step_replacements,
                             target_gradient)

__all__ = [
    "ANCHORS", "MODE_ALIASES", "MODES", "POSITIONS", "STEP_MODES",
    "allowed_replacements", "attack_batch", "attack_positions",
    "evaluate_robustness", "item_counts", "make_attack", "median_nn_distance",
    "minimal_replacements", "pick_distinct", "random_replacements",
    "relative_drop", "replace_items", "replacement_stats", "resolve_mode",
    "step_replacements", "target_gradient"]


def item_counts(train_inputs, num_items: int) -> np.ndarray:
  """[N+1] int: how often each item is an input of the training windows."""
  x = np.asarray(train_inputs).reshape(-1)
  return np.bincount(x[x > 0], minlength=num_items + 1)


def replacement_stats(norms: np.ndarray, counts: np.ndarray,
                      originals: np.ndarray, replacements: np.ndarray) -> dict:
  """What the replacements are like, against the items they replace.

  Medians over the replaced slots of ||E_new|| / ||E_old|| and of the
  training-input counts (`item_counts`) of the old and the new items: an
  attack that swaps items for rarely trained ones of small norm removes
  information rather than substituting a similar item. NaN when nothing was
  replaced.
  """
  if originals.size == 0:
    nan = float("nan")
    return {"norm_ratio": nan, "count_original": nan,
            "count_replacement": nan}
  return {"norm_ratio": float(np.median(norms[replacements]
                                        / np.maximum(norms[originals],
                                                     1e-30))),
          "count_original": float(np.median(counts[originals])),
          "count_replacement": float(np.median(counts[replacements]))}


def relative_drop(clean: float, attacked: float) -> float:
  """(clean - attacked) / clean; NaN when the clean metric is 0."""
  return (clean - attacked) / clean if clean > 0 else float("nan")


def evaluate_robustness(model, params, data: dict, num_items: int, *,
                        positions: Sequence[str] = POSITIONS,
                        last_k: Sequence[int] = (1, 2, 3, 4, 5),
                        mode: str = "minimal", alpha=None,
                        batch_size: int = 256, ks: Sequence[int] = (10,),
                        rng=None, split: str = "test",
                        plan: batching.EvalPlan | None = None,
                        anchor: str = "items") -> dict:
  """Clean and attacked full-ranking metrics, and their relative drops.

  Args:
    model, params: the attacked model.
    data: device data (`train.device_data`).
    num_items: N.
    positions: single-item attacks to run (Fig. 5).
    last_k: K values of the last-K attack (Fig. 6).
    mode: 'minimal' (Sec. 5.6), 'cosine', 'step', 'snap' or 'random'
      (module docstring; 'gradient' is an alias of 'step').
    alpha: step of modes 'step' and 'snap'; None = `median_nn_distance` of
      the item table. Unused by the other modes.
    batch_size: users per batch (attack and ranking).
    ks: metric cut-offs.
    rng: PRNG key; required for mode 'random', unused otherwise.
    split: 'test' (the validation item is history) or 'valid'.
    plan: length buckets of the evaluation rows (`batching.eval_plan`):
      attack and ranking run each bucket on its last T_b columns. Modes
      other than 'random' give the same result as without (each row is
      attacked on its own); 'random' draws per batch, so other items.
    anchor: 'items' (default: 'first'/'middle' of each window's real items)
      or 'window' (the fixed slots 0 and (T - 1) // 2 of the input window;
      module docstring).

  Returns:
    {"mode" (as resolved), "alpha" (float for 'step'/'snap', else None),
     "split", "anchor", "clean": evaluate.summarize dict,
     "attacks": {name: summarize dict + "<metric>_drop" for ndcg@K, hr@K and
     mrr, + "replaced" (mean items replaced per user) + the medians of
     `replacement_stats`}}, with names
     'first', 'middle', 'last' and 'last_<K>'. The exclusions are those of
    clean evaluation; the replacement items are not added to them.
  """
  mode = resolve_mode(mode)
  if anchor not in ANCHORS:
    raise ValueError(f"Unknown anchor {anchor!r}; choose one of {ANCHORS}.")
  if mode == "random" and rng is None:
    raise ValueError("mode='random' needs an explicit rng key.")
  rng = jax.random.PRNGKey(0) if rng is None else rng  # used by 'random'
  inputs, targets, users, extra = evaluate.split_inputs(data, split)
  history = data["history"]
  ranker = evaluate.make_ranker(evaluate.model_scores(model), num_items,
                                batch_size, plan=plan)

  def summary(windows):
    r = ranker(params, windows, targets, users, extra, history)
    return evaluate.summarize(np.asarray(r), ks)

  clean = summary(inputs)
  if mode not in STEP_MODES:
    alpha = None
  elif alpha is None:
    alpha = median_nn_distance(model.items(params))
  step = jnp.asarray(0.0 if alpha is None else alpha, jnp.float32)
  attack = make_attack(model, num_items, batch_size, mode)
  runs = [(w, w, 1) for w in positions] + [(f"last_{k}", "last", k)
                                          for k in last_k]
  metrics = [m for m in clean if m != "users"]
  norms = np.linalg.norm(np.asarray(model.items(params), np.float64), axis=-1)
  counts = item_counts(data["train_inputs"], num_items)
  out = {}
  T = inputs.shape[1]
  groups = [(T, slice(None))] if plan is None else list(
      zip(plan.lengths, plan.rows))
  for i, (name, where, k) in enumerate(runs):
    attacked = inputs
    for b, (t, rows) in enumerate(groups):
      # A window of bucket t has at most t real items, so the last k > t
      # positions of the full window hold padding that is never replaced.
      sub = inputs[rows, T - t:]
      pos, valid = attack_positions(sub, where, min(k, t),
                                    T if anchor == "window" else None)
      key = jax.random.fold_in(rng, i)
      sub = attack(params, sub, targets[rows], users[rows], extra[rows],
                   history, pos, valid, step,
                   key if plan is None else jax.random.fold_in(key, b))
      attacked = attacked.at[rows, T - t:].set(sub)
    s = summary(attacked)
    s.update({f"{m}_drop": relative_drop(clean[m], s[m]) for m in metrics})
    changed = np.asarray(attacked != inputs)
    s["replaced"] = float(np.mean(np.sum(changed, 1)))
    s.update(replacement_stats(norms, counts, np.asarray(inputs)[changed],
                               np.asarray(attacked)[changed]))
    out[name] = s
  return {"mode": mode, "alpha": None if alpha is None else float(alpha),
          "split": split, "anchor": anchor,
          "clean": clean, "attacks": out}
