"""Paper Table 2 for one (data set, model): methods x seeds, test NDCG/HR@10.

  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video --seeds=0,1,2 \
      --methods=none,linear,seq,global,cas

Each seed pretrains once (phase 1, in <workdir>/seed<k>/pretrain) and every
method continues from it; runs resume from their checkpoints. Writes
<workdir>/table2.json and table2.md: mean and std over seeds, % vs `none`
(the base model trained as long), and paired t-tests over seeds against
`none` and `global`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from cat_jax import stats, train
from cat_jax.writer import is_chief

METRICS = ("test/ndcg@10", "test/hr@10")


def run_table(config, workdir: str, seeds, methods) -> dict:
  """Trains every (seed, method) and returns the summary dict."""
  runs = {m: {} for m in methods}
  for seed in seeds:
    for method in methods:
      c = config.copy_and_resolve_references()
      c.seed = seed
      c.adv.method = method
      r = train.train_and_evaluate(c, os.path.join(workdir, f"seed{seed}"))
      runs[method][seed] = {k: r[method][k] for k in METRICS}
  return summarize(runs, seeds)


def summarize(runs: dict, seeds) -> dict:
  """runs[method][seed][metric] -> rows with mean, std, % vs none, tests."""
  rows = {}
  for method, per_seed in runs.items():
    row = {}
    for k in METRICS:
      vals = [per_seed[s][k] for s in seeds]
      row[k] = dict(zip(("mean", "std"), stats.mean_std(vals)), values=vals)
      for ref in ("none", "global"):
        if ref in runs and ref != method:
          ref_vals = [runs[ref][s][k] for s in seeds]
          row[k][f"vs_{ref}"] = stats.paired_ttest(vals, ref_vals)
      if "none" in runs:
        base = stats.mean_std([runs["none"][s][k] for s in seeds])[0]
        row[k]["pct_vs_none"] = 100.0 * (row[k]["mean"] / base - 1.0)
    rows[method] = row
  return {"seeds": list(seeds), "rows": rows}


def to_markdown(summary: dict) -> str:
  head = ("| method | NDCG@10 | % vs none | p vs none | p vs global | HR@10 |"
          " % vs none |\n|---|---|---|---|---|---|---|")
  lines = [head]
  fmt_p = lambda d: "" if d is None else f"{d['p']:.3f}"
  for method, row in summary["rows"].items():
    n, h = row["test/ndcg@10"], row["test/hr@10"]
    lines.append(
        f"| {method} | {n['mean']:.4f} ± {n['std']:.4f} | "
        f"{n.get('pct_vs_none', 0.0):+.1f}% | {fmt_p(n.get('vs_none'))} | "
        f"{fmt_p(n.get('vs_global'))} | {h['mean']:.4f} ± {h['std']:.4f} | "
        f"{h.get('pct_vs_none', 0.0):+.1f}% |")
  return "\n".join(lines) + f"\n\nseeds: {summary['seeds']}\n"


def main(argv):
  del argv
  seeds = [int(s) for s in flags.FLAGS.seeds.split(",") if s]
  methods = [m for m in flags.FLAGS.methods.split(",") if m]
  summary = run_table(flags.FLAGS.config, flags.FLAGS.workdir, seeds, methods)
  md = to_markdown(summary)
  if is_chief():
    with open(os.path.join(flags.FLAGS.workdir, "table2.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(flags.FLAGS.workdir, "table2.md"), "w") as f:
      f.write(md)
  logging.info("\n%s", md)
  print(md)


def define_flags():
  """Flags of the command line (not defined on import, so that the
  experiment modules can be imported together)."""
  config_flags.DEFINE_config_file("config", None, "Config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  flags.DEFINE_string("methods", "none,linear,seq,global,cas",
                      "Comma-separated adv.method values.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
