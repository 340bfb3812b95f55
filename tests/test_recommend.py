"""cat_jax.recommend: top-K against a brute-force sort, ids, the command."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cat_jax import data as data_lib
from cat_jax import evaluate, models, recommend, sharding, train
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_8 = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 "
    "(set by conftest.py before JAX starts)")


# ----------------------------------------------------------------------------
# A model with exact, tie-rich scores: E has small integer entries (with
# duplicated rows) and W_T is the sum of the window's item rows, so every
# score is a small integer, computed exactly in float32 in any order.
# ----------------------------------------------------------------------------

N, T, D = 50, 6, 3


class _Module:
  num_items, max_len = N, T


def _exact_model():
  def encode(params, S, mask, *, train=False, rng=None):
    return jnp.cumsum(S * mask[..., None], axis=1)

  return models.Model(
      init=None, embed=lambda params, ids: params["E"][ids], encode=encode,
      items=lambda params: params["E"], module=_Module())


def _exact_params():
  rng = np.random.default_rng(0)
  E = rng.integers(-2, 3, size=(N + 1, D)).astype(np.float32)
  E[20:30] = E[10:20]  # whole blocks of items that always tie
  E[45] = E[3]
  return {"E": jnp.asarray(E)}


def _histories():
  rng = np.random.default_rng(1)
  h = [rng.choice(np.arange(1, N + 1), size=n, replace=False)
       for n in rng.integers(1, 15, size=37)]
  h[0] = np.arange(1, 40)              # longer than T: exclusion covers it all
  h[1] = np.zeros(0, np.int64)         # no history: every score ties at 0
  h[2] = np.array([5, 5, 7, 5])        # repeats
  h[3] = np.arange(1, N + 1)[::-1][:N - 2]  # only 2 candidates left
  return h


def _brute_force(params, histories, k, exclude=True):
  """Sort of the full score matrix: score descending, then lower id first."""
  E = np.asarray(params["E"], np.float64)
  ids = np.zeros((len(histories), k), np.int32)
  vals = np.full((len(histories), k), -np.inf, np.float32)
  for u, h in enumerate(histories):
    h = np.asarray(h, np.int64)
    s = E[h[-T:]].sum(0) @ E.T if len(h) else np.zeros(N + 1)
    ok = np.arange(N + 1) >= 1
    if exclude:
      ok[h] = False
    cand = np.flatnonzero(ok)
    order = cand[np.lexsort((cand, -s[cand]))][:k]
    ids[u, :len(order)] = order
    vals[u, :len(order)] = s[order]
  return ids, vals


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("item_chunk,k", [(0, 10), (7, 10), (3, 8), (16, 60)])
def test_top_k_equals_brute_force(exclude, item_chunk, k):
  model, params, hist = _exact_model(), _exact_params(), _histories()
  ids, scores = recommend.top_k(model, params, hist, k, exclude,
                                batch_size=16, item_chunk=item_chunk)
  want_ids, want_scores = _brute_force(params, hist, k, exclude)
  assert ids.shape == (len(hist), k) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)


def test_ties_go_to_the_lower_id_and_short_lists_are_padded():
  model, params = _exact_model(), _exact_params()
  # No history: all scores are 0, so the top-k is items 1..k in order.
  ids, scores = recommend.top_k(model, params, [[]], 5, item_chunk=4)
  np.testing.assert_array_equal(ids[0], [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(scores[0], np.zeros(5))
  # Items 10..19 and 20..29 have equal rows: each pair ties, lower id first.
  hist = [[10]]
  ids, scores = recommend.top_k(model, params, hist, N, exclude_history=False)
  pos = {int(i): r for r, i in enumerate(ids[0])}
  for i in range(10, 20):
    assert pos[i] < pos[i + 10]
    assert scores[0, pos[i]] == scores[0, pos[i + 10]]
  # k larger than the candidates: the tail is id 0 with score -inf.
  hist = [np.arange(1, N - 1)]                       # leaves N-1 and N
  ids, scores = recommend.top_k(model, params, hist, 5, item_chunk=8)
  assert sorted(ids[0, :2]) == [N - 1, N]
  np.testing.assert_array_equal(ids[0, 2:], [0, 0, 0])
  assert np.isneginf(scores[0, 2:]).all() and np.isfinite(scores[0, :2]).all()
  assert 0 not in ids[:, :2]


def test_padded_arrays_and_bad_ids():
  model, params, hist = _exact_model(), _exact_params(), _histories()
  H = max(len(h) for h in hist)
  right = np.zeros((len(hist), H), np.int32)
  left = np.zeros((len(hist), H), np.int32)
  for u, h in enumerate(hist):
    right[u, :len(h)] = h
    left[u] = data_lib.left_pad(h, H)
  want = recommend.top_k(model, params, hist, 7)
  for arr in (right, left):
    got = recommend.top_k(model, params, arr, 7)
    np.testing.assert_array_equal(got[0], want[0])
  with pytest.raises(ValueError, match=r"item id 51, outside .*1\.\.50"):
    recommend.top_k(model, params, [[1, 2], [3, N + 1]], 5)


def test_approx_path_runs():
  # approx_max_k is exact on CPU, so the same result.
  model, params, hist = _exact_model(), _exact_params(), _histories()
  got = recommend.top_k(model, params, hist, 10, item_chunk=16, approx=True)
  want = _brute_force(params, hist, 10)
  np.testing.assert_array_equal(got[1], want[1])


@needs_8
@pytest.mark.parametrize("devices,shard_items,item_chunk", [
    (8, False, 0), (8, True, 0), (8, True, 4), (4, True, 5)])
def test_sharded_equals_brute_force(devices, shard_items, item_chunk):
  model, params, hist = _exact_model(), _exact_params(), _histories()
  mesh = sharding.make_mesh(devices)
  fn = recommend.make_top_k(model, 12, batch_size=12, item_chunk=item_chunk,
                            mesh=mesh, shard_items=shard_items)
  if not shard_items:
    assert fn.batch_size == 16  # rounded up to the 8 devices
  for exclude in (True, False):
    ids, scores = fn(params, hist, exclude)
    want_ids, want_scores = _brute_force(params, hist, 12, exclude)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


# ----------------------------------------------------------------------------
# Original ids.
# ----------------------------------------------------------------------------


def test_item_ids_round_trip_and_unknown_items(tmp_path):
  ids = [7, "B00X", 12, "12a", np.int64(40)]
  recommend.write_item_ids(str(tmp_path), ids)
  back = recommend.read_item_ids(str(tmp_path))
  assert back == [7, "B00X", 12, "12a", 40]
  assert [type(x) for x in back] == [int, str, int, str, int]
  assert not os.path.exists(tmp_path / "item_ids.txt.tmp")
  with pytest.raises(FileNotFoundError, match="item_ids.txt not found"):
    recommend.read_item_ids(str(tmp_path / "nowhere"))

  users = tmp_path / "users.txt"
  users.write_text("3 7 B00X 999\n\n10 040 12a\nu5 nope B00X also_no\n")
  lines = recommend.read_users(str(users))
  assert [u.user for u in lines] == [3, 10, "u5"]
  m = recommend.map_histories(lines, back, source="users.txt")
  assert [h.tolist() for h in m.histories] == [[1, 2], [5, 4], [2]]
  assert m.unknown == [[999], [], ["nope", "also_no"]]
  assert m.num_unknown == 3
  assert m.message == ("users.txt: skipped 3 unknown item id(s) in 2 user(s) "
                       "(not among the run's 5 items); first: line 1, item "
                       "'999'")
  items, scores = recommend.to_original(np.array([5, 2, 0]),
                                        np.array([1.5, 0.25, -np.inf]), back)
  assert items == [40, "B00X"] and scores == [1.5, 0.25]

  for text, msg in [("", "has no user lines"),
                    ("1 7\n2\n", r"users.txt:2: expected 'user item1"),
                    ("1 7\n1 12\n", "users.txt:2: user 1 is also on line 1")]:
    users.write_text(text)
    with pytest.raises(recommend.RecommendError, match=msg):
      recommend.read_users(str(users))


# ----------------------------------------------------------------------------
# End to end on one tiny trained run.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from conftest import tiny_config
  workdir = str(tmp_path_factory.mktemp("recommend") / "run")
  config = tiny_config(**{"train.epochs": 1, "model.name": "gru4rec"})
  train.train_and_evaluate(config, workdir)
  ds = data_lib.load_from_config(config.data)
  recommend.write_item_ids(workdir, ds)
  return workdir, config, ds


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_command_on_the_run_data(run, tmp_path):
  workdir, config, ds = run
  out = str(tmp_path / "recs.jsonl")
  summary = recommend.recommend_run(workdir, "pretrain", 5, out,
                                    batch_size=64, item_chunk=50)
  assert summary["users"] == ds.num_users and summary["items"] == ds.num_items
  recs = _read_jsonl(out)
  assert [r["user"] for r in recs] == ds.user_ids
  # The same as the library on the internal histories, mapped back.
  model, params = train.selected_params(config, workdir, "pretrain",
                                        ds.num_items)
  ids, scores = recommend.top_k(model, params, ds.sequences, 5)
  index = {x: i for i, x in enumerate(ds.item_ids, 1)}
  for u in (0, 1, len(recs) - 1):
    assert [index[x] for x in recs[u]["items"]] == ids[u].tolist()
    np.testing.assert_allclose(recs[u]["scores"], scores[u], rtol=1e-6)
    assert not set(ids[u]) & set(ds.sequences[u].tolist())
  # ... and the model's own scores agree with the ranking.
  W = np.asarray(jax.jit(lambda p, x: evaluate.user_embeddings(
      model, p, x))(params, np.stack([data_lib.left_pad(s, config.data.max_len)
                                      for s in ds.sequences[:3]])))
  full = W @ np.asarray(model.items(params)).T
  for u in range(3):
    full[u, 0] = -np.inf
    full[u, ds.sequences[u]] = -np.inf
    np.testing.assert_allclose(np.sort(full[u])[::-1][:5], scores[u],
                               rtol=1e-5, atol=1e-5)


def test_command_from_a_users_file_without_data(run, tmp_path, monkeypatch):
  workdir, config, ds = run
  users = tmp_path / "users.txt"
  users.write_text(
      f"{ds.user_ids[0]} " + " ".join(map(str, [ds.item_ids[i - 1] for i in
                                                ds.sequences[0]])) + "\n"
      f"abc {ds.item_ids[4]} 123456 {ds.item_ids[9]}\n")

  def no_data(*_):
    raise AssertionError("the data file must not be read")

  monkeypatch.setattr(data_lib, "load_from_config", no_data)
  out, logged = str(tmp_path / "recs.jsonl"), []
  summary = recommend.recommend_run(workdir, "pretrain", 4, out,
                                    users=str(users), log=logged.append)
  assert summary["unknown_items"] == 1 and summary["users_with_unknown"] == 1
  assert logged == [f"recommending from phase 'pretrain' of {workdir}",
                    f"warning: {users}: skipped 1 unknown item id(s) in 1 "
                    f"user(s) (not among the run's {ds.num_items} items); "
                    "first: line 2, item '123456'"]
  recs = _read_jsonl(out)
  assert [r["user"] for r in recs] == [ds.user_ids[0], "abc"]
  assert recs[1]["unknown"] == [123456] and recs[0]["unknown"] == []
  model, params = train.selected_params(config, workdir, "pretrain",
                                        ds.num_items)
  ids, _ = recommend.top_k(model, params, [ds.sequences[0], [5, 10]], 4)
  assert recs[0]["items"] == [ds.item_ids[i - 1] for i in ids[0]]
  assert recs[1]["items"] == [ds.item_ids[i - 1] for i in ids[1]]


def test_default_phase_is_the_phase_2_method_trained_last(tmp_path):
  """results.json lists the phases as they finish; folders without a
  selected epoch, or not (yet) in results.json, are not candidates."""
  config = ml_collections.ConfigDict({"train": {"pretrain_dir": ""}})

  def trained(*names, epoch=3):
    for name in names:
      os.makedirs(tmp_path / name, exist_ok=True)
      (tmp_path / name / "best.json").write_text(json.dumps({"epoch": epoch}))

  def results(*names):
    (tmp_path / "results.json").write_text(json.dumps(
        {"data": {}, **{n: {} for n in names}, "popularity/valid": {}}))

  with pytest.raises(recommend.RecommendError, match="nothing is trained"):
    recommend.default_phase(config, str(tmp_path))
  trained("pretrain")
  assert recommend.default_phase(config, str(tmp_path))[0] == "pretrain"
  trained("none", "global", "cas")
  trained("seq", epoch=-1)                      # never validated
  trained("linear")                             # interrupted: no results
  results("pretrain", "none", "global", "cas", "seq")
  assert recommend.default_phase(config, str(tmp_path)) == (
      "cas", "the phase-2 method trained last")
  results("pretrain", "cas", "global")
  assert recommend.default_phase(config, str(tmp_path))[0] == "global"
  results("pretrain")
  assert recommend.default_phase(config, str(tmp_path))[0] == "pretrain"


def _cli(*args):
  return subprocess.Popen(
      [sys.executable, "-m", "cat_jax.recommend", *args], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"})


def test_command_line(run, tmp_path):
  workdir, _, ds = run
  bad_users = tmp_path / "bad.txt"
  bad_users.write_text("1 2\n7\n")
  out = str(tmp_path / "recs.jsonl")
  procs = {
      "ok": _cli(f"--workdir={workdir}", "--k=3", f"--out={out}"),
      "help": _cli("--help"),
      "usage": _cli("--phase=cas"),
      "workdir": _cli(f"--workdir={tmp_path}/missing", "--phase=cas",
                      "--out=-"),
      "phase": _cli(f"--workdir={workdir}", "--phase=cas", "--out=-"),
      "users": _cli(f"--workdir={workdir}", "--phase=pretrain",
                    f"--users={bad_users}", "--out=-"),
  }
  res = {name: (p.wait(timeout=120), p.stdout.read(), p.stderr.read())
         for name, p in procs.items()}
  rc, _, err = res["ok"]
  assert rc == 0, err
  recs = _read_jsonl(out)
  assert len(recs) == ds.num_users and all(len(r["items"]) == 3 for r in recs)
  assert json.loads(err.strip().splitlines()[-1])["users"] == ds.num_users
  # Without --phase: phase 1, as no phase 2 has finished; said first.
  assert err.splitlines()[0] == (
      f"recommending from phase 'pretrain' of {workdir} (phase 1: no "
      "phase-2 method has finished; --phase picks another)"), err
  rc, out_help, err = res["help"]
  assert rc == 0 and "--phase" in out_help and err == ""
  rc, _, err = res["usage"]
  assert rc == 2 and err == ("recommend: error: flag --workdir=None: Flag "
                             "--workdir must have a value other than None.\n")
  expected = {
      "workdir": f"recommend: error: workdir '{tmp_path}/missing' not found",
      "phase": f"recommend: error: phase 'cas' is not trained in {workdir}",
      "users": f"recommend: error: {bad_users}:2: expected 'user item1",
  }
  for name, start in expected.items():
    rc, _, err = res[name]
    assert rc == 1
    assert err.strip().startswith(start), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert "trained phases: pretrain" in res["phase"][2]


def test_bench_topk_on_a_tiny_shape():
  spec = importlib.util.spec_from_file_location(
      "bench", os.path.join(ROOT, "benchmarks", "bench.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert "topk" in bench.WHAT
  (r,) = bench.bench_shape("tiny", ["topk"], repeats=1, model_name="gru4rec",
                           item_chunk=30)
  assert r["name"] == "topk_gru4rec" and r["item_chunk"] == 30
  assert r["seconds"] > 0 and r["users_per_s"] > 0 and r["users"] == 300
  assert r["ranked_users"] == 300
  (r,) = bench.bench_shape("tiny", ["topk"], repeats=1, model_name="gru4rec",
                           item_chunk=30, topk_users=50)
  assert r["ranked_users"] == 50 and r["users"] == 300
