"""docs/results/final.json against RESULTS.md, and the figures command.

final.json is the transcription of RESULTS.md's final three-seed tables that
`cat_jax.experiments.figures` draws from; its means, spreads and per-seed
values must be those of the tables, and the means must follow from the
per-seed values where the notebook kept them.
"""

import json
import os
import re
import statistics

import pytest

from cat_jax.experiments import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = os.path.join(ROOT, "docs", "results", "final.json")


def load_final() -> dict:
  with open(FINAL) as f:
    return json.load(f)


def results_sections() -> dict:
  """{heading text: its text up to the next heading} of RESULTS.md and of
  the detailed reports it links (docs/results/*.md)."""
  out = {}
  for rel in ("RESULTS.md", os.path.join("docs", "results", "layouts.md"),
              os.path.join("docs", "results", "poisoning.md")):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
      parts = re.split(r"^#+\s+(.*)$", f.read(), flags=re.M)
    out.update(zip(parts[1::2], parts[2::2]))
  return out


def rows(section: str, name: str) -> list:
  """Table lines of a section whose first cell names `name` (its first
  word, without markup)."""
  out = []
  for line in section.splitlines():
    if not line.startswith("|"):
      continue
    first = line.split("|")[1].strip().replace("*", "").replace("`", "")
    if first.split(" ")[0] == name:
      out.append(line)
  return out


def assert_in_row(section: str, name: str, cell: str, where: str):
  lines = rows(section, name)
  assert lines, f"{where}: no row {name!r}"
  assert any(cell in line for line in lines), (
      f"{where}: {cell!r} not in the row of {name!r}: {lines}")


def test_table2_means_agree_with_results_md():
  secs = results_sections()
  checked = 0
  for name, s in load_final()["settings"].items():
    t2 = s.get("table2")
    if t2 is None:
      continue
    sec = secs[t2["results_md"]]
    for m, r in t2["rows"].items():
      where = f"{name} {m}"
      assert_in_row(sec, m, f"{r['mean']:.4f} ± {r['std']:.4f}", where)
      assert_in_row(sec, m, f"{r['hr10'][0]:.4f} ± {r['hr10'][1]:.4f}", where)
      if r["pct_vs_none"] is not None:
        assert_in_row(sec, m, f"{r['pct_vs_none']:+.1f}%", where)
      for p in (r["p_vs_none"], r["p_vs_global"]):
        if p is not None:
          assert_in_row(sec, m, f"{p[0]:.3f} ({p[1]:.3f}", where)
      known = [v for v in r["values"] if v is not None]
      for v in known:
        assert_in_row(sec, m, f"| {v:.4f} |", where)
      if len(known) == len(r["values"]) == 3:
        # Per-seed values are rounded to 4 digits, the printed mean was
        # taken from the unrounded ones.
        assert abs(statistics.mean(known) - r["mean"]) <= 1.01e-4, where
        assert abs(statistics.stdev(known) - r["std"]) <= 2.01e-4, where
      checked += 1
  assert checked >= 30


def test_robustness_drops_agree_with_results_md():
  secs = results_sections()
  checked = 0
  for name, s in load_final()["settings"].items():
    rob = s.get("robustness")
    if rob is None:
      continue
    sec = secs[rob["results_md"]]
    for m, r in rob["rows"].items():
      where = f"{name} {m}"
      assert_in_row(sec, m, f"{r['clean'][0]:.4f} ± {r['clean'][1]:.4f}",
                    where)
      for a in figures.ATTACKS:
        if r.get(a) is not None:
          assert_in_row(sec, m, f"{r[a][0]:.1f} ± {r[a][1]:.1f}%", where)
          checked += 1
      if r["p_vs_global"] is not None:
        p = r["p_vs_global"]
        assert_in_row(sec, m, f"{p[0]:.3f} ({p[1]:.3f}", where)
      seeds = r.get("last_values") or []
      if seeds and None not in seeds:
        # Per-seed drops are rounded to 0.1 points.
        assert abs(statistics.mean(seeds) - r["last"][0]) <= 0.1 + 1e-9, where
  assert checked >= 60


