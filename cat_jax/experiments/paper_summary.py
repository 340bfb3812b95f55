"""The six settings side by side with the paper: Table 2, Fig. 5, verdicts.

  python -m cat_jax.experiments.paper_summary --runs=$RUNS
  # Settings without a report of their own, from RESULTS.md's final tables:
  python -m cat_jax.experiments.paper_summary --runs=$RUNS \
      --recorded=docs/results/final.json

Reads the reports the other runners wrote for each setting in --settings
(`<model>_<data>`, as in `scripts/cpu_paper.sh`; SASRec and GRU4Rec on
Video, Beauty and Clothing):

  <runs>/paper_<setting>/table2.json             (table2 --seeds=0,1,2)
  <runs>/paper_<setting>/robustness_minimal.json (robustness_report)

and, with --recorded, takes a report that is missing there from the
transcription of RESULTS.md's tables (`recorded`; marked "(recorded)").

and writes <runs>/paper_summary.json and .md: our test NDCG@10 next to the
paper's Table 2 (each with its gain over the base), the last-item drop of
Fig. 5, and, for each of the paper's claims, what our runs say:
  * every setting (Sec. 5.5, 5.6): cas > global > base in accuracy; cas
    loses least when the end of the sequence is attacked; with the number
    of seeds in which `cas` beats `global` on its own (the per-seed values
    the reports keep: a mean can hide a split);
  * Clothing, the sparsest set (`clothing_claims`): every adversarial
    method but cas fails to improve GRU4Rec while cas does, and linear
    hurts SASRec (Sec. 5.5); SASRec trained with cas or global, with the
    last 5 items replaced, still ranks better than the base model on clean
    data (Sec. 5.6, Fig. 6);
  * larger gains on sparser data (Sec. 5.5; `sparsity_claims`): for each
    model and method, Clothing's gain over `none` against Video's and
    Beauty's, and whether the gains rank as the densities do.
A claim holds in our runs when it holds for the means over seeds; each
comparison also has a paired t-test over seeds (Holm-adjusted over its
family) and the number of seeds in which it holds. A missing report leaves
its cells empty and names the command that makes it. Nothing is trained or
attacked here.
"""

from __future__ import annotations

import os

from absl import app, flags

from cat_jax import checkpoints, writer
from cat_jax.experiments import common, recorded
from cat_jax.experiments.data_claims import (
    LAST_K_ATTACK, LAST_K_BASES, LAST_K_MODELS, METRIC,
    PAPER_TABLE2, SPARSE_NOTE, clothing_claims, clothing_markdown, gain,
    means, ordered, pct, sparsity_claims, sparsity_markdown, table_gain, word)

SETTINGS = ("sasrec_video", "gru4rec_video", "sasrec_beauty",
            "gru4rec_beauty", "sasrec_clothing", "gru4rec_clothing")
METHODS = ("none", "linear", "seq", "global", "cas", "cas_temporal",
           "cas_cross")
# Fig. 5 (Video, SASRec base): the last item replaced costs 23.6% NDCG@10.
PAPER_LAST_ITEM_DROP = {"sasrec_video": 0.236}


def load(runs: str, settings, recorded_path: str | None = None) -> dict:
  """{setting: {"table2": dict | None, "robustness": dict | None}}.

  A report missing under `runs` is taken from `recorded_path` (final.json,
  `recorded.load`) when given and it holds that setting; such a report
  carries a "recorded" key naming its source.
  """
  folder = lambda s: os.path.join(runs, f"paper_{s}")
  out = {s: {"table2": checkpoints.read_json(
                 os.path.join(folder(s), "table2.json")),
             "robustness": checkpoints.read_json(
                 os.path.join(folder(s), "robustness_minimal.json"))}
         for s in settings}
  if recorded_path:
    for s, entry in recorded.load(recorded_path, settings).items():
      for k, report in entry.items():
        if out[s][k] is None:
          out[s][k] = report
  return out


def _test(table: dict | None, method: str, ref: str) -> dict | None:
  if table is None or method not in table["rows"]:
    return None
  return table["rows"][method][METRIC].get(f"vs_{ref}")


def _drop(rob: dict | None, model: str, attack: str = "last"):
  """Mean relative NDCG@10 drop of `model` under `attack`, or None."""
  if rob is None or attack not in rob["by_attack"]:
    return None
  row = rob["by_attack"][attack]["rows"].get(model)
  return None if row is None else row["drop"]["mean"]


def _seed_wins(row_a: dict | None, row_b: dict | None, lower: bool = False):
  """(seeds where a beats b, seeds compared) from two report rows' per-seed
  `values` (same seed order); a beats b when larger, or smaller if `lower`.
  None when a row is missing."""
  if row_a is None or row_b is None:
    return None
  # A recorded table (`recorded`) may lack some seeds' values.
  pairs = [(a, b) for a, b in zip(row_a["values"], row_b["values"])
           if a is not None and b is not None]
  if not pairs:
    return None
  return (sum((a < b) if lower else (a > b) for a, b in pairs), len(pairs))


def _cas_global_wins(rows: dict):
  """(seeds where cas's test NDCG@10 is above global's, seeds compared); a
  recorded table without every seed's values may keep the per-seed
  changes instead (`pct_vs_global_per_seed`)."""
  wins = _seed_wins(rows.get("cas", {}).get(METRIC),
                    rows.get("global", {}).get(METRIC))
  pcts = rows.get("cas", {}).get(METRIC, {}).get("pct_vs_global_per_seed")
  if pcts and (wins is None or wins[1] < len(pcts)):
    wins = (sum(p > 0 for p in pcts), len(pcts))
  return wins


def summarize(loaded: dict) -> dict:
  """The numbers and the claim checks; see the module docstring."""
  settings, claims = {}, {}
  for s, entry in loaded.items():
    table, rob = entry["table2"], entry["robustness"]
    ours = means(table)
    paper = PAPER_TABLE2.get(s, {})
    drops = {m: _drop(rob, m) for m in ("pretrain", "none", "global", "cas")}
    rows = table["rows"] if table else {}
    last = rob["by_attack"].get("last", {}).get("rows", {}) if rob else {}
    settings[s] = {
        "seeds": table["seeds"] if table else [],
        "robustness_seeds": rob["seeds"] if rob else [],
        # Where each report came from: None for the run folder, else the
        # transcription it was read from (`recorded`).
        "recorded": {k: (r or {}).get("recorded")
                     for k, r in (("table2", table), ("robustness", rob))},
        "ours": ours, "paper": paper,
        "ours_gain": {m: table_gain(table, m) for m in ours},
        "paper_gain": {m: gain(paper, m) for m in paper},
        "last_item_drop": drops,
        "paper_last_item_drop": PAPER_LAST_ITEM_DROP.get(s),
        "cas_vs_global": _test(table, "cas", "global"),
        "last_cas_vs_global": (
            last["cas"]["drop"].get("vs_global")
            if None not in (drops["cas"], drops["global"]) else None),
    }
    claims[s] = {
        "accuracy: cas > global > none": {
            "ours": ordered(ours, ("cas", "global", "none")),
            "paper": ordered(paper, ("cas", "global", "none")),
            "seeds": _cas_global_wins(rows)},
        "last item: cas loses least": {
            "ours": (None if None in (drops["cas"], drops["global"],
                                      drops["none"])
                     else drops["cas"] < min(drops["global"], drops["none"])),
            "paper": "claimed (Sec. 5.6)",
            "seeds": _seed_wins(last.get("cas", {}).get("drop"),
                                last.get("global", {}).get("drop"),
                                lower=True)},
    }
  return {"settings": settings, "claims": claims,
          "clothing": clothing_claims(loaded),
          "sparsity": sparsity_claims(loaded),
          "not_loaded": [s for s in SETTINGS if s not in loaded]}


