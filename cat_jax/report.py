"""The few lines a run prints when it ends: what was selected, and how good."""

from __future__ import annotations

import os

from cat_jax import checkpoints


def _fmt(value) -> str:
  """Counts as integers, metrics with 4 decimals."""
  if isinstance(value, int) or (isinstance(value, float) and
                                value.is_integer() and value > 1):
    return str(int(value))
  return f"{value:.4f}"


def metrics_line(metrics: dict) -> str:
  """'ndcg@10=0.1234 ... users=2000' for a metrics dict."""
  return " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def run_summary(results: dict, workdir: str, config) -> str:
  """Each phase's selected epoch, validation and test NDCG@10 / HR@10, and
  phase 2 against phase 1.

  Args:
    results: what `train.train_and_evaluate` returned.
    workdir: the run's workdir (results.json is there).
    config: the run's config (for the phase-2 method and eps).
  """
  select = config.eval.select
  phases = [p for p in (checkpoints.PRETRAIN, config.adv.method)
            if p in results]
  lines = [f"Summary ({os.path.join(workdir, 'results.json')}):"]
  for p in phases:
    r = results[p]
    last = r.get("last_epoch")
    stop = " (stopped early)" if r.get("stopped_early") else ""
    lines.append(
        f"  {p:<9} selected epoch {r['selected_epoch']}"
        f"{f' of {last}' if last else ''}{stop}: valid {select} "
        f"{r[f'valid/{select}']:.4f}; test ndcg@10 {r['test/ndcg@10']:.4f}, "
        f"hr@10 {r['test/hr@10']:.4f}")
  if len(phases) == 2:
    pre, adv = (results[p] for p in phases)
    change = 100.0 * (adv["test/ndcg@10"] / pre["test/ndcg@10"] - 1.0) \
        if pre["test/ndcg@10"] > 0 else float("nan")
    lines.append(f"  {phases[1]} vs pretrain: test ndcg@10 {change:+.1f}%")
    if adv[f"valid/{select}"] < pre[f"valid/{select}"]:
      lines.append(
          f"  Phase 2 ({phases[1]}, adv.eps={config.adv.eps:g}) ends below "
          f"phase 1 on validation {select} ({adv[f'valid/{select}']:.4f} < "
          f"{pre[f'valid/{select}']:.4f}): the perturbation is probably too "
          "large for this model. Choose eps on validation with "
          "`python -m cat_jax.experiments.eps_sweep` (README, Experiments).")
  return "\n".join(lines)
