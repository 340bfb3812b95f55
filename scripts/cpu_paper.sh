#!/bin/bash
# The paper-budget experiments on a CPU, one stage at a time (issues 12, 16).
#
#   CAT_DATA_DIR=../shared/data scripts/cpu_paper.sh SETTING STAGE [ARG]
#
# SETTING: sasrec_video | gru4rec_video | sasrec_beauty | gru4rec_beauty |
#          sasrec_clothing | gru4rec_clothing (configs/SETTING.py; the
#          model is the part before the last '_')
# STAGE:
#   pretrain SEEDS     phase 1 of each seed: 500 epochs, validation every
#                      5, the best NDCG@10 kept (seed<k>/pretrain); SASRec
#                      stops early after 10 evaluations (50 epochs) without
#                      a better one, GRU4Rec trains all 500 as the paper
#                      (it climbs again after long plateaus; RESULTS.md)
#   grid               eps on seed 0's validation: linear, seq, global, cas
#                      at the model's row-scope grid; 10 phase-2 epochs
#   grid_batch         global and cas at scope 'batch', eps 1, 3, 10, 30
#                      (both grids: METHODS=global,cas runs a subset, so
#                      that two cores can share a grid once seed 0's
#                      pretraining and its `none` run exist; EPS=0.5,1
#                      extends a grid whose best value is at its edge)
#   table EPS [SEEDS]  Table 2: none, linear, seq, global, cas (+ cascade
#                      ablation) at EPS ('linear=0.1,seq=0.1,...'), phase 2
#                      up to 100 epochs, early stop after 4 evaluations (20
#                      epochs) without improvement (METHODS=none,global,cas
#                      runs a subset first; a later full call reuses them)
#   robustness PHASES SEED   Fig. 5/6, minimal attack, of trained phases
#                      ('pretrain,none/none,cas/cas'); ANCHOR=window
#                      attacks the fixed window slots 0 and (T-1)//2 as
#                      first/middle (robustness_minimal_window.json)
#   robustness_report [SEEDS]   Fig. 5/6 over seeds (mean ± std, paired
#                      t-tests) of the robustness results of every seed
#   chosen             prints the eps chosen on validation by every finished
#                      row-scope `grid` run of seed 0 (all calls, subsets and
#                      extensions together) as the EPS of `table` (the
#                      ablation takes cas's eps)
#   summary            (SETTING: all) every setting's table2.json and
#                      robustness_minimal.json next to the paper's Table 2
#                      and Fig. 5, with the claim checks
#                      ($RUNS/paper_summary.md; cat_jax.experiments.paper_summary);
#                      a setting without reports in $RUNS is read from
#                      RESULTS.md's final tables (RECORDED, default
#                      docs/results/final.json; RECORDED= turns it off)
# Runs go to $RUNS/paper_<setting> (default RUNS=runs), compiled programs to
# $RUNS/jax_cache (JAX_COMPILATION_CACHE_DIR overrides); every stage resumes
# from checkpoints and reads finished runs back, so a stage can be run again
# to complete or extend it. Pin it to a core with `taskset -c N`.
# VECTORIZE=1 trains the seeds of a phase together (table; for a GPU, see
# scripts/gpu_session.sh). LAYOUT=packed: packed rows instead of buckets.
set -euo pipefail
setting=${1:?setting}; stage=${2:?stage}; arg=${3:-}; arg2=${4:-}
model=${setting%_*}
runs=${RUNS:-runs}
w=$runs/paper_$setting
# XLA programs compiled once are reused by every later run of the same shape
# (the other seeds, methods of the same graph, every stage): on one core a
# `cas` run's first epoch drops from ~90 s to ~30 s; results are identical.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$runs/jax_cache}
cfg=configs/$setting.py
# Phase 1 (shared by every stage: all stages must pass the same values).
# GRU4Rec Beauty stopped at epoch 125 with patience 10, then gained 19% of
# test NDCG@10 when trained to the paper's 500 (RESULTS.md): no early stop.
if [ "$model" = sasrec ]; then patience=10; else patience=0; fi
# Length buckets, as every result in RESULTS.md was trained (the SASRec
# configs default to packed rows since; pinned here so that these numbers
# reproduce and the runs of a study resume into the same layout).
# LAYOUT=packed trains packed rows instead (RESULTS.md, "Packed rows").
base=(--config.train.epochs=500 --config.train.eval_every=5
      --config.train.patience=$patience --config.train.buckets=4
      --config.train.layout=${LAYOUT:-buckets}
      --config.eval.buckets=4 --config.adv.init=best)
if [ "$model" = sasrec ]; then grid=0.02,0.05,0.1,0.2; else grid=0.3,0.5,1,2; fi
case $stage in
  summary)
    python -m cat_jax.experiments.paper_summary --runs=$runs \
        --recorded=${RECORDED-docs/results/final.json} ;;
  pretrain)
    IFS=, read -ra seeds <<< "${arg:-0,1,2}"
    for s in "${seeds[@]}"; do
      python launch.py --config=$cfg:seed=$s --workdir=$w/seed$s \
          --config.adv.epochs=0 "${base[@]}"
    done ;;
  grid)
    python -m cat_jax.experiments.eps_sweep --config=$cfg --workdir=$w \
        --seeds=0 --method=${METHODS:-linear,seq,global,cas} --eps=${EPS:-$grid} \
        --config.adv.epochs=10 --config.adv.eval_every=2 "${base[@]}" ;;
  grid_batch)
    python -m cat_jax.experiments.eps_sweep --config=$cfg --workdir=$w \
        --seeds=0 --method=${METHODS:-global,cas} --eps=${EPS:-1,3,10,30} \
        --config.adv.scope=batch --config.adv.epochs=10 \
        --config.adv.eval_every=2 "${base[@]}" ;;
  table)
    python -m cat_jax.experiments.table2 --config=$cfg --workdir=$w \
        --seeds=${arg2:-0,1,2} --eps=${arg:?eps per method} ${VECTORIZE:+--vectorize} \
        --methods=${METHODS:-none,linear,seq,global,cas,cas_temporal,cas_cross} \
        --config.adv.epochs=100 --config.adv.eval_every=5 \
        --config.adv.patience=4 "${base[@]}" ;;
  robustness)
    python -m cat_jax.experiments.robustness --config=$cfg \
        --workdir=$w/seed${arg2:-0} --phases=${arg:?phases} --mode=minimal \
        --anchor=${ANCHOR:-items} "${base[@]}" ;;
  robustness_report)
    python -m cat_jax.experiments.robustness_report --workdir=$w \
        --seeds=${arg:-0,1,2} --mode=minimal --anchor=${ANCHOR:-items} ;;
  chosen)
    python - "$w" <<'PY'
import sys
from cat_jax.experiments import eps_sweep
try:
  chosen = eps_sweep.chosen_on_disk(sys.argv[1])
except FileNotFoundError:
  chosen = {}
if not chosen:
  sys.exit(f"{sys.argv[1]}/seed0: no finished eps grid run; run the `grid` "
           "stage first.")
chosen.update({m: chosen["cas"] for m in ("cas_temporal", "cas_cross")
               if "cas" in chosen})
print(",".join(f"{m}={e:g}" for m, e in chosen.items()))
PY
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