def to_markdown(summary: dict, runs: str = "$RUNS") -> str:
  """Three tables: Table 2 with the paper's, Fig. 5 last item, the claims."""
  st = summary["settings"]
  head = "| setting | seeds | " + " | ".join(METHODS) + " |"
  lines = ["Test NDCG@10 (gain over `none`; the paper's gain over its base). "
           "Ours: mean over the seeds listed.", "", head,
           "|" + "---|" * (len(METHODS) + 2)]
  for s, v in st.items():
    cells = []
    for m in METHODS:
      if m in v["ours"]:
        g = "" if m == "none" else f" ({pct(v['ours_gain'][m])})"
        cells.append(f"{v['ours'][m]:.4f}{g}")
      else:
        cells.append("")
    lines.append(f"| {_name(s, v, 'table2')} | "
                 f"{','.join(map(str, v['seeds'])) or '-'} | "
                 + " | ".join(cells) + " |")
    paper = [(f"{v['paper'][m]:.4f}"
              + ("" if m == "none" else f" ({pct(v['paper_gain'][m])})"))
             if m in v["paper"] else "" for m in METHODS]
    lines.append("| paper | | " + " | ".join(paper) + " |")
  lines += ["", "Fig. 5, last item replaced (minimal attack): relative "
            "NDCG@10 drop, mean over the seeds listed.", "",
            "| setting | seeds | base (phase 1) | none | global | cas | "
            "cas vs global: p (Holm) | paper, base |", "|---|---|---|---|---|"
            "---|---|---|"]
  for s, v in st.items():
    d = v["last_item_drop"]
    cells = ["" if d[m] is None else f"{100 * d[m]:.1f}%"
             for m in ("pretrain", "none", "global", "cas")]
    paper = v["paper_last_item_drop"]
    lines.append(f"| {_name(s, v, 'robustness')} | "
                 f"{','.join(map(str, v['robustness_seeds'])) or '-'}"
                 f" | " + " | ".join(cells) + " | "
                 + common.format_p(v["last_cas_vs_global"]) + " | "
                 + ("" if paper is None else f"{100 * paper:.1f}%") + " |")
  lines += ["", "The paper's claims, setting by setting (ours from the "
            "means above; p: paired t-test over seeds, Holm-adjusted over "
            "the setting's table in parentheses):", "",
            "| claim | setting | ours | paper | cas better than global in "
            "| test |", "|---|---|---|---|---|---|"]
  for s, c in summary["claims"].items():
    for claim, v in c.items():
      test = (st[s]["cas_vs_global"] if claim.startswith("accuracy")
              else st[s]["last_cas_vs_global"])
      p = common.format_p(test)
      wins = v.get("seeds")
      wins = "" if wins is None else "%d of %d seeds" % tuple(wins)
      lines.append(f"| {claim} | {s} | {word(v['ours'])} | "
                   f"{word(v['paper'])} | {wins} | "
                   f"{'cas vs global ' + p if p else ''} |")
  lines += clothing_markdown(summary["clothing"])
  lines += sparsity_markdown(summary["sparsity"])
  lines += ["", SPARSE_NOTE]
  sources = sorted({(s, k, src) for s, v in st.items()
                    for k, src in v.get("recorded", {}).items() if src})
  if sources:
    lines += ["", "(recorded): read from the transcription of RESULTS.md's "
              "final tables (--recorded), because the run folder has no "
              "such report; per-seed values only where the notebook kept "
              "them, rounded to 4 digits, so a seed counted here may tie "
              "where the unrounded values did not:"]
    lines += [f"- {s} {k}: {src}" for s, k, src in sources]
  missing = [(s, k) for s, v in st.items()
             for k, ok in (("table2", v["seeds"]),
                           ("robustness", v["robustness_seeds"])) if not ok]
  lacking = [(v["setting"], v["missing"])
             for v in summary["clothing"].values() if v["missing"]]
  if missing or lacking:
    lines += ["", "Not yet reported (make them with scripts/cpu_paper.sh, "
              f"RUNS={runs}):"]
    for s, k in missing:
      arg = ("table EPS 0,1,2" if k == "table2" else "robustness_report 0,1,2")
      lines.append(f"- {s}: `scripts/cpu_paper.sh {s} {arg}`")
    for s, cmd in lacking:
      lines.append(f"- {s}: the robustness report has no {LAST_K_ATTACK} "
                   f"attack of {', '.join(LAST_K_MODELS + LAST_K_BASES)}: "
                   f"{cmd}")
  if summary["not_loaded"]:
    lines += ["", "Not in --settings (the claims that need them are not yet "
              f"run): {', '.join(summary['not_loaded'])}."]
  return "\n".join(lines) + "\n"


def _name(setting: str, v: dict, report: str) -> str:
  """The setting's name, marked when its report is a recorded one."""
  return setting + (" (recorded)" if v.get("recorded", {}).get(report)
                    else "")


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  settings = common.split_list(F.settings)
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise app.UsageError(f"--settings: unknown {unknown}; choose from "
                         f"{', '.join(SETTINGS)}.")
  if not os.path.isdir(F.runs):
    raise app.UsageError(f"--runs={F.runs} is not a folder: give the RUNS "
                         f"folder that holds paper_<setting>/.")
  try:
    loaded = load(F.runs, settings, F.recorded or None)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  if not any(v["table2"] or v["robustness"] for v in loaded.values()):
    raise app.UsageError(
        f"No table2.json or robustness_minimal.json under "
        f"{F.runs}/paper_<setting>/: run scripts/cpu_paper.sh SETTING table "
        f"EPS SEEDS first.")
  summary = summarize(loaded)
  md = common.write(F.runs, "paper_summary", summary,
                    lambda x: to_markdown(x, F.runs))
  print(md)


def define_flags():
  flags.DEFINE_string("runs", None, "Folder holding paper_<setting>/.",
                      required=True)
  flags.DEFINE_string("settings", ",".join(SETTINGS),
                      "Comma-separated <model>_<data> settings.")
  flags.DEFINE_string("recorded", "",
                      "Transcribed results (docs/results/final.json) for "
                      "the settings whose run folder lacks a report; empty: "
                      "run folders only.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
