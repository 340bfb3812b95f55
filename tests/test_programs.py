"""programs.py: which runs of a process share their compiled programs."""

from cat_jax import batching, config_lib, poisoning, programs, sharding, train
from cat_jax import data as data_lib


def _key(config, num_runs=1):
  ds = poisoning.load_from_config(config.data)
  data = batching.device_data(data_lib.build_arrays(ds, config.data.max_len))
  plan, eval_plan = train.make_plans(config, ds, data)
  return programs.setup_key(config, num_runs, ds.num_items,
                            sharding.make_mesh(1), plan, eval_plan, data)


def test_runtime_fields_are_config_fields():
  fields = config_lib.flat_fields(config_lib.base_config())
  assert programs.RUNTIME_FIELDS <= set(fields)


def test_only_runtime_fields_leave_the_setup_unchanged(make_config):
  base = make_config()
  key = _key(base)
  same = {"seed": 3, "train.epochs": 7, "train.eval_every": 2,
          "train.patience": 4, "train.pretrain_dir": "/x", "adv.eps": 0.1,
          "adv.method": "none,global", "adv.epochs": 9, "adv.lambda1": 0.5,
          "adv.xi": 0.1, "adv.init": "best", "train.heartbeat_s": 0.0}
  for field, value in same.items():
    assert _key(make_config(**{field: value})) == key, field
  # Every other field can shape a program (or the data it is built for).
  other = {"model.hidden": 8, "model.dropout": 0.1, "model.name": "gru4rec",
           "train.lr": 1e-2, "train.l2": 0.0, "train.b2": 0.9,
           "train.batch_size": 32, "train.buckets": 2, "eval.buckets": 2,
           "eval.batch_size": 64, "data.max_len": 10, "adv.scope": "batch",
           "data.synthetic.num_users": 300, "data.synthetic.seed": 1,
           "train.matmul_precision": "highest", "train.order_seed": 1}
  for field, value in other.items():
    assert _key(make_config(**{field: value})) != key, field
  assert _key(base, num_runs=2) != key


def test_for_setup_keeps_the_last_setups():
  programs.clear()
  first = programs.for_setup(("a",))
  first["x"] = 1
  assert programs.for_setup(("a",)) is first
  for i in range(programs.MAX_SETUPS):
    programs.for_setup((i,))
  assert programs.for_setup(("a",)) == {}  # evicted, built again
  programs.clear()
  assert programs.for_setup((0,)) == {}


def test_a_run_after_another_setup_gives_what_it_gives_alone(
    make_config, tmp_path):
  """The programs of a run at another learning rate (which the optimizer
  closes over) are not reused: a 1-epoch GRU4Rec run gives the same results
  after a run at another rate as with programs of its own."""
  cfg = lambda lr: make_config(**{"train.lr": lr, "train.epochs": 1,
                                  "model.name": "gru4rec"})
  programs.clear()
  train.train_and_evaluate(cfg(3e-2), str(tmp_path / "other"))
  after_other = train.train_and_evaluate(cfg(3e-3), str(tmp_path / "a"))
  programs.clear()
  alone = train.train_and_evaluate(cfg(3e-3), str(tmp_path / "b"))
  for k in ("valid/ndcg@10", "test/ndcg@10", "test/hr@10"):
    assert after_other["pretrain"][k] == alone["pretrain"][k], k
