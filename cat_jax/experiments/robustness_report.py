"""Paper Fig. 5 and 6 over seeds: mean ± std of the relative drops.

  python -m cat_jax.experiments.robustness_report \
      --workdir=runs/paper_sasrec_video --seeds=0,1,2 --mode=minimal

Reads `<workdir>/seed<k>/robustness_<mode>.json` (written by
`cat_jax.experiments.robustness` on each seed's workdir, the same phases in
every seed) and writes `<workdir>/robustness_<mode>.json` and `.md`: per
model, the clean test NDCG@10 and, for each attack (first / middle / last
item replaced, Fig. 5; the last K replaced, Fig. 6), the mean ± std over
seeds of the relative NDCG@10 drop. Paired t-tests over seeds compare the
drops of every model with `none` and of the cascade models with `global`
(the paper's claim: `cas` loses least at the end of the sequence), with
Holm-adjusted p-values, one family per attack (`common.summarize`).

A model is named by the last part of its entry: 'pretrain', 'none/none' ->
'none', 'cas/cas' -> 'cas'.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from cat_jax import robustness, writer
from cat_jax.experiments import common
from cat_jax.experiments import robustness as runner

METRIC = "ndcg@10"


def load(workdir: str, seeds, stem: str) -> dict:
  """{seed: the robustness runner's dict} from <workdir>/seed<k>/<stem>.json.

  Raises FileNotFoundError naming the seeds without a result and the
  command that makes one, ValueError when the seeds' models differ.
  """
  out, missing = {}, []
  for s in seeds:
    path = os.path.join(workdir, f"seed{s}", stem + ".json")
    if not os.path.exists(path):
      missing.append(path)
      continue
    with open(path) as f:
      out[s] = json.load(f)
  if missing:
    raise FileNotFoundError(
        f"No robustness result at {', '.join(missing)}: run "
        f"`python -m cat_jax.experiments.robustness --workdir=<that seed "
        f"folder> --phases=...` (scripts/cpu_paper.sh SETTING robustness "
        f"PHASES SEED) first.")
  entries = {s: list(r) for s, r in out.items()}
  first = entries[seeds[0]]
  for s, e in entries.items():
    if e != first:
      raise ValueError(f"seed {s} attacked {e}, seed {seeds[0]} {first}: "
                       f"run the same --phases for every seed.")
  return out


def summarize(per_seed: dict, seeds, metric: str = METRIC) -> dict:
  """Mean ± std over seeds of clean and attacked `metric` and its drop.

  Args:
    per_seed: {seed: {entry: evaluate_robustness dict}} (`load`).

  Returns:
    {"seeds", "metric", "models": [names], "attacks": [names],
     "clean": common.summarize of {model: {seed: {metric: clean}}},
     "by_attack": {attack: common.summarize of
                   {model: {seed: {"drop": ..., "attacked": ...}}}}}
    The t-tests (and Holm's family) are those of `common.summarize`: each
    model against 'none', cascade models against 'global'.
  """
  seeds = list(seeds)
  entries = list(per_seed[seeds[0]])
  names = [e.rstrip("/").split("/")[-1] for e in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"Entries {entries} do not have distinct model names.")
  attacks = list(per_seed[seeds[0]][entries[0]]["attacks"])
  clean = {n: {s: {metric: per_seed[s][e]["clean"][metric]} for s in seeds}
           for n, e in zip(names, entries)}
  by_attack = {}
  for a in attacks:
    runs = {n: {s: {"drop": per_seed[s][e]["attacks"][a][f"{metric}_drop"],
                    "attacked": per_seed[s][e]["attacks"][a][metric]}
                for s in seeds} for n, e in zip(names, entries)}
    by_attack[a] = common.summarize(runs, seeds, metrics=("drop", "attacked"))
  return {"seeds": seeds, "metric": metric, "models": names,
          "attacks": attacks,
          "clean": common.summarize(clean, seeds, metrics=(metric,)),
          "by_attack": by_attack}


def _cell(row: dict) -> str:
  return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}%"


def to_markdown(summary: dict) -> str:
  """Fig. 5 (single positions) and Fig. 6 (last K) as two tables."""
  m, models = summary["metric"], summary["models"]
  by = summary["by_attack"]
  single = [a for a in summary["attacks"] if not a.startswith("last_")]
  last_k = [a for a in summary["attacks"] if a.startswith("last_")]
  clean = summary["clean"]["rows"]
  head = (f"| model | clean {m} | "
          + " | ".join(f"{a} replaced: drop" for a in single)
          + (f" | last: attacked {m} | last: p vs none | last: p vs global"
             if "last" in by else "") + " |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for n in models:
    cells = [f"{clean[n][m]['mean']:.4f} ± {clean[n][m]['std']:.4f}"]
    cells += [_cell(by[a]["rows"][n]["drop"]) for a in single]
    if "last" in by:
      last = by["last"]["rows"][n]
      cells += [f"{last['attacked']['mean']:.4f} ± "
                f"{last['attacked']['std']:.4f}",
                common.format_p(last["drop"].get("vs_none")),
                common.format_p(last["drop"].get("vs_global"))]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  out = "\n".join(lines)
  if last_k:
    head = "| model | " + " | ".join(
        f"last {a[5:]} replaced: drop" for a in last_k) + " |"
    rows = [head, "|" + "---|" * (len(last_k) + 1)]
    rows += [f"| {n} | " + " | ".join(_cell(by[a]["rows"][n]["drop"])
                                       for a in last_k) + " |"
             for n in models]
    out += "\n\n" + "\n".join(rows)
  fam = by.get("last", {}).get("family", [])
  out += (f"\n\nDrop: relative {m} loss, mean ± std over seeds. p: two-sided "
          f"paired t-test over the seeds on the drop; in parentheses "
          f"Holm-adjusted over the {len(fam)} comparisons of that attack, * "
          f"where the adjusted p <= 0.05." if fam else "")
  return out + f"\n\nseeds: {summary['seeds']}\n"


def mean_results(summary: dict) -> dict:
  """The per-seed runner's layout with mean drops, for `runner.plot`."""
  m = summary["metric"]
  return {n: {"attacks": {a: {f"{m}_drop": summary["by_attack"][a]["rows"][n]
                              ["drop"]["mean"]}
                          for a in summary["attacks"]}}
          for n in summary["models"]}


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  seeds = common.split_list(F.seeds, int)
  stem = runner.output_stem(F.mode, F.alpha, F.alpha_scale, F.anchor)
  try:
    summary = summarize(load(F.workdir, seeds, stem), seeds)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  md = to_markdown(summary)
  if writer.is_chief():
    with open(os.path.join(F.workdir, stem + ".json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(F.workdir, stem + ".md"), "w") as f:
      f.write(md)
    runner.plot(mean_results(summary), os.path.join(F.workdir, stem + ".png"))
  print(md)


def define_flags():
  flags.DEFINE_string("workdir", None, "Folder holding seed<k>/.",
                      required=True)
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  flags.DEFINE_enum("mode", "minimal", robustness.MODES,
                    "Attack whose results are read (robustness_<mode>.json).")
  flags.DEFINE_float("alpha", None, "As given to the runner, if it was.")
  flags.DEFINE_float("alpha_scale", None, "As given to the runner, if it was.")
  flags.DEFINE_enum("anchor", "items", robustness.ANCHORS,
                    "As given to the runner.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
