import json
import os
import subprocess
import sys

import jax
import pytest

from cat_jax import train
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
  """(workdir, results) of tiny_config's phase 1, 12 epochs evaluated every
  4: the end-to-end run, and the float32 reference of the bfloat16 one."""
  from conftest import tiny_config
  workdir = tmp_path_factory.mktemp("fp32")
  config = tiny_config(**{"train.epochs": 12, "train.eval_every": 4})
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_end_to_end_learns_and_beats_popularity(fp32):
  workdir, results = fp32
  pop = results["popularity/valid"]["ndcg@10"]
  pre = results["pretrain"]
  # Selected on validation, tested once: clearly above popularity.
  assert pre["valid/ndcg@10"] > 1.5 * pop
  assert pre["test/ndcg@10"] > 1.5 * pop
  lines = read_jsonl(workdir / "metrics.jsonl")
  evals = [l for l in lines if "valid/ndcg@10" in l]
  assert [l["epoch"] for l in evals] == [4, 8, 12]
  assert evals[-1]["train/loss"] < evals[0]["train/loss"]
  tests = [l for l in lines if l.get("split") == "test"]
  assert len(tests) == 1 and tests[0]["epoch"] == pre["selected_epoch"]
  on_disk = json.load(open(workdir / "results.json"))
  assert on_disk["pretrain"]["test/ndcg@10"] == pre["test/ndcg@10"]
  assert os.path.exists(workdir / "config.json")


def test_bfloat16_encoder_learns_as_well(make_config, tmp_path, fp32):
  """model.dtype=bfloat16 trains to about the fp32 result (synthetic data):
  the end-to-end run's settings, with bfloat16 (float32 matmuls, which the
  CPU's default precision of the reference is too)."""
  config = make_config(**{"train.epochs": 12, "train.eval_every": 4,
                          "model.dtype": "bfloat16",
                          "train.matmul_precision": "float32"})
  runs = [fp32[1], train.train_and_evaluate(config, str(tmp_path))]
  pop = runs[0]["popularity/valid"]["ndcg@10"]
  full, bf16 = (r["pretrain"]["test/ndcg@10"] for r in runs)
  # bf16 must learn too (the tiny set takes fp32 well above popularity),
  # and land within 10% of fp32.
  assert bf16 > 1.3 * pop
  assert abs(bf16 - full) < 0.1 * full, (full, bf16)


def test_two_phases_share_the_pretrained_model(make_config, tmp_path):
  base = {"train.epochs": 3, "adv.epochs": 2, "adv.eps": 0.5}
  r1 = train.train_and_evaluate(make_config(**base, **{"adv.method": "cas"}),
                                str(tmp_path))
  mtime = os.path.getmtime(tmp_path / "pretrain" / "results.json")
  r2 = train.train_and_evaluate(
      make_config(**base, **{"adv.method": "linear"}), str(tmp_path))
  # The second method reused phase 1 instead of training it again.
  assert os.path.getmtime(tmp_path / "pretrain" / "results.json") == mtime
  assert r1["pretrain"] == r2["pretrain"]
  summary = json.load(open(tmp_path / "results.json"))
  assert {"pretrain", "cas", "linear", "data"} <= set(summary)
  # A different model cannot reuse that pretraining.
  with pytest.raises(ValueError, match="trained with other settings"):
    train.train_and_evaluate(
        make_config(**base, **{"model.hidden": 8}), str(tmp_path))


