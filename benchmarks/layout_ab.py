"""Length buckets against packed rows: compile time and epoch time.

Bucketing (`batching`) compiles one branch of the train step per length
bucket, and compiling is most of a short run (benchmarks/RESULTS.md,
"Compilation"). Packing (`packing`, `train.layout=packed`) leaves one
shape. For a paper config on its real data, this builds the epoch program
of each method for both layouts, in one process, and times compiling it
and a few epochs.

  CAT_DATA_DIR=... taskset -c 0 python benchmarks/layout_ab.py \
      --config=configs/sasrec_video.py --methods=none,cas

(Until 2026-12-03 this file measured a proxy of packing, full rows of
random items under a plain causal mask; its numbers are in RESULTS.md.)
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

from cat_jax import adversarial, models, poisoning, train  # noqa: E402
from cat_jax import data as data_lib  # noqa: E402
from cat_jax.batching import device_data  # noqa: E402
from cat_jax.epoch import init_state, make_optimizer  # noqa: E402
from cat_jax.epoch import make_train_epoch, plan_arrays  # noqa: E402
from cat_jax.phase import order_key  # noqa: E402

LAYOUTS = ("buckets", "packed")


def measure(config, methods=("none", "cas"), epochs: int = 3):
  """Yields (layout, method, compile seconds, [epoch seconds]) for each
  layout of `config` and method; prints each plan first."""
  T = config.data.max_len
  ds = poisoning.load_from_config(config.data)
  data = device_data(data_lib.build_arrays(ds, T))
  N = ds.num_items
  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  pert = (data["train_inputs"] > 0).astype(jnp.float32)
  for layout in LAYOUTS:
    c = config.copy_and_resolve_references()
    c.train.layout = layout
    plan, _ = train.make_plans(c, ds, data)
    print(f"  {layout}: {plan.describe()}", flush=True)
    for method in methods:
      state = init_state(model, optimizer, jax.random.PRNGKey(0), T)
      cfg = adversarial.method_config(method)
      epoch, _ = make_train_epoch(adversarial.make_objective(model, cfg),
                                  optimizer, N, plan,
                                  hparams=cfg.hyperparams())
      hp = {k: jnp.asarray(v, jnp.float32)
            for k, v in cfg.hyperparams().items()}
      args = (data, pert, hp, plan_arrays(plan), jax.random.PRNGKey(1),
              order_key(c, 1))
      t0 = time.perf_counter()
      compiled = epoch.program.lower(state, *args).compile()
      t1 = time.perf_counter()
      times = []
      for _ in range(epochs):
        t2 = time.perf_counter()
        state, terms = compiled(state, *args)
        jax.block_until_ready(terms)
        times.append(time.perf_counter() - t2)
      yield layout, method, t1 - t0, times


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/sasrec_video.py")
  ap.add_argument("--methods", default="none,cas")
  ap.add_argument("--epochs", type=int, default=3)
  a = ap.parse_args()
  spec = importlib.util.spec_from_file_location("config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  print(a.config)
  for layout, method, compiled, times in measure(
      module.get_config(), a.methods.split(","), a.epochs):
    print(f"  {layout:8s} {method:5s} compile {compiled:5.1f} s, epochs "
          + " ".join(f"{x:.2f}" for x in times) + " s", flush=True)


if __name__ == "__main__":
  main()
