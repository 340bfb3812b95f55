"""Throughput benchmarks: one JSON line per measurement on stdout.

  python benchmarks/bench.py                         # ml1m and video shapes
  python benchmarks/bench.py --shapes=ml1m,video,large --repeats=5
  python benchmarks/bench.py --shapes=video --what=epoch_base,eval
  python benchmarks/bench.py --shapes=ml1m --models=sasrec --what=protocol
  python benchmarks/bench.py --shapes=video --what=cascade_100m --repeats=3
  python benchmarks/bench.py --shapes=video --models=sasrec --what=topk
  python benchmarks/bench.py --shapes=large --what=topk --item_chunk=65536 \
      --topk_users=20000

`epoch_runs` trains `--runs` seeds in one vectorized epoch (compare its
seconds with `--runs` x epoch_base). `protocol` is a whole run through
`train.train_runs` (500 + 100 cas epochs, validation every 20, checkpoints,
test), compilation included, on synthetic Markov data of the shape.
`cascade_100m` times Eq. 4.11 on 2M random windows x 50 (100M slots).
`topk` times `recommend.make_top_k` (top-20, history excluded) for every
user of the shape, from their whole sequences (`--item_chunk` as for eval),
or for its first `--topk_users` users (users/s is the throughput either
way; 1M users x 1M items took about 2 hours of one CPU core).

Length buckets: `--buckets=1,4` measures every epoch and evaluation
unbucketed (1) and with 4 length buckets chosen from the data (names end
in `_b4`). The shapes `video_file` and `beauty_file` use the real Amazon
files (Video.txt, Beauty.txt from $CAT_DATA_DIR or ../shared/data), so
bucketing sees the real length distribution; without the file they print
a `skipped` line. `--packed` adds the training epochs with packed rows
(`train.layout=packed`, names end in `_packed`).

Each measurement runs once to compile (not timed), then `--repeats` times;
the median is reported. Data are synthetic with the named shape (users,
items, interactions, T), generated here, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import adversarial, batching, cascade, compilation, config_lib
from cat_jax import data, evaluate
from cat_jax import models, packing
from cat_jax import recommend, train

# name: (users, items, mean sequence length, T)
SHAPES = {
    "ml1m": (6040, 3416, 165.0, 200),
    "video": (24303, 10672, 9.54, 50),
    "large": (1_000_000, 1_000_000, 12.0, 50),
    "tiny": (300, 100, 8.0, 10),  # for the tests
}
# Shapes read from a real data file (name: (file, T)).
FILE_SHAPES = {"video_file": ("Video.txt", 50),
               "beauty_file": ("Beauty.txt", 50)}
SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                           "..", "shared", "data")
WHAT = ("epoch_base", "epoch_cas", "epoch_runs", "eval", "cascade",
        "cascade_100m", "protocol", "topk")
TOPK_K = 20  # items per user of the topk measurement
# Measured once per shape, not per model.
MODEL_FREE = ("cascade", "cascade_100m")


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


def protocol_config(name: str, model_name: str, epochs, eval_every: int):
  """The paper protocol on synthetic Markov data of shape `name`."""
  users, items, mean_len, T = SHAPES[name]
  c = config_lib.base_config()
  c.data.max_len = T
  c.data.synthetic.num_users = users
  c.data.synthetic.num_items = items
  c.data.synthetic.mean_length = mean_len
  c.model.name = model_name
  c.train.epochs, c.adv.epochs = epochs
  c.train.eval_every = eval_every
  c.train.log_every = max(epochs)
  c.adv.method, c.adv.eps = "cas", 0.1
  # The protocol time includes compiling: cold unless a cache is asked for
  # ($CAT_COMPILATION_CACHE or $JAX_COMPILATION_CACHE_DIR).
  c.compilation_cache = "auto" if (
      os.environ.get(compilation.ENV) or
      os.environ.get("JAX_COMPILATION_CACHE_DIR")) else "off"
  return c


def load_shape(name: str):
  """(Dataset, T) of a shape, or None when a file shape's file is absent."""
  if name in FILE_SHAPES:
    fname, T = FILE_SHAPES[name]
    for d in (os.environ.get("CAT_DATA_DIR", ""), SHARED_DATA):
      path = os.path.join(d, fname)
      if d and os.path.exists(path):
        return data.load_dataset(path), T
    return None
  users, items, mean_len, T = SHAPES[name]
  return random_dataset(users, items, mean_len), T


