"""What the experiment runners share: shared pretraining, summaries, output.

Layout of a runner's workdir: `seed<k>/` holds the phase-1 model of seed k
(`seed<k>/pretrain`, trained once) and `seed<k>/<variant>/` each phase-2
variant trained from it. Everything resumes from checkpoints.
"""

from __future__ import annotations

import json
import math
import os

from cat_jax import stats, train
from cat_jax.writer import is_chief

METRICS = ("test/ndcg@10", "test/hr@10")
# What selection reads (checkpoints, eps): never a test metric.
SELECT = "valid/ndcg@10"


def apply_overrides(config, overrides: dict):
  """A copy of `config` with dotted keys set ({'adv.eps': 1.0, ...})."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def run_variants(config, workdir: str, seeds, variants: dict,
                 vectorize: bool = False, folders=None) -> dict:
  """Pretrains each seed once, then trains every phase-2 variant from it.

  Args:
    variants: {name: overrides}, e.g. {'cas': {'adv.method': 'cas'}}.
    vectorize: train all seeds of a phase in one vectorized program
      (`train.train_runs`) instead of one after the other; same results and
      files, far faster on an accelerator.
    folders: optional {name: subfolder of seed<k>/} for variants that must
      not share the default folder `name` with another runner's run of the
      same name (eps_sweep's short `none` beside table2's).

  Returns:
    runs[name][seed] = {metric: test value for METRICS, and SELECT: the
    validation value} for the selected checkpoints.
  """
  seeds = list(seeds)
  seed_dirs = [os.path.join(workdir, f"seed{s}") for s in seeds]
  runs = {name: {} for name in variants}
  folders = folders or {}

  def train_group(c, idx, sub, phase, reuse):
    """Seeds `idx` of one phase. Finished runs are read back one at a time,
    so that a vectorized sweep can extend one that was partly run before."""
    dirs = [os.path.join(seed_dirs[i], sub) for i in idx]
    done = [j for j, d in enumerate(dirs)
            if os.path.exists(os.path.join(d, phase, "results.json"))]
    todo = [j for j in range(len(idx)) if j not in done]
    out = {}
    for g in [[j] for j in done] + ([todo] if todo else []):
      res = train.train_runs(c, [dirs[j] for j in g],
                             [seeds[idx[j]] for j in g],
                             [seed_dirs[idx[j]] for j in g] if reuse else None)
      out.update({seeds[idx[j]]: r for j, r in zip(g, res)})
    return out

  # Sequentially each seed is finished before the next; vectorized, each
  # phase of all seeds is one program.
  for idx in ([list(range(len(seeds)))] if vectorize else
              [[i] for i in range(len(seeds))]):
    train_group(apply_overrides(config, {"adv.epochs": 0}), idx, "",
                "pretrain", reuse=False)
    for name, overrides in variants.items():
      c = apply_overrides(config, overrides)
      for seed, r in train_group(c, idx, folders.get(name, name),
                                 c.adv.method, reuse=True).items():
        runs[name][seed] = {k: r[c.adv.method][k]
                            for k in METRICS + (SELECT,)}
  return runs


def summarize(runs: dict, seeds, metrics=METRICS) -> dict:
  """runs[name][seed][metric] -> rows with mean, std, % vs none, t-tests.

  Paired t-tests over seeds compare every variant with the one named
  'none' (the base model trained as long) and every cascade variant (name
  starting with 'cas') with 'global', when those are present. Per metric,
  these comparisons are one family: each test dict also gets 'p_holm', its
  Holm-adjusted p-value (`stats.holm`), and the summary lists the family
  under 'family'. `metrics` names the keys summarized (default: test
  NDCG@10 and HR@10).
  """
  rows = {name: {} for name in runs}
  family = [(name, ref) for ref in ("none", "global") if ref in runs
            for name in runs
            if name != ref and (ref == "none" or name.startswith("cas"))]
  for k in metrics:
    for name, per_seed in runs.items():
      vals = [per_seed[s][k] for s in seeds]
      row = dict(zip(("mean", "std"), stats.mean_std(vals)), values=vals)
      if "none" in runs:
        base = stats.mean_std([runs["none"][s][k] for s in seeds])[0]
        row["pct_vs_none"] = 100.0 * (row["mean"] / base - 1.0)
      rows[name][k] = row
    for name, ref in family:
      rows[name][k][f"vs_{ref}"] = stats.paired_ttest(
          rows[name][k]["values"], rows[ref][k]["values"])
    adjusted = stats.holm([rows[n][k][f"vs_{r}"]["p"] for n, r in family])
    for (name, ref), p in zip(family, adjusted):
      rows[name][k][f"vs_{ref}"]["p_holm"] = p
  return {"seeds": list(seeds), "rows": rows,
          "family": [f"{n} vs {r}" for n, r in family]}


def run_log(workdir: str, seeds, variants: dict) -> list[dict]:
  """One row per finished run, read back from its results.json.

  Args:
    variants: {name: overrides} as given to `run_variants` (the phase of a
      variant is its 'adv.method', default `name`).

  Returns:
    [{'run': 'pretrain' or a variant name, 'seed', 'selected_epoch',
      'last_epoch', 'stopped_early', 'valid/ndcg@10', 'test/ndcg@10',
      'train_s'}] in the order seed, pretrain, variants; runs without a
    results.json are left out.
  """
  keys = ("selected_epoch", "last_epoch", "stopped_early", "valid/ndcg@10",
          "test/ndcg@10", "train_s")
  rows = []
  for s in seeds:
    seed_dir = os.path.join(workdir, f"seed{s}")
    runs = [("pretrain", seed_dir, "pretrain")] + [
        (name, os.path.join(seed_dir, name), o.get("adv.method", name))
        for name, o in variants.items()]
    for name, folder, phase in runs:
      path = os.path.join(folder, "results.json")
      if not os.path.exists(path):
        continue
      with open(path) as f:
        r = json.load(f).get(phase)
      if r is not None:
        rows.append({"run": name, "seed": s, **{k: r.get(k) for k in keys}})
  return rows


def runs_markdown(rows: list[dict]) -> str:
  """The selected and the last epoch (early stop) of every run."""
  lines = ["| run | seed | selected / last epoch | valid NDCG@10 | "
           "test NDCG@10 | minutes |", "|---|---|---|---|---|---|"]
  for r in rows:
    early = " (early stop)" if r["stopped_early"] else ""
    minutes = f"{r['train_s'] / 60:.0f}" if r["train_s"] is not None else ""
    lines.append(f"| {r['run']} | {r['seed']} | {r['selected_epoch']} / "
                 f"{r['last_epoch']}{early} | {r['valid/ndcg@10']:.4f} | "
                 f"{r['test/ndcg@10']:.4f} | {minutes} |")
  return "\n".join(lines)


def format_p(test: dict | None) -> str:
  """'0.012 (0.048)': raw and Holm-adjusted p; '*' when the adjusted p is at
  most 0.05; empty without a test or a spread (one seed)."""
  if test is None or not math.isfinite(test["p"]):
    return ""
  out = f"{test['p']:.3f}"
  adj = test.get("p_holm", float("nan"))
  if math.isfinite(adj):
    out += f" ({adj:.3f}{'*' if adj <= 0.05 else ''})"
  return out


def to_markdown(summary: dict, extra=None) -> str:
  """The paper's Table 2 layout: mean ± std, % vs none, p-values.

  extra: optional (header, {variant: cell}), one more column at the right.
  """
  head = ("| variant | NDCG@10 | % vs none | p vs none | p vs global | HR@10 |"
          " % vs none |" + (f" {extra[0]} |" if extra else "")
          + "\n|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
  lines = [head]
  eps = summary.get("eps", {})
  for name, row in summary["rows"].items():
    n, h = row["test/ndcg@10"], row["test/hr@10"]
    label = name if name == "none" or name not in eps else \
        f"{name} (eps {eps[name]:g})"
    lines.append(
        f"| {label} | {n['mean']:.4f} ± {n['std']:.4f} | "
        f"{n.get('pct_vs_none', 0.0):+.1f}% | {format_p(n.get('vs_none'))} | "
        f"{format_p(n.get('vs_global'))} | {h['mean']:.4f} ± {h['std']:.4f} | "
        f"{h.get('pct_vs_none', 0.0):+.1f}% |"
        + (f" {extra[1][name]} |" if extra else ""))
  family = summary.get("family", [])
  note = (f"\n\np: two-sided paired t-test over the seeds on NDCG@10; in "
          f"parentheses Holm-adjusted over the {len(family)} comparisons of "
          f"this table, * where the adjusted p <= 0.05." if family else "")
  runs = (f"\n\nEvery run (epochs of its own phase; minutes of training "
          f"and validation on this machine, summed over the processes "
          f"that resumed it):\n\n{runs_markdown(summary['runs'])}"
          if summary.get("runs") else "")
  return ("\n".join(lines) + note + runs
          + f"\n\nseeds: {summary['seeds']}\n")


def write(workdir: str, stem: str, summary: dict, markdown=None) -> str:
  """Writes <stem>.json and <stem>.md (process 0 only); returns the table.

  markdown: the summary's formatter (default `to_markdown`).
  """
  md = (markdown or to_markdown)(summary)
  if is_chief():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, stem + ".json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, stem + ".md"), "w") as f:
      f.write(md)
  return md


def define_run_flags(config_help: str = "Config file.",
                     workdir_help: str = "Output directory.", seeds=True):
  """--config, --workdir (and --seeds): the flags every runner takes.

  Called from a runner's `define_flags`, never on import, so that the
  runner modules can be imported together.
  """
  from absl import flags
  from ml_collections import config_flags
  if config_help:
    config_flags.DEFINE_config_file("config", None, config_help,
                                    lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help, required=True)
  if seeds:
    flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
    flags.DEFINE_bool("vectorize", False,
                      "Train all seeds of a phase in one vectorized program "
                      "(jax.vmap; for accelerators).")


def run_app(main):
  """`absl.app.run(main)` for a runner that trains: a signal that stopped
  training (`checkpoints.Interrupted`) ends the process with one line and
  exit code 128 + the signal, as launch.py does, not a traceback."""
  import sys

  from absl import app

  from cat_jax import checkpoints

  def _main(argv):
    try:
      return main(argv)
    except checkpoints.Interrupted as e:
      print(f"{sys.argv[0]}: {e}", file=sys.stderr)
      sys.exit(128 + e.signum)

  app.run(_main)


def save_figure(fig, path: str):
  """Lays out, writes (PNG, 120 dpi) and closes a matplotlib figure."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def split_list(text: str, kind=str) -> list:
  """'0,1,2' -> [0, 1, 2] for comma-separated flags (empty items dropped)."""
  return [kind(x) for x in text.split(",") if x]


def pyplot():
  """matplotlib.pyplot with a file backend, or None if not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt
