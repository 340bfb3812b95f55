"""Paper Table 2 for one (data set, model): methods x seeds, test NDCG/HR@10.

  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video --seeds=0,1,2 \
      --methods=none,linear,seq,global,cas
  # The cascade ablation (Sec. 5.5):
  python -m cat_jax.experiments.table2 --config=configs/sasrec_video.py \
      --workdir=runs/ablation_sasrec_video --methods=global,cas,cas_temporal,cas_cross

Each seed pretrains once (<workdir>/seed<k>/pretrain) and every method
continues from it (<workdir>/seed<k>/<method>). Writes <workdir>/table2.json
and table2.md: mean and std over seeds, % vs `none` (the base model trained
as long), and paired t-tests over seeds against `none` and `global`.
"""

from __future__ import annotations

from absl import app, flags, logging

from cat_jax import writer
from cat_jax.experiments import common


def run_table(config, workdir: str, seeds, methods) -> dict:
  """Trains every (seed, method) and returns the summary dict."""
  runs = common.run_variants(config, workdir, seeds,
                             {m: {"adv.method": m} for m in methods})
  return common.summarize(runs, seeds)


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  md = common.write(F.workdir, "table2", run_table(
      F.config, F.workdir, common.split_list(F.seeds, int),
      common.split_list(F.methods)))
  logging.info("\n%s", md)
  print(md)


def define_flags():
  common.define_run_flags()
  flags.DEFINE_string("methods", "none,linear,seq,global,cas",
                      "Comma-separated adv.method values.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