def test_poisoning_and_buckets_agree_with_results_md():
  data = load_final()
  secs = results_sections()
  poison = data["poisoning"]
  sec = secs[poison["results_md"]]
  labels = {"clean": "clean", "random": "random 1%",
            "bandwagon": "bandwagon 1%"}
  for d, variants in poison["rows"].items():
    for v, r in variants.items():
      eps = poison["eps"].get(v)
      head = (f"| {labels[d]} | {v.replace('_pamacf', ' + pamacf')}"
              + (f" ({eps:g}) |" if eps else " |"))
      line = [l for l in sec.splitlines() if l.startswith(head)]
      assert len(line) == 1, head
      for key in ("ndcg10", "hr10", "t_hr50"):
        assert f"{r[key][0]:.4f} ± {r[key][1]:.4f}" in line[0], (head, key)
      if r["t_hr50_values"]:
        assert ", ".join(f"{x:.4f}" for x in r["t_hr50_values"]) in line[0]
        assert abs(statistics.mean(r["t_hr50_values"]) - r["t_hr50"][0]) <= (
            1.01e-4), head
  b = data["buckets"]
  sec = secs[b["results_md"]]
  for key in ("unbucketed", "buckets_4"):
    assert f"{b[key]['mean']:.4f} ± {b[key]['std']:.4f}" in sec
    assert abs(statistics.mean(b[key]["test_ndcg10"]) - b[key]["mean"]) <= (
        1.01e-4)
  for s, (u, k) in enumerate(zip(b["unbucketed"]["test_ndcg10"],
                                 b["buckets_4"]["test_ndcg10"])):
    assert f"| {s} | {u:.4f} | {k:.4f} |" in sec


def test_figure_data_from_final():
  data = load_final()
  settings = figures.from_final(data)
  assert [s["name"] for s in settings] == data["figures"]
  video = settings[0]
  assert video["label"] == "Video SASRec"
  assert video["gain"]["cas"] == pytest.approx(14.9)
  assert video["paper_gain"]["cas"] == pytest.approx(37.41, abs=0.01)
  assert video["drops"]["cas"]["last"] == (65.3, 3.5)
  assert video["paper_drops"]["last"] == 23.6


def _paper_summary(tmp_path) -> str:
  """A RUNS folder with a paper_summary.json of two settings and one
  robustness report, in the layouts their commands write."""
  summary = {"settings": {
      "sasrec_video": {
          "ours_gain": {"none": 0.0, "global": 0.125, "cas": 0.149},
          "paper_gain": {"none": 0.0, "global": 0.263, "cas": 0.374},
          "last_item_drop": {"pretrain": 0.84, "none": 0.84, "global": 0.79,
                             "cas": 0.65},
          "paper_last_item_drop": 0.236},
      "gru4rec_clothing": {
          "ours_gain": {"none": 0.0, "cas": None},
          "paper_gain": {"none": 0.0, "cas": 0.1528},
          "last_item_drop": {"pretrain": None, "none": None, "global": None,
                             "cas": None},
          "paper_last_item_drop": None}}}
  with open(tmp_path / "paper_summary.json", "w") as f:
    json.dump(summary, f)
  drop = lambda m, s: {"drop": {"mean": m, "std": s, "values": [m] * 3}}
  report = {"seeds": [0, 1, 2], "by_attack": {
      a: {"rows": {"pretrain": drop(0.3 + i / 10, 0.01),
                   "cas": drop(0.1 + i / 10, 0.02)}}
      for i, a in enumerate(("first", "middle", "last", "last_1", "last_2"))}}
  os.makedirs(tmp_path / "paper_gru4rec_clothing")
  with open(tmp_path / "paper_gru4rec_clothing" / "robustness_minimal.json",
            "w") as f:
    json.dump(report, f)
  return str(tmp_path)


