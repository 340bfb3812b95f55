#!/bin/bash
# The CPU-only Video study reported in README.md ("Results"): SASRec phase 1
# for 60 epochs (seed 0), then phase 2 for 5 epochs for each
# (method, eps, scope) given, each in its own workdir, all from the same
# pretrained state. Two cores: run two of these scripts side by side with
# CORE=0 and CORE=1. Collect with scripts/collect_phase2.py.
#
#   CAT_DATA_DIR=../shared/data CORE=0 scripts/video_cpu_sweep.sh runs/video \
#       "none 1 row" "cas 0.1 row" "cas 10 batch"
set -euo pipefail
out=$1; shift
core=${CORE:-0}
run() { taskset -c "$core" python launch.py --config=configs/sasrec_video.py "$@"; }
# Phase 1 (resumes, or returns at once when done).
run --workdir="$out/pretrain_s0" --config.train.epochs=60 \
    --config.train.eval_every=10 --config.adv.epochs=0
for spec in "$@"; do
  set -- $spec
  run --workdir="$out/${1}_${3}_eps${2}" \
      --config.train.pretrain_dir="$out/pretrain_s0" \
      --config.train.epochs=60 --config.train.eval_every=1 \
      --config.adv.epochs=5 --config.adv.method="$1" --config.adv.eps="$2" \
      --config.adv.scope="$3"
done
