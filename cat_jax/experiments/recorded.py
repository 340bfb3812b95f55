"""docs/results/final.json read back in the shape of the runners' reports.

final.json is the transcription of RESULTS.md's final three-seed tables
(the run folders they came from are gone). `paper_summary` uses it for the
settings that have no `table2.json` or `robustness_minimal.json` under
--runs, so that it can report all six settings and test the claims that
compare data sets (Clothing against Video and Beauty) from one command.

A recorded table keeps what the notebook kept: every mean and std, the
p-values with their Holm adjustment, and per-seed values where they were
written down (None where not). A comparison that needs per-seed values
then runs over the seeds that have them, or is left untested.
"""

from __future__ import annotations

import json
import os

from cat_jax.experiments.data_claims import METRIC

ROB_METRIC = "ndcg@10"
# final.json names the phase-1 model `base`; the robustness reports name it
# by its phase, `pretrain`.
_MODEL_NAMES = {"base": "pretrain"}
_ATTACKS = ("first", "middle", "last", "last_2", "last_3", "last_4",
            "last_5")


def _test(pair):
  """[p, p_holm] -> a report's test dict, or None."""
  if pair is None:
    return None
  return {"p": pair[0], "p_holm": pair[1]}


def _table2(entry: dict) -> dict:
  """final.json's table2 entry -> a table2.json-shaped dict."""
  n = len(entry["seeds"])
  rows = {}
  for m, r in entry["rows"].items():
    row = {"mean": r["mean"], "std": r["std"],
           "values": list(r.get("values") or [None] * n)}
    if r.get("pct_vs_none") is not None:
      row["pct_vs_none"] = r["pct_vs_none"]
    for ref in ("none", "global"):
      if r.get(f"p_vs_{ref}") is not None:
        row[f"vs_{ref}"] = _test(r[f"p_vs_{ref}"])
    per_seed = (entry.get("pct_vs_global_per_seed") or {}).get(m)
    if per_seed:
      row["pct_vs_global_per_seed"] = list(per_seed)
    rows[m] = {METRIC: row}
    if r.get("hr10") is not None:
      rows[m]["test/hr@10"] = {"mean": r["hr10"][0], "std": r["hr10"][1],
                               "values": [None] * n}
  return {"seeds": list(entry["seeds"]), "rows": rows,
          "recorded": entry.get("source", "docs/results/final.json")}


def _robustness(entry: dict) -> dict:
  """final.json's robustness entry -> a robustness_minimal.json-shaped dict
  (drops as fractions, as the report keeps them; final.json has percent)."""
  n = len(entry["seeds"])
  clean, by_attack = {}, {a: {"rows": {}} for a in _ATTACKS}
  for name, r in entry["rows"].items():
    model = _MODEL_NAMES.get(name, name)
    clean[model] = {ROB_METRIC: {"mean": r["clean"][0], "std": r["clean"][1],
                                 "values": [None] * n}}
    for a in _ATTACKS:
      if r.get(a) is None:
        continue
      values = [None] * n
      if a == "last" and r.get("last_values"):
        values = [None if v is None else v / 100.0 for v in r["last_values"]]
      drop = {"mean": r[a][0] / 100.0, "std": r[a][1] / 100.0,
              "values": values}
      row = {"drop": drop}
      if a == "last":
        for ref in ("none", "global"):
          if r.get(f"p_vs_{ref}") is not None:
            drop[f"vs_{ref}"] = _test(r[f"p_vs_{ref}"])
        if r.get("attacked_last") is not None:
          row["attacked"] = {"mean": r["attacked_last"][0],
                             "std": r["attacked_last"][1],
                             "values": [None] * n}
      by_attack[a]["rows"][model] = row
  return {"seeds": list(entry["seeds"]), "metric": ROB_METRIC,
          "clean": {"rows": clean},
          "by_attack": {a: v for a, v in by_attack.items() if v["rows"]},
          "recorded": entry.get("source", "docs/results/final.json")}


def load(path: str, settings) -> dict:
  """{setting: {"table2": dict | None, "robustness": dict | None}} of the
  `settings` that final.json at `path` records (the others are left out).

  Raises FileNotFoundError naming `path` when it does not exist, ValueError
  when it is not such a file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No recorded results at {path}: give --recorded=<final.json> "
        "(docs/results/final.json in the repository), or --recorded= to "
        "read only the run folders.")
  try:
    with open(path) as f:
      data = json.load(f)
    recorded = data["settings"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"{path} is not a recorded-results file like docs/results/final.json "
        f"(a JSON object with 'settings'): {e}") from None
  out = {}
  for s in settings:
    entry = recorded.get(s) or {}
    t2, rob = entry.get("table2"), entry.get("robustness")
    if t2 or rob:
      out[s] = {"table2": _table2(t2) if t2 else None,
                "robustness": _robustness(rob) if rob else None}
  return out
