"""benchmarks/bench.py runs every measurement and reports sane numbers."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location(
      "bench", os.path.join(ROOT, "benchmarks", "bench.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_measurement_on_a_tiny_shape(bench):
  # GRU4Rec compiles fastest; epoch_cas shares epoch_base's code.
  what = ["epoch_base", "epoch_runs", "eval", "cascade", "protocol"]
  records = list(bench.bench_shape("tiny", what, repeats=1,
                                   model_name="gru4rec", runs=2,
                                   protocol_epochs=(1, 1), packed=True))
  names = [r["name"] for r in records]
  assert names == ["epoch_base_gru4rec", "epoch_base_gru4rec_packed",
                   "epoch_base_x2_gru4rec",
                   "eval_gru4rec", "cascade_scores", "protocol_gru4rec"]
  for r in records:
    assert r["seconds"] > 0 and r["shape"] == "tiny"
  assert records[2]["seconds_per_run"] == records[2]["seconds"] / 2
  protocol = records[-1]
  assert protocol["epochs"] == [1, 1] and 0 < protocol["test_ndcg@10"] <= 1


def test_layout_ab_times_both_layouts(make_config):
  spec = importlib.util.spec_from_file_location(
      "layout_ab", os.path.join(ROOT, "benchmarks", "layout_ab.py"))
  ab = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ab)
  config = make_config(**{"model.name": "gru4rec", "train.buckets": 3})
  got = list(ab.measure(config, ("none",), epochs=1))
  assert [(g[0], g[1]) for g in got] == [("buckets", "none"),
                                         ("packed", "none")]
  assert all(g[2] > 0 and len(g[3]) == 1 and g[3][0] > 0 for g in got)
