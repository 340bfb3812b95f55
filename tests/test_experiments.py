import json
import math
import os

import numpy as np
import pytest

from cat_jax import stats
from cat_jax.experiments import common, curves, eps_sweep
from cat_jax.experiments import robustness as robustness_runner
from cat_jax.experiments import robustness_report
from cat_jax.experiments import table2


def test_summarize_and_markdown():
  runs = {m: {s: {"test/ndcg@10": v + s * 0.01, "test/hr@10": 2 * v + s * 0.01}
              for s in (0, 1, 2)}
          for m, v in (("none", 0.04), ("global", 0.05), ("cas", 0.06))}
  runs["cas"][2]["test/ndcg@10"] += 0.005  # so the differences vary
  summary = common.summarize(runs, [0, 1, 2])
  runs_none = [runs["none"][s]["test/ndcg@10"] for s in (0, 1, 2)]
  cas = summary["rows"]["cas"]["test/ndcg@10"]
  assert cas["values"] == pytest.approx([0.06, 0.07, 0.085])
  assert cas["mean"] == pytest.approx(0.215 / 3)
  assert cas["pct_vs_none"] == pytest.approx(100 * (0.215 / 0.15 - 1))
  assert {k: v for k, v in cas["vs_none"].items() if k != "p_holm"} == (
      stats.paired_ttest(cas["values"], runs_none))
  assert "vs_none" not in summary["rows"]["none"]["test/ndcg@10"]
  assert "vs_global" not in summary["rows"]["global"]["test/ndcg@10"]
  # One Holm family per metric: every variant vs none, cascade ones vs
  # global; a non-cascade variant is not compared with global.
  runs["linear"] = {s: dict(runs["global"][s]) for s in (0, 1, 2)}
  runs["linear"][1]["test/ndcg@10"] += 0.002
  summary = common.summarize(runs, [0, 1, 2])
  assert summary["family"] == ["global vs none", "cas vs none",
                               "linear vs none", "cas vs global"]
  rows = summary["rows"]
  assert "vs_global" not in rows["linear"]["test/ndcg@10"]
  for k in ("test/ndcg@10", "test/hr@10"):
    tests = [rows["global"][k]["vs_none"], rows["cas"][k]["vs_none"],
             rows["linear"][k]["vs_none"], rows["cas"][k]["vs_global"]]
    # (NaN where a difference has no spread, as equal values compare.)
    np.testing.assert_equal([t["p_holm"] for t in tests],
                            stats.holm([t["p"] for t in tests]))
  md = common.to_markdown(summary)
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  assert len(lines) == 5 and lines[3].startswith("| cas | 0.0717 ± ")
  t = rows["cas"]["test/ndcg@10"]["vs_none"]
  assert f"{t['p']:.3f} ({t['p_holm']:.3f}" in lines[3]
  assert "Holm-adjusted over the 4 comparisons" in md
  assert common.format_p({"p": 0.01, "p_holm": 0.04}) == "0.010 (0.040*)"
  assert common.format_p({"p": float("nan"), "p_holm": float("nan")}) == ""


def test_eps_sweep_variant_names():
  v = eps_sweep.variants("cas", [0.1, 10.0])
  assert v == {"none": {"adv.method": "none"},
               "cas_eps0.1": {"adv.method": "cas", "adv.eps": 0.1},
               "cas_eps10": {"adv.method": "cas", "adv.eps": 10.0}}
  two = eps_sweep.variants(["cas", "global"], [1.0])
  assert list(two) == ["none", "cas_eps1", "global_eps1"]
  assert two["global_eps1"] == {"adv.method": "global", "adv.eps": 1.0}
  # eps is chosen on validation alone; a tie goes to the smaller eps.
  valid = {"cas_eps0.1": 0.05, "cas_eps1": 0.07, "cas_eps10": 0.06,
           "global_eps0.1": 0.06, "global_eps1": 0.06, "global_eps10": 0.01}
  assert eps_sweep.choose_eps(valid, ["cas", "global"], [10.0, 0.1, 1.0]) == {
      "cas": 1.0, "global": 0.1}
  batch = {"cas_eps3_batch": 0.02, "cas_eps10_batch": 0.03}
  assert eps_sweep.choose_eps(batch, ["cas"], [3, 10], "batch") == {"cas": 10}
  # Scope 'batch' runs get their own names (and folders).
  assert list(eps_sweep.variants("cas", [10.0], "batch")) == [
      "none", "cas_eps10_batch"]
  assert eps_sweep.as_methods(["cas", "global", "cas"]) == ["cas", "global"]
  for bad in ([], ["none"], ["cas", "none"]):
    with pytest.raises(ValueError, match="always run as the reference"):
      eps_sweep.variants(bad, [1.0])


def test_eps_chosen_on_disk_reads_every_finished_grid_run(tmp_path):
  """The choice covers runs of several sweep calls; unfinished runs, other
  scopes and `none` do not count."""
  def put(seed, name, method, valid):
    d = tmp_path / f"seed{seed}" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(
        {method: {"valid/ndcg@10": valid}}))
  for seed, bonus in ((0, 0.0), (1, 0.001)):
    put(seed, "cas_eps0.1", "cas", 0.05 + bonus)
    put(seed, "cas_eps1", "cas", 0.07 + bonus)
    put(seed, "global_eps0.5", "global", 0.06 + bonus)
    put(seed, "cas_temporal_eps0.2", "cas_temporal", 0.04 + bonus)
    put(seed, "cas_eps10_batch", "cas", 0.09 + bonus)
    put(seed, "none", "none", 0.1)
  put(0, "global_eps2", "global", 0.08)  # not finished in seed 1
  (tmp_path / "seed0" / "linear_eps0.5").mkdir()  # no results.json
  assert eps_sweep.chosen_on_disk(str(tmp_path)) == {
      "cas": 1.0, "cas_temporal": 0.2, "global": 2.0}
  assert eps_sweep.chosen_on_disk(str(tmp_path), seeds=(0, 1)) == {
      "cas": 1.0, "cas_temporal": 0.2, "global": 0.5}
  assert eps_sweep.chosen_on_disk(str(tmp_path), scope="batch") == {
      "cas": 10.0}


