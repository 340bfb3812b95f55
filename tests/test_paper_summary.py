"""The cross-setting summary reads the runners' reports and checks the
paper's claims as a hand computation over the per-seed values does."""

import json
import os
import subprocess
import sys

import numpy as np

from cat_jax.experiments import (common, data_claims, paper_summary,
                                 robustness_report)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = [0, 1, 2]


def write_table(runs, setting, rng, order):
  """A table2.json as table2.run_table writes it, method means in `order`
  (best first) with small per-seed noise."""
  per = {}
  for rank, m in enumerate(order):
    per[m] = {s: {"test/ndcg@10": 0.05 - 0.004 * rank + 1e-4 * rng.normal(),
                  "test/hr@10": 0.1} for s in SEEDS}
  summary = common.summarize(per, SEEDS)
  common.write(os.path.join(runs, f"paper_{setting}"), "table2", summary)
  return per


def write_robustness(runs, setting, drops):
  """robustness_minimal.json as robustness_report writes it; drops[model]
  is the per-seed relative drop at the last item."""
  per_seed = {s: {e: {"clean": {"ndcg@10": 0.05},
                      "attacks": {a: {"ndcg@10_drop": d[s] + 0.01 * i,
                                      "ndcg@10": 0.05 * (1 - d[s])}
                                  for i, a in enumerate(("first", "last"))}}
                  for e, d in drops.items()} for s in SEEDS}
  summary = robustness_report.summarize(per_seed, SEEDS)
  with open(os.path.join(runs, f"paper_{setting}",
                         "robustness_minimal.json"), "w") as f:
    json.dump(summary, f)


def write_means(runs, setting, means, rng, noise=2e-5):
  """A table2.json as table2.run_table writes it: each method's per-seed
  test NDCG@10 its mean in `means` plus small noise."""
  per = {m: {s: {"test/ndcg@10": mu + noise * rng.normal(),
                 "test/hr@10": 2 * mu} for s in SEEDS}
         for m, mu in means.items()}
  common.write(os.path.join(runs, f"paper_{setting}"), "table2",
               common.summarize(per, SEEDS))
  return {m: [per[m][s]["test/ndcg@10"] for s in SEEDS] for m in per}


def write_last_k(runs, setting, clean, attacked, attacks=("last", "last_5")):
  """robustness_minimal.json as robustness_report writes it, from each
  model's per-seed clean NDCG@10 and NDCG@10 under the last-K attacks
  (`attacked`, the same under each)."""
  per_seed = {s: {e: {"clean": {"ndcg@10": clean[e][i]},
                      "attacks": {a: {"ndcg@10": attacked[e][i],
                                      "ndcg@10_drop": 1 - attacked[e][i]
                                      / clean[e][i]} for a in attacks}}
                  for e in clean} for i, s in enumerate(SEEDS)}
  summary = robustness_report.summarize(per_seed, SEEDS)
  with open(os.path.join(runs, f"paper_{setting}",
                         "robustness_minimal.json"), "w") as f:
    json.dump(summary, f)


def p_two_sided(x, y):
  """The paired t-test's p by hand: with three seeds (2 degrees of freedom)
  P(|T| > t) = 1 - t / sqrt(t^2 + 2)."""
  d = np.asarray(x) - np.asarray(y)
  assert len(d) == 3
  t = abs(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
  return 1 - t / np.sqrt(t * t + 2)


def holm_by_hand(p):
  order = np.argsort(p)
  out, running = np.empty(len(p)), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p) - rank) * p[i]))
    out[i] = running
  return out


# Means per setting (SETTING: {method: test NDCG@10}); the gains over none
# are in the comments (linear, seq, global, cas).
MEANS = {
    "sasrec_video": {"none": 0.040, "linear": 0.044, "seq": 0.042,
                     "global": 0.045, "cas": 0.046},  # 10, 5, 12.5, 15%
    "sasrec_beauty": {"none": 0.030, "linear": 0.034, "seq": 0.033,
                      "global": 0.036, "cas": 0.037},  # 13, 10, 20, 23%
    # linear does not hurt SASRec here: that claim fails.
    "sasrec_clothing": {"none": 0.010, "linear": 0.011, "seq": 0.0115,
                        "global": 0.0125, "cas": 0.013},  # 10, 15, 25, 30%
    "gru4rec_video": {"none": 0.040, "linear": 0.042, "seq": 0.041,
                      "global": 0.043, "cas": 0.044},  # 5, 2.5, 7.5, 10%
    "gru4rec_beauty": {"none": 0.020, "linear": 0.022, "seq": 0.021,
                       "global": 0.022, "cas": 0.0226},  # 10, 5, 10, 13%
    "gru4rec_clothing": {"none": 0.008, "linear": 0.0078, "seq": 0.0079,
                         "global": 0.0077, "cas": 0.0092},  # -, -, -, 15%
}


