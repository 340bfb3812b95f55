"""Paper Fig. 3: validation learning curves across both training phases.

  python -m cat_jax.experiments.curves --workdir=runs/table2_sasrec_video/seed0 \
      --variants=none,linear,seq,global,cas

Reads the `metrics.jsonl` of a seed folder laid out by the runners (phase 1 in
<workdir>, each phase-2 variant in <workdir>/<variant>) and writes
<workdir>/curves.json (epochs counted from the start of phase 1) and, with
matplotlib, curves.png.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from cat_jax.experiments import common


def read_curve(path: str, metric: str) -> list:
  """[(phase, epoch, value)] of the evaluation lines of one metrics.jsonl."""
  out = []
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if metric in rec:
        out.append((rec["phase"], rec["epoch"], rec[metric]))
  return out


def curves(workdir: str, variants, metric: str = "valid/ndcg@10") -> dict:
  """{name: [[epoch, value], ...]}, phase 2 shifted past phase 1's epochs."""
  pre = [(e, v) for p, e, v in read_curve(
      os.path.join(workdir, "metrics.jsonl"), metric) if p == "pretrain"]
  if not pre:
    raise FileNotFoundError(f"no phase-1 evaluations in {workdir}/metrics.jsonl")
  # A resumed run logs some epochs twice; keep the last value of each.
  pre = sorted(dict(pre).items())
  offset = pre[-1][0]
  out = {"pretrain": [list(x) for x in pre]}
  for name in variants:
    pts = [(offset + e, v) for p, e, v in read_curve(
        os.path.join(workdir, name, "metrics.jsonl"), metric)
           if p != "pretrain"]
    out[name] = [list(x) for x in sorted(dict(pts).items())]
  return {"metric": metric, "phase1_epochs": offset, "curves": out}


def plot(result: dict, path: str) -> bool:
  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed; skipping %s", path)
    return False
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, pts in result["curves"].items():
    if pts:
      ax.plot(*zip(*pts), marker=".", label=name)
  ax.axvline(result["phase1_epochs"], color="gray", ls=":")
  ax.set_xlabel("epoch")
  ax.set_ylabel(result["metric"])
  ax.legend()
  common.save_figure(fig, path)
  return True


def main(argv):
  del argv
  F = flags.FLAGS
  result = curves(F.workdir, common.split_list(F.variants), F.metric)
  with open(os.path.join(F.workdir, "curves.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(F.workdir, "curves.png"))
  for name, pts in result["curves"].items():
    print(name, " ".join(f"{e}:{v:.4f}" for e, v in pts))


def define_flags():
  """Command-line flags (not defined on import: runners import together)."""
  common.define_run_flags(None, "A seed folder of a runner.", seeds=False)
  flags.DEFINE_string("variants", "none,linear,seq,global,cas",
                      "Phase-2 variants (subfolders) to include.")
  flags.DEFINE_string("metric", "valid/ndcg@10", "metrics.jsonl field.")


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
