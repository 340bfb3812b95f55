"""Throughput benchmarks: one JSON line per measurement on stdout.

  python benchmarks/bench.py                         # ml1m and video shapes
  python benchmarks/bench.py --shapes=ml1m,video,large --repeats=5
  python benchmarks/bench.py --shapes=video --what=epoch_base,eval

Each measurement runs once to compile (not timed), then `--repeats` times;
the median is reported. Data are synthetic with the named shape (users,
items, interactions, T), generated here, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import adversarial, cascade, config_lib, data, evaluate, models
from cat_jax import train

# name: (users, items, mean sequence length, T)
SHAPES = {
    "ml1m": (6040, 3416, 165.0, 200),
    "video": (24303, 10672, 9.54, 50),
    "large": (1_000_000, 1_000_000, 12.0, 50),
}
WHAT = ("epoch_base", "epoch_cas", "eval", "cascade")


def random_dataset(users: int, items: int, mean_len: float,
                   seed: int = 0) -> data.Dataset:
  """Random sequences of the given shape (min length 5, no repeats)."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.geometric(1.0 / max(mean_len - 4, 1.0), users) + 4,
                    5, min(items - 1, 20 * int(mean_len)))
  pop = 1.0 / np.arange(1, items + 1) ** 0.8
  pop /= pop.sum()
  flat = rng.choice(items, size=int(lengths.sum()), p=pop) + 1
  seqs = np.split(flat.astype(np.int32), np.cumsum(lengths)[:-1])
  # Repeats are harmless for timing; keep first occurrences only.
  seqs = [s[np.sort(np.unique(s, return_index=True)[1])] for s in seqs]
  seqs = [s if len(s) >= 3 else np.arange(1, 4, dtype=np.int32) for s in seqs]
  return data.Dataset(sequences=seqs, num_items=items,
                      user_ids=list(range(users)), item_ids=[])


def timed(fn, repeats: int) -> tuple[float, list]:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_shape(name: str, what, repeats: int, model_name: str,
                item_chunk: int = 0):
  users, items, mean_len, T = SHAPES[name]
  ds = random_dataset(users, items, mean_len)
  arrays = data.build_arrays(ds, T)
  cfg = config_lib.base_config()
  cfg.model.name = model_name
  dd = train.device_data(arrays)
  model = models.build_model(cfg.model, items, T)
  opt = train.make_optimizer(cfg.train)
  n_train = int(dd["train_users"].shape[0])
  shape = {"users": users, "items": items,
           "interactions": int(sum(len(s) for s in ds.sequences)), "T": T}
  base = {"device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "shape": name, **shape,
          "model": model_name}

  for w in what:
    if w.startswith("epoch_"):
      method = "none" if w == "epoch_base" else "cas"
      state = train.init_state(model, opt, jax.random.PRNGKey(0), T)
      epoch, steps = train.make_train_epoch(
          adversarial.make_objective(model, adversarial.method_config(method)),
          opt, items, cfg.train.batch_size, n_train)
      pert = cascade.weights_for_method(dd["train_inputs"],
                                        cfg.train.batch_size, method)
      holder = {"state": state, "i": 0}

      def run():
        holder["i"] += 1
        holder["state"], terms = epoch(holder["state"], dd, pert,
                                       jax.random.PRNGKey(holder["i"]))
        return terms["loss"]

      sec, times = timed(run, repeats)
      yield {"name": f"{w}_{model_name}", **base, "seconds": sec,
             "steps_per_s": steps / sec, "runs": times,
             "peak_bytes": peak_memory()}
    elif w == "eval":
      params = model.init(jax.random.PRNGKey(0), jnp.ones((1, T), jnp.int32))
      if item_chunk:
        ranker = evaluate.make_chunked_ranker(model, items,
                                              cfg.eval.batch_size, item_chunk)
      else:
        ranker = evaluate.make_ranker(evaluate.model_scores(model), items,
                                      cfg.eval.batch_size)
      sec, times = timed(lambda: ranker(
          params, *evaluate.split_inputs(dd, "test"), dd["history"]), repeats)
      yield {"name": f"eval_{model_name}", **base, "item_chunk": item_chunk,
             "seconds": sec,
             "users_per_s": int(dd["eval_users"].shape[0]) / sec,
             "runs": times, "peak_bytes": peak_memory()}
    elif w == "cascade":
      fn = jax.jit(lambda s: cascade.cascade_scores(s, cfg.train.batch_size,
                                                    num_items=items))
      sec, times = timed(lambda: fn(dd["train_inputs"]), repeats)
      yield {"name": "cascade_scores", **base, "seconds": sec,
             "runs": times, "peak_bytes": peak_memory()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="ml1m,video")
  ap.add_argument("--what", default=",".join(WHAT))
  ap.add_argument("--models", default="sasrec,gru4rec")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--item_chunk", type=int, default=0,
                  help="score the catalog this many items at a time (eval)")
  a = ap.parse_args()
  what = [w for w in a.what.split(",") if w]
  for w in what:
    if w not in WHAT:
      ap.error(f"unknown --what {w!r}; choose from {WHAT}")
  for shape in a.shapes.split(","):
    if shape not in SHAPES:
      ap.error(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    for i, m in enumerate(a.models.split(",")):
      # Cascade scores do not depend on the model: measure them once.
      todo = [w for w in what if w != "cascade" or i == 0]
      for record in bench_shape(shape, todo, a.repeats, m, a.item_chunk):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