def test_clothing_and_sparsity_claims_match_a_hand_computation(tmp_path):
  rng = np.random.default_rng(3)
  runs = str(tmp_path)
  vals = {s: write_means(runs, s, m, rng) for s, m in MEANS.items()}
  clean = {"pretrain/": [0.0100, 0.0102, 0.0098],
           "none/none": [0.0105, 0.0107, 0.0103],
           "global/global": [0.0125, 0.0127, 0.0123],
           "cas/cas": [0.013, 0.0132, 0.0128]}
  attacked = {"pretrain/": [0.006, 0.006, 0.006],
              "none/none": [0.006, 0.006, 0.006],
              "global/global": [0.0099, 0.0100, 0.0097],  # below pretrain
              "cas/cas": [0.0110, 0.0112, 0.0101]}  # seed 2 below none
  write_last_k(runs, "sasrec_clothing", clean, attacked)
  out = paper_summary.summarize(paper_summary.load(runs,
                                                   paper_summary.SETTINGS))
  assert out["not_loaded"] == []
  mean = lambda v: sum(v) / len(v)

  # Clothing: GRU4Rec improves with cas only; linear does not hurt SASRec.
  cl = out["clothing"]
  only = cl["GRU4Rec: only cas improves on none"]
  assert only["ours"] is True and only["setting"] == "gru4rec_clothing"
  v = vals["gru4rec_clothing"]
  table = paper_summary.load(runs, ["gru4rec_clothing"])[
      "gru4rec_clothing"]["table2"]
  for c, m in zip(only["comparisons"], data_claims.ADV_METHODS):
    above = m == "cas"
    assert c["comparison"] == f"{m} {'above' if above else 'not above'} none"
    assert c["holds"] is True
    assert abs(c["gain"] - (mean(v[m]) / mean(v["none"]) - 1)) < 1e-12
    wins = sum((a > b) == above for a, b in zip(v[m], v["none"]))
    assert tuple(c["seeds"]) == (wins, 3)
    # The table's own test against none, Holm over the table's family.
    assert c["test"] == table["rows"][m]["test/ndcg@10"]["vs_none"]
    assert abs(c["test"]["p"] - p_two_sided(v[m], v["none"])) < 1e-9
  # The paper's own Table 2 has seq above its base on Clothing GRU4Rec.
  assert [c["paper"] for c in only["comparisons"]] == [True, False, True,
                                                       True]
  linear = cl["SASRec: linear hurts"]
  assert linear["ours"] is False and linear["comparisons"][0]["paper"]
  assert tuple(linear["comparisons"][0]["seeds"]) == (0, 3)

  # Last 5 replaced: cas stays above both clean bases, global does not.
  lk = cl["SASRec, last 5 replaced: cas and global above the clean base"]
  assert lk["ours"] is False and lk["missing"] is None
  pairs = [(m, b) for m in ("cas/cas", "global/global")
           for b in ("pretrain/", "none/none")]
  raw = [p_two_sided(attacked[m], clean[b]) for m, b in pairs]
  for c, (m, b), p, adj in zip(lk["comparisons"], pairs, raw,
                               holm_by_hand(raw)):
    assert abs(c["a"] - mean(attacked[m])) < 1e-12
    assert abs(c["b"] - mean(clean[b])) < 1e-12
    assert c["holds"] == (mean(attacked[m]) > mean(clean[b]))
    assert tuple(c["seeds"]) == (
        sum(a > x for a, x in zip(attacked[m], clean[b])), 3)
    assert abs(c["test"]["p"] - p) < 1e-9
    assert abs(c["test"]["p_holm"] - adj) < 1e-9
  assert [c["holds"] for c in lk["comparisons"]] == [True, True, False,
                                                     False]
  assert tuple(lk["comparisons"][1]["seeds"]) == (2, 3)

  # Sparser data, larger gains: Clothing against Beauty and Video.
  sp = out["sparsity"]
  assert sp["by_sparsity"] == ["clothing", "beauty", "video"]
  follows = {(mo, m): sp["models"][mo][m]["ours"]
             for mo in ("sasrec", "gru4rec")
             for m in data_claims.ADV_METHODS}
  assert follows == {
      ("sasrec", "linear"): False, ("sasrec", "seq"): True,
      ("sasrec", "global"): True, ("sasrec", "cas"): True,
      ("gru4rec", "linear"): False, ("gru4rec", "seq"): False,
      ("gru4rec", "global"): False, ("gru4rec", "cas"): True}
  gains = lambda s, m: [a / b - 1 for a, b in zip(vals[s][m],
                                                  vals[s]["none"])]
  raw, got = [], []
  for mo in ("sasrec", "gru4rec"):
    for m in data_claims.ADV_METHODS:
      row = sp["models"][mo][m]
      for d in ("clothing", "beauty", "video"):
        s = f"{mo}_{d}"
        want = mean(vals[s][m]) / mean(vals[s]["none"]) - 1
        assert abs(row["gains"][d] - want) < 1e-12
        paper = data_claims.PAPER_TABLE2[s]
        assert abs(row["paper_gains"][d]
                   - (paper[m] / paper["none"] - 1)) < 1e-12
      for c, d in zip(row["comparisons"], ("beauty", "video")):
        assert c["comparison"] == f"clothing > {d}"
        assert c["holds"] == (row["gains"]["clothing"] > row["gains"][d])
        x, y = gains(f"{mo}_clothing", m), gains(f"{mo}_{d}", m)
        assert tuple(c["seeds"]) == (sum(a > b for a, b in zip(x, y)), 3)
        raw.append(p_two_sided(x, y))
        got.append(c["test"])
  for t, p, adj in zip(got, raw, holm_by_hand(raw)):
    assert abs(t["p"] - p) < 1e-9 and abs(t["p_holm"] - adj) < 1e-9
  # The paper's own gains: SASRec cas gains most on Video (37%), not on
  # Clothing (22%).
  assert sp["models"]["sasrec"]["cas"]["paper"] is False

  md = paper_summary.to_markdown(out, runs)
  assert "| gru4rec_clothing | 0,1,2 | 0.0080 |" in md
  assert "0.0083 (+15.3%)" in md  # the paper's cas on Clothing GRU4Rec
  assert ("| GRU4Rec: only cas improves on none | gru4rec_clothing | all | "
          "yes | claimed (Sec. 5.5) | | |") in md
  assert "| | | seq not above none | yes (" in md
  assert "| no (+2.8%) | 3 of 3 seeds | " in md
  assert ("| SASRec: linear hurts | sasrec_clothing | all | no | "
          "claimed (Sec. 5.5) | | |") in md
  assert ("| | | cas attacked above none clean | yes (0.0108 vs 0.0105) |  "
          "| 2 of 3 seeds | ") in md
  assert "| sasrec | cas | +29.9% / +21.6% | " in md
  assert ("- gru4rec_clothing: `scripts/cpu_paper.sh gru4rec_clothing "
          "robustness_report 0,1,2`") in md
  assert "Not in --settings" not in md

  # A report without the last-5 attack is named with the commands that
  # make it; settings left out of --settings are named too.
  write_last_k(runs, "sasrec_clothing", clean, attacked, attacks=("last",))
  out = paper_summary.summarize(paper_summary.load(runs, [
      "sasrec_clothing", "gru4rec_clothing"]))
  lk = out["clothing"][
      "SASRec, last 5 replaced: cas and global above the clean base"]
  assert lk["ours"] is None
  md = paper_summary.to_markdown(out, runs)
  assert ("- sasrec_clothing: the robustness report has no last_5 attack "
          "of cas, global, pretrain, none: `scripts/cpu_paper.sh "
          "sasrec_clothing robustness pretrain,none/none,global/global,"
          "cas/cas SEED` for each seed") in md
  assert ("Not in --settings (the claims that need them are not yet run): "
          "sasrec_video, gru4rec_video, sasrec_beauty, gru4rec_beauty.") in md
  assert out["sparsity"]["models"]["sasrec"]["cas"]["ours"] is None