def test_nan_loss_stops_with_step_and_terms_named(make_config, tmp_path):
  config = make_config(**{"train.epochs": 2, "train.lr": float("nan")})
  with pytest.raises(FloatingPointError,
                     match=r"phase 'pretrain' at step \d+ \(adv1=.*bce=nan"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("key,value,match", [
    ("adv.method", "fgsm", "Unknown adv.method"),
    ("adv.eps", -1.0, "adv.eps must be >= 0"),
    ("model.name", "bert4rec", "Unknown model.name"),
    ("train.batch_size", 0, "train.batch_size must be positive"),
    ("eval.select", "ndcg@7", "eval.select"),
    ("model.dtype", "float16", "Unknown model.dtype"),
    ("train.matmul_precision", "fast", "Unknown train.matmul_precision"),
    ("adv.eval_every", -1, "adv.eval_every must be >= 0"),
    ("eval.shard_items", True, "eval.shard_items needs eval.item_chunk"),
    ("train.layout", "rows", "Unknown train.layout"),
    ("train.pack_rows", -1, "train.pack_rows must be >= 0"),
])
def test_bad_config_fails_before_training(make_config, tmp_path, key, value,
                                          match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(make_config(**{key: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         *args], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": xla_flags(),
                             **(env or {})},
                        timeout=300)


def test_cli_wrong_path_is_one_clear_line(tmp_path):
  r = run_cli("--config=configs/sasrec_video.py:path=/nonexistent/Video.txt",
              f"--workdir={tmp_path}")
  assert r.returncode == 1
  assert "error: Data file not found: '/nonexistent/Video.txt'" in r.stderr
  assert "Traceback" not in r.stderr
  assert r.stderr.count("Data file not found") == 1  # said once
  assert os.listdir(tmp_path) == []  # nothing written


def test_epoch_and_ranker_compile_once(make_config):
  """Epoch after epoch (new keys, new state) reuses one compiled program."""
  import jax.numpy as jnp
  from cat_jax import adversarial, batching, data, evaluate, models
  from conftest import run_epoch, run_ranker  # the runs' programs
  config = make_config()
  arrays = data.build_arrays(data.load_from_config(config.data),
                             config.data.max_len)
  dd = train.device_data(arrays)
  model = models.build_model(config.model, arrays.num_items, arrays.max_len)
  opt = train.make_optimizer(config.train)
  state = train.init_state(model, opt, jax.random.PRNGKey(0), arrays.max_len)
  epoch, _ = run_epoch(model, opt, arrays.num_items, batching.plan_from_table(
      arrays.train_inputs, arrays.train_users, 64),
                       adversarial.method_config("none"))
  ranker = run_ranker(model, arrays.num_items, 96)
  pert = (dd["train_inputs"] > 0).astype(jnp.float32)
  for e in range(3):
    state, _ = epoch(state, dd, pert, jax.random.PRNGKey(e),
                     jax.random.PRNGKey(e))
    for split in ("valid", "test"):
      ranker(state.params, *evaluate.split_inputs(dd, split), dd["history"])
  assert epoch.program._cache_size() == 1
  assert ranker._cache_size() == 1


def _expected_stop(values, patience):
  """Index of the evaluation at which early stopping must stop, or None."""
  best, since = -float("inf"), 0
  for i, v in enumerate(values):
    if v > best:
      best, since = v, 0
    else:
      since += 1
    if since >= patience:
      return i
  return None


def test_early_stopping_stops_right_resumes_and_phase2_starts_at_best(
    make_config, tmp_path):
  over = {"train.epochs": 40, "train.eval_every": 1, "train.patience": 2,
          "train.lr": 0.02, "adv.method": "none", "adv.epochs": 1,
          "adv.init": "best", "model.name": "gru4rec"}
  r = train.train_and_evaluate(make_config(**over), str(tmp_path / "a"))
  lines = read_jsonl(tmp_path / "a" / "metrics.jsonl")
  pre = [l for l in lines if l["phase"] == "pretrain" and "valid/ndcg@10" in l]
  stop = _expected_stop([l["valid/ndcg@10"] for l in pre], 2)
  assert stop is not None and r["pretrain"]["stopped_early"]
  assert len(pre) == stop + 1 and pre[-1]["epoch"] == stop + 1
  best = max(pre, key=lambda l: l["valid/ndcg@10"])
  assert r["pretrain"]["selected_epoch"] == best["epoch"] < pre[-1]["epoch"]
  # Phase 2 continued from the selected checkpoint, not the last one.
  steps = pre[0]["step"] // pre[0]["epoch"]
  adv = [l for l in lines if l["phase"] == "none" and "valid/ndcg@10" in l]
  assert adv[0]["step"] == (best["epoch"] + 1) * steps
  # Interrupted before the stop (here: a shorter run), then resumed: the
  # evaluations without improvement are carried over, so it stops at the
  # same epoch with the same selection.
  cut = max(best["epoch"], stop)  # before the stop, after the best
  train.train_and_evaluate(make_config(**{**over, "train.epochs": cut,
                                          "adv.epochs": 0}),
                           str(tmp_path / "b"))
  r2 = train.train_and_evaluate(make_config(**over), str(tmp_path / "b"))
  pre2 = [l for l in read_jsonl(tmp_path / "b" / "metrics.jsonl")
          if l["phase"] == "pretrain" and "valid/ndcg@10" in l]
  assert [l["epoch"] for l in pre2] == [l["epoch"] for l in pre]
  for key in ("selected_epoch", "test/ndcg@10", "last_epoch"):
    assert r2["pretrain"][key] == r["pretrain"][key]


def test_heartbeat_logs_while_its_block_runs_and_stops_after(monkeypatch):
  import time
  from cat_jax import phase
  lines = []
  monkeypatch.setattr(phase.logging, "info",
                      lambda fmt, *a: lines.append(fmt % a))
  with phase._heartbeat("[x] compiling", 0.05):  # noqa: SLF001
    time.sleep(0.3)
  n = len(lines)
  assert n >= 3 and all(l.startswith("[x] compiling: ") and
                        l.endswith(" s so far") for l in lines), lines
  time.sleep(0.15)
  assert len(lines) == n  # stopped with its block
  with phase._heartbeat("[x] off", 0):  # noqa: SLF001
    time.sleep(0.1)
  assert len(lines) == n
