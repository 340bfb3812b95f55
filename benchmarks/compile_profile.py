"""Where a training program's start-up time goes: trace, lower, compile.

For each method, builds the epoch program of a paper config on its real data
and times `jit(...).trace`, `.lower()` and `.compile()`. Run it twice with
the same `--cache` folder: the first run compiles (cold), the second loads
the executables from the persistent cache (warm), which is what a second
launch pays. `--buckets` overrides train.buckets (compile time grows about
linearly with it: one branch of the `lax.switch` per bucket); `--layout=packed`
profiles the packed layout's one-branch program instead.

  CAT_DATA_DIR=... taskset -c 0 python benchmarks/compile_profile.py \
      --config=configs/sasrec_video.py --methods=none,cas --cache=/tmp/cc

With `--store`, a compiled executable is also serialized to that folder,
and a later run with the same `--store` loads it directly, skipping the
trace and lower a cache hit still pays (run 1: `--cache=/tmp/cc
--store=/tmp/st`; run 2: `--cache=/tmp/cc`; run 3: `--store=/tmp/st`).
Only a measurement: the runs do not keep such a store (RESULTS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import serialize_executable  # noqa: E402

from cat_jax import adversarial, compilation, models, poisoning  # noqa: E402
from cat_jax import data as data_lib  # noqa: E402
from cat_jax import sharding, train  # noqa: E402
from cat_jax.batching import device_data  # noqa: E402
from cat_jax.epoch import init_state, make_optimizer  # noqa: E402
from cat_jax.epoch import make_train_epoch, plan_arrays  # noqa: E402
from cat_jax.phase import order_key  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/sasrec_video.py")
  ap.add_argument("--methods", default="none,cas")
  ap.add_argument("--buckets", type=int, default=0, help="0: the config's")
  ap.add_argument("--layout", default="",
                  help="train.layout: buckets or packed ('': the config's)")
  ap.add_argument("--cache", default="off", help="folder, or off")
  ap.add_argument("--store", default="",
                  help="folder of serialized executables: written after a "
                  "compile, and when there, loaded instead (no trace, no "
                  "lower); what a store keyed by the setup would save")
  a = ap.parse_args()
  compilation.setup_cache(a.cache)
  spec = importlib.util.spec_from_file_location("config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if a.buckets:
    config.train.buckets = a.buckets
  if a.layout:
    config.train.layout = a.layout
  ds = poisoning.load_from_config(config.data)
  mesh = sharding.make_mesh(config.parallel.devices)
  data = sharding.replicate(
      device_data(data_lib.build_arrays(ds, config.data.max_len)), mesh)
  plan, _ = train.make_plans(config, ds, data)
  N, T = ds.num_items, config.data.max_len
  model = models.build_model(config.model, N, T)
  optimizer = make_optimizer(config.train)
  state = init_state(model, optimizer, jax.random.PRNGKey(0), T)
  pert = (data["train_inputs"] > 0).astype(jnp.float32)
  print(f"{a.config}: {plan.describe()}, cache {a.cache}")
  for method in a.methods.split(","):
    cfg = adversarial.method_config(method)
    epoch, _ = make_train_epoch(adversarial.make_objective(model, cfg),
                                optimizer, N, plan, mesh,
                                hparams=cfg.hyperparams())
    hp = {k: jnp.asarray(v, jnp.float32)
          for k, v in cfg.hyperparams().items()}
    args = (state, data, pert, hp, plan_arrays(plan),
            jax.random.PRNGKey(1), order_key(config, 1))
    stored = os.path.join(a.store, f"{method}.pkl") if a.store else ""
    if stored and os.path.exists(stored):
      t0 = time.perf_counter()
      with open(stored, "rb") as f:
        compiled = serialize_executable.deserialize_and_load(*pickle.load(f))
      t1 = time.perf_counter()
      print(f"  {method:8s} load the stored executable {t1 - t0:6.2f} s "
            "(no trace, no lower)", flush=True)
      continue
    t0 = time.perf_counter()
    traced = epoch.program.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    # The program's size, free of timing noise. It is not a measure of the
    # compile time: 14% fewer fusions compiled no faster (RESULTS.md).
    fusions = compiled.as_text().count(" fusion(")
    print(f"  {method:8s} trace {t1 - t0:5.2f} s  lower {t2 - t1:5.2f} s  "
          f"compile (or load from the cache) {t3 - t2:6.2f} s  "
          f"{fusions} fusions", flush=True)
    if stored:
      os.makedirs(a.store, exist_ok=True)
      with open(stored, "wb") as f:
        pickle.dump(serialize_executable.serialize(compiled), f)


if __name__ == "__main__":
  main()
