"""Paper Fig. 4: test NDCG/HR@10 of one method across perturbation sizes.

  python -m cat_jax.experiments.eps_sweep --config=configs/sasrec_video.py \
      --workdir=runs/eps_sasrec_video --method=cas \
      --eps=0.1,1,5,10,20,30,50 --seeds=0,1,2

Pretrains each seed once, then trains `none` (the base model trained as
long) and the method at every eps from it. Writes <workdir>/eps_sweep.json,
eps_sweep.md and, with matplotlib, eps_sweep.png.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from cat_jax import writer
from cat_jax.experiments import common


def variants(method: str, eps_values) -> dict:
  out = {"none": {"adv.method": "none"}}
  for e in eps_values:
    out[f"{method}_eps{e:g}"] = {"adv.method": method, "adv.eps": float(e)}
  return out


def run_sweep(config, workdir: str, seeds, method: str, eps_values,
              vectorize: bool = False) -> dict:
  runs = common.run_variants(config, workdir, seeds,
                             variants(method, eps_values), vectorize)
  summary = common.summarize(runs, seeds)
  summary["eps"] = [float(e) for e in eps_values]
  summary["method"] = method
  return summary


def plot(summary: dict, path: str) -> bool:
  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed; skipping %s", path)
    return False
  rows, eps = summary["rows"], summary["eps"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
  for ax, k in zip(axes, common.METRICS):
    ys = [rows[f"{summary['method']}_eps{e:g}"][k] for e in eps]
    ax.errorbar(eps, [y["mean"] for y in ys], [y["std"] for y in ys],
                marker="o", label=summary["method"])
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
  summary = run_sweep(F.config, F.workdir, common.split_list(F.seeds, int),
                      F.method, common.split_list(F.eps, float), F.vectorize)
  md = common.write(F.workdir, "eps_sweep", summary)
  plot(summary, os.path.join(F.workdir, "eps_sweep.png"))
  print(md)


def define_flags():
  common.define_run_flags()
  flags.DEFINE_string("method", "cas", "adv.method to sweep.")
  flags.DEFINE_string("eps", "0.1,1,5,10,20,30,50", "Comma-separated eps.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