def test_claims_match_a_hand_computation(tmp_path):
  rng = np.random.default_rng(0)
  runs = str(tmp_path)
  methods = ["cas", "global", "linear", "seq", "none", "cas_temporal",
             "cas_cross"]
  good = write_table(runs, "sasrec_video", rng, methods)
  swapped = ["global", "cas"] + methods[2:]  # global beats cas
  bad = write_table(runs, "gru4rec_beauty", rng, swapped)
  write_robustness(runs, "sasrec_video", {
      "pretrain/": [0.8, 0.82, 0.81], "none/none": [0.8, 0.79, 0.83],
      "global/global": [0.7, 0.72, 0.69], "cas/cas": [0.6, 0.75, 0.62]})

  out = paper_summary.summarize(paper_summary.load(runs, [
      "sasrec_video", "gru4rec_beauty", "sasrec_beauty"]))
  st = out["settings"]
  for setting, per in (("sasrec_video", good), ("gru4rec_beauty", bad)):
    for m in methods:
      mean = sum(per[m][s]["test/ndcg@10"] for s in SEEDS) / 3
      assert abs(st[setting]["ours"][m] - mean) < 1e-12
      base = sum(per["none"][s]["test/ndcg@10"] for s in SEEDS) / 3
      assert abs(st[setting]["ours_gain"][m] - (mean / base - 1)) < 1e-12
  assert abs(st["sasrec_video"]["paper_gain"]["cas"] - 0.3741) < 1e-3
  c = out["claims"]
  assert c["sasrec_video"]["accuracy: cas > global > none"]["ours"] is True
  assert c["gru4rec_beauty"]["accuracy: cas > global > none"]["ours"] is False
  assert c["sasrec_beauty"]["accuracy: cas > global > none"]["ours"] is None
  assert c["sasrec_video"]["last item: cas loses least"]["ours"] is True
  assert c["gru4rec_beauty"]["last item: cas loses least"]["ours"] is None
  drops = st["sasrec_video"]["last_item_drop"]
  assert abs(drops["cas"] - (0.61 + 0.76 + 0.63) / 3) < 1e-12
  # Per seed: cas above global in every seed of the good table, in none of
  # the swapped one; at the last item cas loses less in seeds 0 and 2 only.
  assert c["sasrec_video"]["accuracy: cas > global > none"]["seeds"] == (3, 3)
  assert c["gru4rec_beauty"]["accuracy: cas > global > none"]["seeds"] == (
      0, 3)
  assert c["sasrec_video"]["last item: cas loses least"]["seeds"] == (2, 3)
  assert c["gru4rec_beauty"]["last item: cas loses least"]["seeds"] is None
  assert c["sasrec_beauty"]["accuracy: cas > global > none"]["seeds"] is None
  assert abs(drops["pretrain"] - (0.81 + 0.83 + 0.82) / 3) < 1e-12

  md = paper_summary.to_markdown(out, runs)
  assert "| sasrec_video | 0,1,2 | 0.0" in md
  assert "0.0606 (+37.4%)" in md  # the paper's cas on Video SASRec
  assert "23.6%" in md
  assert "| last item: cas loses least | sasrec_video | yes | " \
         "claimed (Sec. 5.6) | 2 of 3 seeds | cas vs global" in md
  # What is missing is named with the command that makes it.
  assert "- sasrec_beauty: `scripts/cpu_paper.sh sasrec_beauty table" in md
  assert ("- gru4rec_beauty: `scripts/cpu_paper.sh gru4rec_beauty "
          "robustness_report") in md
  # ML-1M, the dense set of the paper's contrast, is not among our data.
  assert "ML-1M" in md and "not among the data we hold" in md