def test_figure_data_from_paper_summary(tmp_path):
  runs = _paper_summary(tmp_path)
  settings = {s["name"]: s for s in figures.load(None, runs)}
  video, clothing = settings["sasrec_video"], settings["gru4rec_clothing"]
  assert video["label"] == "Video SASRec"
  assert video["gain"] == pytest.approx({"global": 12.5, "cas": 14.9})
  assert video["drops"]["base"] == {"last": pytest.approx((84.0, 0.0))}
  assert video["paper_drops"] == {"last": pytest.approx(23.6)}
  assert clothing["label"] == "Clothing GRU4Rec"
  assert clothing["gain"] == {}
  # From the report: every attack, with its spread; last_1 is 'last'.
  assert clothing["drops"]["base"]["last_2"] == pytest.approx((70.0, 1.0))
  assert clothing["drops"]["cas"]["last"] == pytest.approx((40.0, 2.0))


def test_figure_data_from_the_runners_reports(tmp_path):
  """End to end on the layouts the runners write: table2.json and
  robustness_minimal.json, then paper_summary.json, then the figure data."""
  from cat_jax.experiments import common, paper_summary, robustness_report
  seeds = [0, 1, 2]
  means = {"none": 0.050, "linear": 0.053, "global": 0.055, "cas": 0.056}
  per = {m: {s: {"test/ndcg@10": mu + 1e-4 * s, "test/hr@10": 2 * mu}
             for s in seeds} for m, mu in means.items()}
  folder = tmp_path / "paper_sasrec_video"
  common.write(str(folder), "table2", common.summarize(per, seeds))
  drop = {"pretrain": 0.8, "none/none": 0.8, "global/global": 0.7,
          "cas/cas": 0.6}
  per_seed = {s: {e: {"clean": {"ndcg@10": 0.05},
                      "attacks": {a: {"ndcg@10_drop": d + 0.01 * i + 0.001 * s,
                                      "ndcg@10": 0.05 * (1 - d)}
                                  for i, a in enumerate(
                                      ("first", "middle", "last", "last_2"))}}
                  for e, d in drop.items()} for s in seeds}
  with open(folder / "robustness_minimal.json", "w") as f:
    json.dump(robustness_report.summarize(per_seed, seeds), f)
  loaded = paper_summary.load(str(tmp_path), ["sasrec_video"])
  with open(tmp_path / "paper_summary.json", "w") as f:
    json.dump(paper_summary.summarize(loaded), f)
  (video,) = [s for s in figures.load(None, str(tmp_path))
              if s["name"] == "sasrec_video"]
  assert video["gain"]["cas"] == pytest.approx(100 * (0.0561 / 0.0501 - 1))
  assert video["paper_gain"]["cas"] == pytest.approx(37.41, abs=0.01)
  assert video["drops"]["base"]["first"][0] == pytest.approx(80.1)
  assert video["drops"]["cas"]["last_2"][0] == pytest.approx(63.1)
  assert video["paper_drops"] == {"last": pytest.approx(23.6)}


def test_missing_paper_summary_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="paper_summary"):
    figures.load(None, str(tmp_path))


def test_figures_from_final(tmp_path):
  pytest.importorskip("matplotlib")
  paths = figures.write_figures(figures.from_final(load_final()),
                                str(tmp_path))
  assert [os.path.basename(p) for p in paths] == list(figures.FILES)
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_figures_from_paper_summary(tmp_path):
  pytest.importorskip("matplotlib")
  runs = _paper_summary(tmp_path)
  paths = figures.write_figures(figures.load(None, runs),
                                str(tmp_path / "out"))
  assert all(os.path.getsize(p) > 0 for p in paths)


def test_committed_figures_exist():
  for f in figures.FILES:
    assert os.path.exists(os.path.join(ROOT, "docs", "figures", f))