def bench_shape(name: str, what, repeats: int, model_name: str,
                item_chunk: int = 0, runs: int = 3,
                protocol_epochs=(500, 100), buckets=(1,),
                topk_users: int = 0, packed: bool = False):
  loaded = load_shape(name)
  if loaded is None:
    yield {"name": "skipped", "shape": name,
           "reason": f"{FILE_SHAPES[name][0]} not found in $CAT_DATA_DIR "
                     "or ../shared/data"}
    return
  ds, T = loaded
  users, items = ds.num_users, ds.num_items
  arrays = data.build_arrays(ds, T)
  cfg = config_lib.base_config()
  cfg.model.name = model_name
  dd = train.device_data(arrays)
  model = models.build_model(cfg.model, items, T)
  opt = train.make_optimizer(cfg.train)
  shape = {"users": users, "items": items,
           "interactions": ds.num_interactions, "T": T}
  base = {"device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "shape": name, **shape,
          "model": model_name}

  def plan_for(b):
    return batching.plan_from_table(arrays.train_inputs, arrays.train_users,
                                    cfg.train.batch_size, num_buckets=b)

  def eval_plan_for(b):
    if b <= 1:
      return None
    lens = batching.test_window_lengths(ds, T)
    return batching.eval_plan(lens, batching.choose_buckets(
        lens, b, cfg.eval.batch_size))

  suffix = lambda b: "" if b <= 1 else f"_b{b}"
  plan = plan_for(1)
  # Training layouts to time: each bucket count, and packed rows.
  layouts = [(suffix(b), plan_for(b)) for b in buckets]
  if packed:
    tusers = data.train_user_index(ds)
    layouts.append(("_packed", packing.packed_plan(
        tusers, batching.train_window_lengths(ds, tusers, T), T,
        cfg.train.batch_size)))
  for w in what:
    if w in ("epoch_base", "epoch_cas"):
      method = "none" if w == "epoch_base" else "cas"
      pert = cascade.weights_for_method(dd["train_inputs"],
                                        cfg.train.batch_size, method)
      for sfx, bplan in layouts:
        state = train.init_state(model, opt, jax.random.PRNGKey(0), T)
        epoch, steps = train.make_train_epoch(
            adversarial.make_objective(model,
                                       adversarial.method_config(method)),
            opt, items, bplan)
        holder = {"state": state, "i": 0}

        def run():
          holder["i"] += 1
          key = jax.random.PRNGKey(holder["i"])
          holder["state"], terms = epoch(holder["state"], dd, pert, key, key)
          return terms["loss"]

        t0 = time.perf_counter()
        sec, times = timed(run, repeats)
        first = time.perf_counter() - t0 - sum(times)
        yield {"name": f"{w}_{model_name}{sfx}", **base, "seconds": sec,
               "steps_per_s": steps / sec, "runs": times,
               "compile_and_first_s": first,
               "buckets": list(bplan.lengths), "peak_bytes": peak_memory()}
    elif w == "epoch_runs":
      keys = jax.random.split(jax.random.PRNGKey(0), runs)
      holder = {"state": train.init_states(model, opt, keys, T), "i": 0}
      epoch, steps = train.make_train_epoch(
          adversarial.make_objective(model, adversarial.method_config("none")),
          opt, items, plan, runs=True)
      pert = (dd["train_inputs"] > 0).astype(jnp.float32)

      def run():
        holder["i"] += 1
        holder["state"], terms = epoch(
            holder["state"], dd, pert,
            jax.random.split(jax.random.PRNGKey(holder["i"]), runs),
            jax.random.PRNGKey(holder["i"]))
        return terms["loss"]

      sec, times = timed(run, repeats)
      yield {"name": f"epoch_base_x{runs}_{model_name}", **base, "runs": runs,
             "seconds": sec, "seconds_per_run": sec / runs,
             "steps_per_s": runs * steps / sec, "times": times,
             "peak_bytes": peak_memory()}
    elif w == "protocol" and name in FILE_SHAPES:
      yield {"name": "skipped", "shape": name,
             "reason": "protocol runs on synthetic shapes only"}
    elif w == "protocol":
      c = protocol_config(name, model_name, protocol_epochs, 20)
      with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = train.train_runs(c, [tmp], [0])[0]
        sec = time.perf_counter() - t0
      yield {"name": f"protocol_{model_name}", **base,
             "epochs": list(protocol_epochs), "eval_every": 20,
             "seconds": sec, "test_ndcg@10": r["cas"]["test/ndcg@10"],
             "peak_bytes": peak_memory()}
    elif w == "eval":
      params = model.init(jax.random.PRNGKey(0), jnp.ones((1, T), jnp.int32))
      for b in buckets:
        eplan = eval_plan_for(b)
        if item_chunk:
          ranker = evaluate.make_chunked_ranker(
              model, items, cfg.eval.batch_size, item_chunk, plan=eplan)
        else:
          ranker = evaluate.make_ranker(evaluate.model_scores(model), items,
                                        cfg.eval.batch_size, plan=eplan)
        sec, times = timed(lambda: ranker(
            params, *evaluate.split_inputs(dd, "test"), dd["history"]),
            repeats)
        yield {"name": f"eval_{model_name}{suffix(b)}", **base,
               "item_chunk": item_chunk, "seconds": sec,
               "users_per_s": int(dd["eval_users"].shape[0]) / sec,
               "buckets": list(eplan.lengths) if eplan else [T],
               "runs": times, "peak_bytes": peak_memory()}
    elif w == "topk":
      params = model.init(jax.random.PRNGKey(0), jnp.ones((1, T), jnp.int32))
      recommender = recommend.make_top_k(
          model, TOPK_K, batch_size=cfg.eval.batch_size, item_chunk=item_chunk)
      histories = ds.sequences[:topk_users or None]
      sec, times = timed(lambda: recommender(params, histories), repeats)
      yield {"name": f"topk_{model_name}", **base, "k": TOPK_K,
             "item_chunk": item_chunk, "seconds": sec,
             "ranked_users": len(histories),
             "users_per_s": len(histories) / sec, "runs": times,
             "peak_bytes": peak_memory()}
    elif w == "cascade":
      fn = jax.jit(lambda s: cascade.cascade_scores(s, cfg.train.batch_size,
                                                    num_items=items))
      sec, times = timed(lambda: fn(dd["train_inputs"]), repeats)
      yield {"name": "cascade_scores", **base, "seconds": sec,
             "runs": times, "peak_bytes": peak_memory()}
    elif w == "cascade_100m":
      W, L, V = 2_000_000, 50, 1_000_000
      seqs = jax.random.randint(jax.random.PRNGKey(0), (W, L), 0, V + 1)
      fn = jax.jit(lambda s: cascade.cascade_scores(s, cfg.train.batch_size,
                                                    num_items=V))
      sec, times = timed(lambda: fn(seqs), repeats)
      yield {"name": "cascade_scores_100m", "device": base["device"],
             "backend": base["backend"], "windows": W, "T": L, "items": V,
             "seconds": sec, "runs": times, "peak_bytes": peak_memory()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="ml1m,video")
  ap.add_argument("--what", default="epoch_base,epoch_cas,eval,cascade")
  ap.add_argument("--models", default="sasrec,gru4rec")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--item_chunk", type=int, default=0,
                  help="score the catalog this many items at a time "
                  "(eval, topk)")
  ap.add_argument("--topk_users", type=int, default=0,
                  help="topk ranks only the first N users (0 = all)")
  ap.add_argument("--runs", type=int, default=3,
                  help="runs trained together by epoch_runs")
  ap.add_argument("--buckets", default="1",
                  help="comma-separated bucket counts for epochs and eval "
                       "(1 = unbucketed)")
  ap.add_argument("--packed", action="store_true",
                  help="also time epoch_base/epoch_cas with packed rows "
                       "(train.layout=packed; names end in _packed)")
  ap.add_argument("--protocol_epochs", default="500,100",
                  help="phase-1,phase-2 epochs of the protocol measurement")
  a = ap.parse_args()
  what = [w for w in a.what.split(",") if w]
  try:
    buckets = tuple(int(x) for x in a.buckets.split(",") if x)
    assert buckets and min(buckets) >= 1
  except (ValueError, AssertionError):
    ap.error(f"--buckets must be counts >= 1 like '1,4', got {a.buckets!r}")
  try:
    protocol = tuple(int(x) for x in a.protocol_epochs.split(","))
    assert len(protocol) == 2
  except (ValueError, AssertionError):
    ap.error(f"--protocol_epochs must be 'phase1,phase2', got "
             f"{a.protocol_epochs!r}")
  for w in what:
    if w not in WHAT:
      ap.error(f"unknown --what {w!r}; choose from {WHAT}")
  for shape in a.shapes.split(","):
    if shape not in SHAPES and shape not in FILE_SHAPES:
      ap.error(f"unknown shape {shape!r}; choose from "
               f"{sorted(SHAPES) + sorted(FILE_SHAPES)}")
    for i, m in enumerate(a.models.split(",")):
      # Cascade scores do not depend on the model: measure them once.
      todo = [w for w in what if w not in MODEL_FREE or i == 0]
      for record in bench_shape(shape, todo, a.repeats, m, a.item_chunk,
                                a.runs, protocol, buckets,
                                a.topk_users, a.packed):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
