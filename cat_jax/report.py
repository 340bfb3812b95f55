"""The few lines a run prints when it ends: what was selected, and how good."""

from __future__ import annotations

import os

from cat_jax import checkpoints

# The phase-2 method that trains the base model on for as long as the others:
# the fair reference of every adversarial method (Tan et al., Sec. 5.3).
REFERENCE = "none"


def _fmt(value) -> str:
  """Counts as integers, metrics with 4 decimals."""
  if isinstance(value, int) or (isinstance(value, float) and
                                value.is_integer() and value > 1):
    return str(int(value))
  return f"{value:.4f}"


def metrics_line(metrics: dict) -> str:
  """'ndcg@10=0.1234 ... users=2000' for a metrics dict."""
  return " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def phases_of(results: dict) -> list:
  """Names of the trained phases in a results.json dict, phase 1 first."""
  names = [k for k, v in results.items()
           if isinstance(v, dict) and "selected_epoch" in v]
  return sorted(names, key=lambda n: n != checkpoints.PRETRAIN)


def _change(value: float, reference: float) -> str:
  if reference <= 0:
    return "n/a"
  return f"{100.0 * (value / reference - 1.0):+.1f}%"


def run_summary(results: dict, workdir: str, config) -> str:
  """A table of every phase in the workdir: selected epoch, validation and
  test NDCG@10 / HR@10, and each phase-2 method against `none`.

  Args:
    results: what `train.train_and_evaluate` returned (this run's phases).
    workdir: the run's workdir; its results.json adds the phases trained by
      earlier launches (other methods from the same phase 1).
    config: the run's config (for the selection metric and eps).

  The change column compares test NDCG@10 with `none` (the base model
  trained on for as long as the adversarial ones) when the workdir has it;
  otherwise with phase 1, and a note says that this reference was trained
  for fewer epochs.
  """
  select = config.eval.select
  path = os.path.join(workdir, "results.json")
  merged = {**(checkpoints.read_json(path) or {}), **results}
  phases = phases_of(merged)
  second = [p for p in phases if p != checkpoints.PRETRAIN]
  ref = REFERENCE if REFERENCE in merged else (
      checkpoints.PRETRAIN if checkpoints.PRETRAIN in merged else None)
  lines = [f"Summary of {path} (test read once, at the epoch selected on "
           f"validation {select}):"]
  head = (f"  {'phase':<13}{'epoch':>10}  {'valid ' + select:>14}"
          f"  {'test ndcg@10':>12}  {'test hr@10':>10}")
  if second and ref:
    head += f"  {'vs ' + ref:>12}"
  lines.append(head)
  for p in phases:
    r = merged[p]
    last = r.get("last_epoch")
    epoch = f"{r['selected_epoch']}" + (f"/{last}" if last else "")
    if r.get("stopped_early"):
      epoch += "*"
    row = (f"  {p:<13}{epoch:>10}  {r[f'valid/{select}']:>14.4f}"
           f"  {r['test/ndcg@10']:>12.4f}  {r['test/hr@10']:>10.4f}")
    if second and ref and p != ref and p != checkpoints.PRETRAIN:
      row += f"  {_change(r['test/ndcg@10'], merged[ref]['test/ndcg@10']):>12}"
    lines.append(row)
  lines.append("  (epoch: selected/last trained; * stopped early)")
  if second and ref == checkpoints.PRETRAIN:
    lines.append(
        "  Note: phase 1 was trained for fewer epochs than the phase-2 "
        "models, so the change includes training longer. Add `none` to "
        "adv.method (e.g. --config.adv.method=none,cas) for the fair "
        "comparison.")
  pre = merged.get(checkpoints.PRETRAIN)
  for p in second:
    adv = merged[p]
    if pre is None or p == REFERENCE:
      continue
    if adv[f"valid/{select}"] < pre[f"valid/{select}"]:
      lines.append(
          f"  Phase 2 ({p}, adv.eps={config.adv.eps:g}) ends below "
          f"phase 1 on validation {select} ({adv[f'valid/{select}']:.4f} < "
          f"{pre[f'valid/{select}']:.4f}): the perturbation is probably too "
          "large for this model. Choose eps on validation with "
          "`python -m cat_jax.experiments.eps_sweep` (docs/experiments.md).")
  return "\n".join(lines)
