"""What packing short sequences into full rows would cost: a proxy.

Bucketing (`batching`) compiles one branch of the train step per length
bucket, and compiling is most of a short run (benchmarks/RESULTS.md,
"Compilation"). Packing several users' windows into each T-long row (with
attention and positions per sequence) would leave one shape, so one
branch. This script measures the cost of that shape before anyone builds
it: for a paper config, rows of T real items (random sequences), as many
rows as the real training windows hold items in all, at the batch size
that gives the bucketed plan's number of optimizer steps, trained with the
unchanged models (a causal mask over the whole row: the same work as a
per-sequence mask). It times compiling and three epochs of both, in one
process.

  CAT_DATA_DIR=... taskset -c 0 python benchmarks/packing_proxy.py \
      --config=configs/sasrec_video.py --methods=none,cas

Not measured here: the per-sequence mask, positions and GRU resets
themselves, and what packing does to accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cat_jax import adversarial, models, poisoning, train  # noqa: E402
from cat_jax import data as data_lib  # noqa: E402
from cat_jax.batching import device_data, order_arrays  # noqa: E402
from cat_jax.epoch import init_state, make_optimizer  # noqa: E402
from cat_jax.epoch import make_train_epoch  # noqa: E402
from cat_jax.phase import order_key  # noqa: E402


def packed_rows(ds, T: int, rows: int, seed: int = 0):
  """A data set of `rows` users whose training windows are all T long."""
  rng = np.random.default_rng(seed)
  # T + 3 items: the last two are validation and test, so T + 1 train.
  seqs = [rng.choice(ds.num_items, T + 3, replace=False).astype(np.int32) + 1
          for _ in range(rows)]
  return data_lib.Dataset(sequences=seqs, num_items=ds.num_items,
                          user_ids=list(range(rows)), item_ids=[])


def proxy_shape(plan, T: int) -> tuple[int, int]:
  """(rows, batch rows): full T-long rows holding the plan's training items,
  batched so that an epoch takes about the plan's number of steps."""
  rows = int(np.ceil(plan.mean_length * len(plan.users) / T))
  return rows, int(np.ceil(rows / plan.num_steps))


def measure(config, methods=("none", "cas"), epochs: int = 3):
  """Yields (shape, method, compile seconds, [epoch seconds]) for the
  bucketed plan of `config` ("bucketed") and its packed proxy ("packed");
  prints the shapes first."""
  T = config.data.max_len
  ds = poisoning.load_from_config(config.data)
  data = device_data(data_lib.build_arrays(ds, T))
  plan, _ = train.make_plans(config, ds, data)
  items = plan.mean_length * len(plan.users)
  rows, batch = proxy_shape(plan, T)
  pds = packed_rows(ds, T, rows)
  pdata = device_data(data_lib.build_arrays(pds, T))
  config = config.copy_and_resolve_references()
  config.train.buckets, config.train.batch_size = 1, batch
  pplan, _ = train.make_plans(config, pds, pdata)
  print(f"{items:.0f} training items; bucketed: {plan.describe()}; packed "
        f"proxy: {rows} rows of {T}, batch {batch} rows, "
        f"{pplan.num_steps} steps", flush=True)
  N = ds.num_items
  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  for label, d, p in (("bucketed", data, plan), ("packed", pdata, pplan)):
    pert = (d["train_inputs"] > 0).astype(jnp.float32)
    for method in methods:
      state = init_state(model, optimizer, jax.random.PRNGKey(0), T)
      cfg = adversarial.method_config(method)
      epoch, _ = make_train_epoch(adversarial.make_objective(model, cfg),
                                  optimizer, N, p, hparams=cfg.hyperparams())
      hp = {k: jnp.asarray(v, jnp.float32)
            for k, v in cfg.hyperparams().items()}
      args = (d, pert, hp, order_arrays(p), jax.random.PRNGKey(1),
              order_key(config, 1))
      t0 = time.perf_counter()
      compiled = epoch.program.lower(state, *args).compile()
      t1 = time.perf_counter()
      times = []
      for _ in range(epochs):
        t2 = time.perf_counter()
        state, terms = compiled(state, *args)
        jax.block_until_ready(terms)
        times.append(time.perf_counter() - t2)
      yield label, method, t1 - t0, times


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/sasrec_video.py")
  ap.add_argument("--methods", default="none,cas")
  ap.add_argument("--epochs", type=int, default=3)
  a = ap.parse_args()
  spec = importlib.util.spec_from_file_location("config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  print(a.config, end=": ")
  for label, method, compiled, times in measure(
      module.get_config(), a.methods.split(","), a.epochs):
    print(f"  {label:8s} {method:5s} compile {compiled:5.1f} s, epochs "
          + " ".join(f"{x:.2f}" for x in times) + " s", flush=True)


if __name__ == "__main__":
  main()
