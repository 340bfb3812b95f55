import math

import pytest

from cat_jax import stats
from cat_jax.experiments import table2


def test_summarize_and_markdown():
  runs = {m: {s: {"test/ndcg@10": v + s * 0.01, "test/hr@10": 2 * v + s * 0.01}
              for s in (0, 1, 2)}
          for m, v in (("none", 0.04), ("global", 0.05), ("cas", 0.06))}
  runs["cas"][2]["test/ndcg@10"] += 0.005  # so the differences vary
  summary = table2.summarize(runs, [0, 1, 2])
  runs_none = [runs["none"][s]["test/ndcg@10"] for s in (0, 1, 2)]
  cas = summary["rows"]["cas"]["test/ndcg@10"]
  assert cas["values"] == pytest.approx([0.06, 0.07, 0.085])
  assert cas["mean"] == pytest.approx(0.215 / 3)
  assert cas["pct_vs_none"] == pytest.approx(100 * (0.215 / 0.15 - 1))
  assert cas["vs_none"] == stats.paired_ttest(cas["values"],
                                              runs_none)
  assert "vs_none" not in summary["rows"]["none"]["test/ndcg@10"]
  assert "vs_global" not in summary["rows"]["global"]["test/ndcg@10"]
  md = table2.to_markdown(summary)
  rows = [l for l in md.splitlines() if l.startswith("| ")]
  assert len(rows) == 4 and rows[3].startswith("| cas | 0.0717 ± ")


def test_table2_runner_end_to_end(make_config, tmp_path):
  config = make_config(**{"train.epochs": 2, "train.eval_every": 2,
                          "adv.epochs": 1, "adv.eps": 0.5})
  summary = table2.run_table(config, str(tmp_path), seeds=[0, 1],
                             methods=["none", "cas"])
  cas = summary["rows"]["cas"]["test/ndcg@10"]
  assert len(cas["values"]) == 2 and all(v > 0 for v in cas["values"])
  base = summary["rows"]["none"]["test/ndcg@10"]["mean"]
  assert math.isclose(cas["pct_vs_none"], 100 * (cas["mean"] / base - 1))
  # Each seed pretrained once, in its own folder, and both methods used it.
  for seed in (0, 1):
    assert (tmp_path / f"seed{seed}" / "pretrain" / "results.json").exists()
    assert (tmp_path / f"seed{seed}" / "cas" / "results.json").exists()


def test_robustness_runner_on_a_trained_workdir(make_config, tmp_path):
  from cat_jax import train
  from cat_jax.experiments import robustness as runner
  config = make_config(**{"train.epochs": 4, "train.eval_every": 4})
  trained = train.train_and_evaluate(config, str(tmp_path))
  out = runner.run(config, str(tmp_path), ["pretrain"], "random", seed=0)
  r = out["pretrain"]
  # The restored checkpoint is the selected one: clean test metrics agree.
  assert r["clean"]["ndcg@10"] == pytest.approx(
      trained["pretrain"]["test/ndcg@10"], rel=1e-6)
  assert set(r["attacks"]) == {"first", "middle", "last", "last_1", "last_2",
                               "last_3", "last_4", "last_5"}
  assert r["attacks"]["last_5"]["replaced"] > r["attacks"]["last_1"][
      "replaced"]
  with pytest.raises(FileNotFoundError, match="train phase 'cas'"):
    runner.run(config, str(tmp_path), ["cas"], "random")
