"""Shared fixtures: a tiny config that trains in seconds on a CPU."""

import atexit
import hashlib
import os
import shutil
import tempfile

# Fake devices for the sharding tests; must be set before JAX starts.
# The suite's programs are tiny, so XLA's CPU optimizations cost more
# compile time than they save run time: the suite compiles at LLVM level 0
# (over compilation.CPU_COMPILER_OPTIONS' level 1), without the fusion
# emitters, with the FAST_COMPILE preset. A tiny SASRec `cas` epoch then
# compiles in ~5 s instead of ~13 (same run time); float results move in
# the last digits. Subprocesses get the same flags (`xla_flags`), and no
# test compares with numbers computed elsewhere.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_opt_preset=FAST_COMPILE")
os.environ.setdefault(
    "XLA_FLAGS",
    f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS of a launch.py subprocess with `devices` CPU devices, compiled
  as this process compiles (tests compare their results with ours)."""
  count = f"--xla_force_host_platform_device_count={devices} " * (devices > 1)
  return count + (FAST_COMPILE_FLAGS
                  if FAST_COMPILE_FLAGS in os.environ["XLA_FLAGS"] else "")


# The suite is a CPU suite (the fake devices above), and on a GPU machine
# several pytest-xdist workers would each preallocate most of its memory.
# JAX_PLATFORMS=cuda pytest -n 0 runs it on the GPU instead.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same small programs (each train_and_evaluate builds
# fresh closures, and the command-line tests start new processes), and
# compiling dominates the suite on a 2-core CPU. A persistent compilation
# cache, empty at the start of every session and shared with subprocesses
# through the environment, cut tests/test_multirun.py from 233 s to 157 s.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="cat_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest  # noqa: E402

from cat_jax import config_lib  # noqa: E402
from cat_jax.experiments import common  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                           "data")


def tree_digest(root) -> dict:
  """{relative path: sha1} of every file under root (to check that a failed
  run changed nothing)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.data.name = "synthetic"
  c.data.max_len = 12
  s = c.data.synthetic
  s.num_users, s.num_items, s.num_clusters, s.mean_length = 400, 120, 6, 12.0
  c.model.hidden = 16
  c.model.num_blocks = 1
  c.train.epochs = 3
  c.train.eval_every = 1
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.adv.epochs = 0
  c.eval.batch_size = 96
  c.parallel.devices = 1  # the sharding tests ask for 8
  return common.apply_overrides(c, overrides)


@pytest.fixture
def make_config():
  return tiny_config


def init_params(model, max_len, seed=0):
  """`model.init` on a [1, max_len] window, jitted: Flax's eager init runs
  ~100 small ops, each compiled on first use (3-8 s per process for
  SASRec), where the jitted init is one program the persistent compilation
  cache shares between the tests, workers and processes. Same values."""
  import jax
  import jax.numpy as jnp
  return jax.jit(model.init)(jax.random.PRNGKey(seed),
                             jnp.ones((1, max_len), jnp.int32))


def run_epoch(model, optimizer, num_items, plan, cfg, mesh=None,
              runs=False):
  """`train.make_train_epoch` for method `cfg` (an AdvConfig) as a run
  builds it (`train.train_runs`): the method's hyperparameters are runtime
  inputs and the arrays lie on a mesh. Without `mesh`, a one-device one, on
  which the epoch puts state, data and pert at each call; on a given mesh
  the caller places them.

  Compiling a tiny epoch takes 4-15 s on a CPU, tracing a cached one ~1 s:
  an epoch built so is the program of the runs of other tests with the same
  shapes and method structure (tiny_config's, say), which the persistent
  compilation cache compiles once per session; built otherwise (no hparams,
  no mesh) it is a program of its own."""
  from cat_jax import adversarial, sharding, train
  own_mesh = mesh is None
  mesh = sharding.make_mesh(1) if own_mesh else mesh
  epoch, steps = train.make_train_epoch(
      adversarial.make_objective(model, cfg), optimizer, num_items, plan,
      mesh, runs=runs, hparams=cfg.hyperparams())
  if not own_mesh:
    return epoch, steps

  def on_mesh(state, data, pert, key, order_key):
    state, data, pert = sharding.replicate((state, data, pert), mesh)
    return epoch(state, data, pert, key, order_key)

  on_mesh.program = epoch.program
  return on_mesh, steps


def run_ranker(model, num_items, batch_size, runs=False):
  """`evaluate.make_ranker` of the model's scores as a run builds it (on a
  one-device mesh; the arguments are put on it at each call), for the
  same reason as `run_epoch`."""
  from cat_jax import evaluate, sharding
  mesh = sharding.make_mesh(1)
  ranker = evaluate.make_ranker(evaluate.model_scores(model), num_items,
                                batch_size, mesh, runs=runs)

  def on_mesh(*args):
    return ranker(*sharding.replicate(args, mesh))

  on_mesh._cache_size = ranker._cache_size  # noqa: SLF001 (as jax's)
  return on_mesh


# The files that take longest, longest first (CPU seconds on 2 cores,
# 2026-12-03; benchmarks/RESULTS.md, "The test suite"). pytest-xdist hands
# whole files (--dist loadfile) to whichever worker is free, in collection
# order, so a long file collected last (alphabetically, test_train.py)
# would keep one worker busy while the other has nothing left (the suite
# used ~90% of both cores before this order).
LONGEST_FIRST = ("test_cli.py", "test_faults.py", "test_robustness.py",
                 "test_train.py", "test_sharding.py", "test_experiments.py",
                 "test_multirun.py", "test_multihost.py",
                 "test_adversarial.py", "test_batching.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
