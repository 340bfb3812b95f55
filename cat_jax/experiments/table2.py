"""Paper Table 2 for one (data set, model): methods x seeds, test NDCG/HR@10.

  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video --seeds=0,1,2 \
      --methods=none,linear,seq,global,cas
  # Each method at its own eps (e.g. chosen on validation by eps_sweep):
  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video --eps=linear=0.1,seq=1,cas=0.1
  # On an accelerator, train the seeds of each phase together (jax.vmap):
  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video --vectorize
  # The cascade ablation (Sec. 5.5):
  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/ablation_sasrec_video --methods=global,cas,cas_temporal,cas_cross

Each seed pretrains once (<workdir>/seed<k>/pretrain) and every method
continues from it (<workdir>/seed<k>/<method>). Writes <workdir>/table2.json
and table2.md: mean and std over seeds, % vs `none` (the base model trained
as long), and paired t-tests over seeds of every method against `none` and
of the cascade methods (cas, cas_temporal, cas_cross) against `global`, with
Holm-adjusted p-values over those comparisons (one family per metric);
then every run's selected and last epoch (early stopping) and its time.
"""

from __future__ import annotations

from absl import app, flags, logging

from cat_jax import writer
from cat_jax.experiments import common


def run_table(config, workdir: str, seeds, methods, eps=None,
              vectorize: bool = False) -> dict:
  """Trains every (seed, method) and returns the summary dict.

  Args:
    eps: optional {method: eps}; methods not in it use config.adv.eps.
  """
  eps = eps or {}
  unknown = sorted(set(eps) - set(methods))
  if unknown:
    raise ValueError(f"--eps names methods that are not run: {unknown}.")
  variants = {m: {"adv.method": m, "adv.eps": eps.get(m, config.adv.eps)}
              for m in methods}
  summary = common.summarize(
      common.run_variants(config, workdir, seeds, variants, vectorize), seeds)
  summary["eps"] = {m: v["adv.eps"] for m, v in variants.items()}
  summary["runs"] = common.run_log(workdir, seeds, variants)
  return summary


def parse_eps(text: str) -> dict:
  """'linear=0.1,cas=1' -> {'linear': 0.1, 'cas': 1.0}."""
  out = {}
  for item in common.split_list(text):
    method, eq, value = item.partition("=")
    try:
      out[method] = float(value)
    except ValueError:
      raise ValueError(f"--eps item {item!r} is not method=number.") from None
    if not eq:
      raise ValueError(f"--eps item {item!r} is not method=number.")
  return out


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  methods = common.split_list(F.methods)
  try:
    eps = parse_eps(F.eps)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if set(eps) - set(methods):
    logging.warning("--eps names methods not in --methods (ignored): %s",
                    sorted(set(eps) - set(methods)))
    eps = {m: e for m, e in eps.items() if m in methods}
  try:
    summary = run_table(F.config, F.workdir, common.split_list(F.seeds, int),
                        methods, eps, F.vectorize)
  except ValueError as e:
    # e.g. checkpoints.WorkdirMismatch: a method's folder trained at another
    # eps; the message names the folder and the ways out.
    raise app.UsageError(str(e)) from None
  md = common.write(F.workdir, "table2", summary)
  logging.info("\n%s", md)
  print(md)


def define_flags():
  common.define_run_flags()
  flags.DEFINE_string("methods", "none,linear,seq,global,cas",
                      "Comma-separated adv.method values.")
  flags.DEFINE_string("eps", "", "Per-method eps, 'linear=0.1,cas=1'; "
                      "the others use config.adv.eps.")


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
