"""Paper Fig. 4: test NDCG/HR@10 of adversarial methods across eps.

  python -m cat_jax.experiments.eps_sweep --config=configs/sasrec_video.py \
      --workdir=runs/eps_sasrec_video --method=cas,global \
      --eps=0.1,1,5,10,20,30,50 --seeds=0,1,2

Pretrains each seed once, then trains `none` (the base model trained as
long, in seed<k>/none_sweep: table2's `none` in the same workdir has the
table's budget) and each method at every eps from it. Writes
<workdir>/eps_sweep.json, eps_sweep.md and, with matplotlib, eps_sweep.png
(one line per method).
Runs that finished before are read back, so a sweep can be extended by
calling it again with more eps or methods.

The report gives each variant's validation NDCG@10 beside the test
metrics, and the eps of each method chosen on validation alone (highest
mean validation NDCG@10 over the seeds; on a tie the smaller eps), as the
`--eps` value of `cat_jax.experiments.table2`. `chosen_on_disk` makes the
same choice over every finished sweep run of a workdir, whichever calls
trained them (`scripts/cpu_paper.sh SETTING chosen`).
"""

from __future__ import annotations

import json
import os
import re

from absl import app, flags, logging

from cat_jax import stats, writer
from cat_jax.experiments import common


def as_methods(methods) -> list:
  """'cas' or ['cas', 'global'] -> a list without repeats; 'none' has no
  eps to sweep."""
  methods = [methods] if isinstance(methods, str) else list(methods)
  methods = list(dict.fromkeys(methods))
  if not methods or "none" in methods:
    raise ValueError("--method needs one or more adversarial methods (e.g. "
                     "cas,global); `none` is always run as the reference.")
  return methods


def variant_name(method: str, eps: float, scope: str = "row") -> str:
  """'cas_eps0.1', or 'cas_eps10_batch' for adv.scope=batch."""
  return f"{method}_eps{eps:g}" + ("" if scope == "row" else f"_{scope}")


# The folder of the sweep's reference run `none` (adv.epochs of the sweep).
# Not `none`: that is table2's, trained with the table's phase-2 budget and
# evaluation cadence; sharing it made the later call continue (table2) or
# refuse (sweep) the earlier one's run.
REFERENCE_FOLDER = "none_sweep"


def variants(methods, eps_values, scope: str = "row") -> dict:
  """{'none': ..., '<method>_eps<e>[_<scope>]': overrides} for every method
  and eps (the scope is part of the name unless it is 'row')."""
  out = {"none": {"adv.method": "none"}}
  for m in as_methods(methods):
    for e in eps_values:
      out[variant_name(m, e, scope)] = {"adv.method": m, "adv.eps": float(e)}
  return out


def run_sweep(config, workdir: str, seeds, methods, eps_values,
              vectorize: bool = False) -> dict:
  """Trains (or reads back) every variant; the summary of `common`."""
  methods = as_methods(methods)
  runs = common.run_variants(config, workdir, seeds,
                             variants(methods, eps_values, config.adv.scope),
                             vectorize, folders={"none": REFERENCE_FOLDER})
  summary = common.summarize(runs, seeds)
  summary["eps"] = [float(e) for e in eps_values]
  summary["methods"] = methods
  summary["scope"] = config.adv.scope
  summary["valid"] = {name: stats.mean_std([per_seed[s][common.SELECT]
                                            for s in seeds])[0]
                      for name, per_seed in runs.items()}
  summary["chosen"] = choose_eps(summary["valid"], methods,
                                 summary["eps"], summary["scope"])
  return summary


def choose_eps(valid: dict, methods, eps_values, scope: str = "row") -> dict:
  """{method: eps with the highest validation value}; ties go to the
  smaller eps (the weaker perturbation).

  Args:
    valid: {variant name: mean validation NDCG@10} (`variant_name`).
  """
  out = {}
  for m in methods:
    tried = [e for e in sorted(eps_values) if variant_name(m, e, scope) in valid]
    if tried:
      out[m] = max(tried, key=lambda e: (valid[variant_name(m, e, scope)], -e))
  return out


def chosen_on_disk(workdir: str, seeds=(0,), scope: str = "row") -> dict:
  """`choose_eps` over every finished sweep run in <workdir>/seed<k>/.

  Several sweep calls (a method subset per core, an extended grid) each
  write eps_sweep.json with their own runs only; this reads all of them
  back: a variant counts when every seed has its results.json.

  Returns:
    {method: eps} (methods in name order).
  """
  pattern = re.compile(r"^(?P<m>[a-z_]+?)_eps(?P<e>[0-9.e+-]+)"
                       + ("" if scope == "row" else f"_{scope}") + "$")
  valid, eps = {}, {}
  for name in sorted(os.listdir(os.path.join(workdir, f"seed{seeds[0]}"))):
    hit = pattern.match(name)
    if not hit:
      continue
    vals = []
    for s in seeds:
      path = os.path.join(workdir, f"seed{s}", name, "results.json")
      if not os.path.exists(path):
        break
      with open(path) as f:
        r = json.load(f).get(hit["m"])
      if r is None:
        break
      vals.append(r[common.SELECT])
    else:
      valid[name] = sum(vals) / len(vals)
      eps.setdefault(hit["m"], set()).add(float(hit["e"]))
  # choose_eps skips the (method, eps) pairs that have no finished run.
  return choose_eps(valid, sorted(eps), sorted(set().union(*eps.values())),
                    scope) if eps else {}


def to_markdown(summary: dict) -> str:
  """`common.to_markdown` with a validation column, and the chosen eps."""
  valid = {name: f"{v:.4f}" for name, v in summary["valid"].items()}
  chosen = ",".join(f"{m}={e:g}" for m, e in summary["chosen"].items())
  return (common.to_markdown(summary, ("valid NDCG@10", valid))
          + f"Chosen on validation NDCG@10 (scope {summary['scope']}): "
          f"`--eps={chosen}`\n")


def plot(summary: dict, path: str) -> bool:
  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed; skipping %s", path)
    return False
  rows, eps = summary["rows"], summary["eps"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
  for ax, k in zip(axes, common.METRICS):
    for m in summary["methods"]:
      ys = [rows[variant_name(m, e, summary.get("scope", "row"))][k]
            for e in eps]
      ax.errorbar(eps, [y["mean"] for y in ys], [y["std"] for y in ys],
                  marker="o", capsize=2, label=m)
    ax.axhline(rows["none"][k]["mean"], color="gray", ls="--", label="none")
    ax.set_xscale("log")
    ax.set_xlabel("eps")
    ax.set_ylabel(k)
    ax.legend()
  common.save_figure(fig, path)
  return True


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  try:
    methods = as_methods(common.split_list(F.method))
    # A workdir mismatch (checkpoints.WorkdirMismatch, e.g. a variant run
    # before with other settings) is a ValueError.
    summary = run_sweep(F.config, F.workdir, common.split_list(F.seeds, int),
                        methods, common.split_list(F.eps, float),
                        F.vectorize)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  stem = "eps_sweep" + ("" if summary["scope"] == "row" else
                        f"_{summary['scope']}")
  md = common.write(F.workdir, stem, summary, to_markdown)
  plot(summary, os.path.join(F.workdir, stem + ".png"))
  print(md)


def define_flags():
  common.define_run_flags()
  flags.DEFINE_string("method", "cas",
                      "adv.method to sweep, or a comma-separated list of "
                      "them (e.g. cas,global): one line each in the figure.")
  flags.DEFINE_string("eps", "0.1,1,5,10,20,30,50", "Comma-separated eps.")


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