def test_eps_sweep_plot_one_line_per_method(tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  labels = []
  save = common.save_figure
  def capture(fig, path):
    labels.extend([t.get_text() for t in ax.get_legend().get_texts()]
                  for ax in fig.axes)
    save(fig, path)
  monkeypatch.setattr(common, "save_figure", capture)
  eps = [0.1, 10.0]
  runs = {"none": {0: {"test/ndcg@10": 0.04, "test/hr@10": 0.08}}}
  for m, v in (("cas", 0.05), ("global", 0.03)):
    for e in eps:
      runs[f"{m}_eps{e:g}"] = {0: {"test/ndcg@10": v / e, "test/hr@10": v}}
  summary = common.summarize(runs, [0])
  summary.update(eps=eps, methods=["cas", "global"])
  path = tmp_path / "eps_sweep.png"
  assert eps_sweep.plot(summary, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [sorted(l) for l in labels] == [["cas", "global", "none"]] * 2


def test_runners_end_to_end(make_config, tmp_path):
  """table2, eps_sweep, curves and robustness on one tiny shared workdir."""
  # GRU4Rec compiles several times faster than SASRec on a CPU.
  config = make_config(**{"train.epochs": 2, "train.eval_every": 2,
                          "adv.epochs": 1, "adv.eps": 0.5,
                          "model.name": "gru4rec"})
  w = str(tmp_path)
  summary = table2.run_table(config, w, seeds=[0, 1], methods=["none", "cas"])
  cas = summary["rows"]["cas"]["test/ndcg@10"]
  assert len(cas["values"]) == 2 and all(v > 0 for v in cas["values"])
  base = summary["rows"]["none"]["test/ndcg@10"]["mean"]
  assert math.isclose(cas["pct_vs_none"], 100 * (cas["mean"] / base - 1))
  # Every run's selected and last epoch, read back from its results.json.
  assert [(r["run"], r["seed"]) for r in summary["runs"]] == [
      (n, s) for s in (0, 1) for n in ("pretrain", "none", "cas")]
  cas1 = json.load(open(tmp_path / "seed1" / "cas" / "results.json"))["cas"]
  assert summary["runs"][-1]["selected_epoch"] == cas1["selected_epoch"]
  assert summary["runs"][-1]["test/ndcg@10"] == cas1["test/ndcg@10"]
  md = common.to_markdown(summary)
  assert (f"| cas | 1 | {cas1['selected_epoch']} / {cas1['last_epoch']}"
          in md)
  # Each seed pretrained once, and both methods continued from it.
  for seed in (0, 1):
    pre = json.load(open(tmp_path / f"seed{seed}" / "results.json"))
    assert set(pre) >= {"pretrain", "data"} and "cas" not in pre
    for m in ("none", "cas"):
      assert (tmp_path / f"seed{seed}" / m / m / "results.json").exists()
      assert not (tmp_path / f"seed{seed}" / m / "pretrain").exists()

  # The eps sweep reuses seed 0's pretraining, and trains its reference
  # `none` in its own folder with its own phase-2 budget: table2's `none`
  # is neither continued nor refused (they shared seed0/none before).
  table_none = tmp_path / "seed0" / "none" / "results.json"
  mtime = table_none.stat().st_mtime
  sweep_config = common.apply_overrides(config, {"adv.epochs": 2})
  sweep = eps_sweep.run_sweep(sweep_config, w, [0], "cas", [0.25])
  assert set(sweep["rows"]) == {"none", "cas_eps0.25"}
  ref = json.load(open(tmp_path / "seed0" / eps_sweep.REFERENCE_FOLDER /
                       "results.json"))["none"]
  assert ref["last_epoch"] == 2  # the sweep's phase-2 epochs
  assert sweep["valid"]["none"] == ref["valid/ndcg@10"]
  assert sweep["chosen"] == {"cas": 0.25}
  md = eps_sweep.to_markdown(sweep)
  assert f"| {ref['valid/ndcg@10']:.4f} |" in md.splitlines()[2]
  assert "`--eps=cas=0.25`" in md
  assert table_none.stat().st_mtime == mtime
  assert json.load(open(table_none))["none"]["last_epoch"] == 1
  again = table2.run_table(config, w, seeds=[0, 1], methods=["none", "cas"])
  assert again["rows"] == summary["rows"]

  c = curves.curves(str(tmp_path / "seed0"), ["none", "cas"])
  assert c["phase1_epochs"] == 2
  assert c["curves"]["pretrain"][-1][0] == 2
  assert [e for e, _ in c["curves"]["cas"]] == [3]

  out = robustness_runner.run(config, str(tmp_path / "seed0"),
                              ["pretrain", "cas/cas"], "random")
  assert set(out) == {"pretrain", "cas/cas"}
  r = out["pretrain"]
  assert set(r["attacks"]) == {"first", "middle", "last", "last_1", "last_2",
                               "last_3", "last_4", "last_5"}
  assert r["attacks"]["last_5"]["replaced"] > r["attacks"]["last_1"][
      "replaced"]
  # The restored checkpoint is the selected one: clean test metrics agree.
  pre = json.load(open(tmp_path / "seed0" / "results.json"))["pretrain"]
  assert r["clean"]["ndcg@10"] == pytest.approx(pre["test/ndcg@10"], rel=1e-6)
  assert r["source"] == {"selected_epoch": pre["selected_epoch"],
                         "valid/ndcg@10": pre["valid/ndcg@10"]}
  # Resuming: an entry attacked before from the same checkpoint with the
  # same arguments is reused, not attacked again (nothing to save).
  saved = []
  again = robustness_runner.run(config, str(tmp_path / "seed0"),
                                ["pretrain", "cas/cas"], "random",
                                previous=out, save=saved.append)
  assert again == out and saved == []
  # Another checkpoint (a retrained phase) or other arguments: attacked
  # again, and each finished entry is saved in the order of the phases,
  # with the earlier result of the entry still to come.
  stale = json.loads(json.dumps(out))
  stale["pretrain"]["source"]["selected_epoch"] = -1
  again = robustness_runner.run(config, str(tmp_path / "seed0"),
                                ["pretrain", "cas/cas"], "random",
                                previous=stale, save=saved.append)
  assert [list(x) for x in saved] == [["pretrain", "cas/cas"]]
  assert saved[0]["cas/cas"] is stale["cas/cas"]
  assert again["pretrain"]["source"] == r["source"]
  assert again["pretrain"]["clean"] == r["clean"]
  other = robustness_runner.run(config, str(tmp_path / "seed0"),
                                ["pretrain"], "random", seed=1, last_k=(),
                                previous=out)["pretrain"]
  assert other["request"]["seed"] == 1 and "last_1" not in other["attacks"]
  snap = robustness_runner.run(config, str(tmp_path / "seed0"), ["pretrain"],
                               "snap", alpha_scale=1e-3,
                               last_k=())["pretrain"]
  assert set(snap["attacks"]) == {"first", "middle", "last"}
  # A step far below the nearest-neighbour distance keeps every item.
  assert snap["alpha"] > 0 and snap["attacks"]["last"]["replaced"] == 0
  assert snap["attacks"]["last"]["ndcg@10_drop"] == 0
  assert robustness_runner.output_stem("snap", None, 0.5) == (
      "robustness_snap_x0.5")
  assert robustness_runner.output_stem("minimal", anchor="window") == (
      "robustness_minimal_window")
  assert robustness_runner.output_stem("minimal") == "robustness_minimal"
  with pytest.raises(ValueError, match="not both"):
    robustness_runner.run(config, str(tmp_path / "seed0"), ["pretrain"],
                          "snap", alpha=1.0, alpha_scale=1.0)
  with pytest.raises(FileNotFoundError, match="train phase 'linear'"):
    robustness_runner.run(config, str(tmp_path / "seed0"), ["linear"],
                          "random")


def test_table2_per_method_eps():
  assert table2.parse_eps("linear=0.1,cas=1") == {"linear": 0.1, "cas": 1.0}
  assert table2.parse_eps("") == {}
  for bad in ("cas", "cas=big"):
    with pytest.raises(ValueError, match="method=number"):
      table2.parse_eps(bad)
  with pytest.raises(ValueError, match="not run"):
    table2.run_table(None, "unused", [0], ["none"], {"cas": 1.0})


def test_robustness_report_over_seeds(tmp_path):
  """Means, drops and tests over seeds equal a direct computation."""
  rng = np.random.default_rng(0)
  attacks = ["first", "middle", "last", "last_1", "last_2"]
  entries = ["pretrain", "none/none", "global/global", "cas/cas"]
  raw = {}
  for s in (0, 1, 2):
    raw[s] = {}
    for e in entries:
      clean = float(rng.uniform(0.04, 0.06))
      att = {a: float(rng.uniform(0.005, clean)) for a in attacks}
      raw[s][e] = {"clean": {"ndcg@10": clean}, "attacks": {
          a: {"ndcg@10": v, "ndcg@10_drop": (clean - v) / clean}
          for a, v in att.items()}}
      os.makedirs(tmp_path / f"seed{s}", exist_ok=True)
    (tmp_path / f"seed{s}" / "robustness_minimal.json").write_text(
        json.dumps(raw[s]))
  seeds = [0, 1, 2]
  summary = robustness_report.summarize(
      robustness_report.load(str(tmp_path), seeds, "robustness_minimal"),
      seeds)
  assert summary["models"] == ["pretrain", "none", "global", "cas"]
  for a in attacks:
    rows = summary["by_attack"][a]["rows"]
    for e, n in zip(entries, summary["models"]):
      drops = [1 - raw[s][e]["attacks"][a]["ndcg@10"] /
               raw[s][e]["clean"]["ndcg@10"] for s in seeds]
      assert rows[n]["drop"]["mean"] == pytest.approx(np.mean(drops))
      assert rows[n]["drop"]["std"] == pytest.approx(np.std(drops, ddof=1))
    cas = [raw[s]["cas/cas"]["attacks"][a]["ndcg@10_drop"] for s in seeds]
    glob = [raw[s]["global/global"]["attacks"][a]["ndcg@10_drop"]
            for s in seeds]
    assert rows["cas"]["drop"]["vs_global"]["p"] == pytest.approx(
        stats.paired_ttest(cas, glob)["p"])
  md = robustness_report.to_markdown(summary)
  cas_line = [l for l in md.splitlines() if l.startswith("| cas |")]
  assert len(cas_line) == 2  # Fig. 5 and Fig. 6 tables
  last = summary["by_attack"]["last"]["rows"]["cas"]["drop"]
  assert f"{100 * last['mean']:.1f} ± {100 * last['std']:.1f}%" in cas_line[0]
  # A missing seed or different phases per seed: clear errors.
  with pytest.raises(FileNotFoundError, match="seed3"):
    robustness_report.load(str(tmp_path), [0, 3], "robustness_minimal")
  del raw[1]["cas/cas"]
  (tmp_path / "seed1" / "robustness_minimal.json").write_text(
      json.dumps(raw[1]))
  with pytest.raises(ValueError, match="same --phases"):
    robustness_report.load(str(tmp_path), seeds, "robustness_minimal")