def test_cli_writes_the_summary_and_refuses_an_empty_folder(tmp_path):
  def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cat_jax.experiments.paper_summary", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
  r = cli(f"--runs={tmp_path}")
  assert r.returncode != 0
  assert "No table2.json or robustness_minimal.json" in r.stderr
  r = cli(f"--runs={tmp_path}", "--settings=sasrec_vidoe")
  assert r.returncode != 0 and "unknown ['sasrec_vidoe']" in r.stderr
  write_table(str(tmp_path), "gru4rec_video", np.random.default_rng(1),
              ["cas", "global", "none"])
  r = cli(f"--runs={tmp_path}", "--settings=gru4rec_video")
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "paper_summary.md").read_text() in r.stdout + "\n"
  saved = json.loads((tmp_path / "paper_summary.json").read_text())
  assert saved["claims"]["gru4rec_video"][
      "accuracy: cas > global > none"]["ours"] is True


FINAL = os.path.join(ROOT, "docs", "results", "final.json")


def test_recorded_tables_fill_the_settings_without_a_report(tmp_path):
  """With --recorded, a setting without a report under --runs is read from
  final.json: its means, gains, p-values and per-seed values as recorded,
  drops as fractions, `base` as `pretrain`; a run folder's report wins."""
  with open(FINAL) as f:
    final = json.load(f)["settings"]
  rng = np.random.default_rng(3)
  own = write_means(str(tmp_path), "gru4rec_video", MEANS["gru4rec_video"],
                    rng)
  loaded = paper_summary.load(str(tmp_path), paper_summary.SETTINGS, FINAL)
  out = paper_summary.summarize(loaded)
  st = out["settings"]
  # The run folder's own table, not the recorded one.
  assert st["gru4rec_video"]["recorded"]["table2"] is None
  assert np.isclose(st["gru4rec_video"]["ours"]["cas"], np.mean(own["cas"]))
  assert st["gru4rec_video"]["recorded"]["robustness"]  # none of its own
  for s in ("sasrec_video", "sasrec_beauty", "gru4rec_beauty"):
    rec = final[s]["table2"]["rows"]
    assert st[s]["recorded"]["table2"].startswith("RESULTS.md at commit")
    for m, row in rec.items():
      assert st[s]["ours"][m] == row["mean"]
      if row["pct_vs_none"] is not None:
        assert np.isclose(100 * st[s]["ours_gain"][m], row["pct_vs_none"])
    rob = final[s]["robustness"]["rows"]
    assert np.isclose(100 * st[s]["last_item_drop"]["pretrain"],
                      rob["base"]["last"][0])
    assert np.isclose(100 * st[s]["last_item_drop"]["cas"],
                      rob["cas"]["last"][0])
    assert st[s]["last_cas_vs_global"]["p"] == rob["cas"]["p_vs_global"][0]
    assert st[s]["cas_vs_global"]["p"] == rec["cas"]["p_vs_global"][0]
  # Per-seed values where recorded, counted by hand; seeds without one are
  # left out, not compared.
  def wins(s, a, b):
    rows = final[s]["table2"]["rows"]
    pairs = [(x, y) for x, y in zip(rows[a]["values"], rows[b]["values"])
             if x is not None and y is not None]
    return [sum(x > y for x, y in pairs), len(pairs)]
  got = out["claims"]["sasrec_video"]["accuracy: cas > global > none"]
  assert list(got["seeds"]) == wins("sasrec_video", "cas", "global")
  # Beauty GRU4Rec kept one seed's values, and each seed's change of cas
  # against global, which count instead.
  assert wins("gru4rec_beauty", "cas", "global")[1] == 1
  pcts = final["gru4rec_beauty"]["table2"]["pct_vs_global_per_seed"]["cas"]
  got = out["claims"]["gru4rec_beauty"]["accuracy: cas > global > none"]
  assert list(got["seeds"]) == [sum(p > 0 for p in pcts), 3]
  md = paper_summary.to_markdown(out)
  assert "| sasrec_video (recorded) | 0,1,2 |" in md
  assert "| gru4rec_video | 0,1,2 |" in md
  assert "- sasrec_beauty table2: RESULTS.md at commit" in md


def test_recorded_results_missing_is_one_line(tmp_path):
  write_table(str(tmp_path), "gru4rec_video", np.random.default_rng(1),
              ["cas", "global", "none"])
  r = subprocess.run(
      [sys.executable, "-m", "cat_jax.experiments.paper_summary",
       f"--runs={tmp_path}", f"--recorded={tmp_path}/final.json"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode != 0
  assert f"No recorded results at {tmp_path}/final.json" in r.stderr
  assert "Traceback" not in r.stderr
  # A file of another kind (here a table2.json) is named, not a KeyError.
  wrong = tmp_path / "paper_gru4rec_video" / "table2.json"
  r = subprocess.run(
      [sys.executable, "-m", "cat_jax.experiments.paper_summary",
       f"--runs={tmp_path}", f"--recorded={wrong}"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert f"{wrong} is not a recorded-results file" in r.stderr
