#!/bin/bash
# The GPU measurements as short device calls. Each writes a few small files
# to $OUT: the device tool returns at most 8 files, no deeper than 2
# folders, so run results come back as one archive ($OUT/runs.tar.gz of
# every .json/.jsonl/.md/.png of the runs; checkpoints stay on the device).
#
# Prepare here (this machine), once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       ml_collections==1.1.0                 # .whl/, .data/, .runs/ are ignored
#   mkdir -p .data && cp ../shared/data/Video.txt ../shared/data/Beauty.txt \
#       ../shared/data/Clothing.txt .data/
# Optionally carry finished phase-1 runs so that table2 continues from the
# same pretrained models as the CPU runs (about 25 MB per seed, so two
# seeds per call: the carry limit is 64 MiB in all; Clothing's item table
# is twice Video's, so one seed per call):
#   scripts/gpu_session.sh pack_pretrain RUNS/paper_SETTING SEEDS   # -> .runs/
# SETTING is one of scripts/cpu_paper.sh's: sasrec_video, gru4rec_video,
# sasrec_beauty, gru4rec_beauty, sasrec_clothing, gru4rec_clothing.
# Then, through the device tool, with carry [".whl", ".data"] (+ ".runs"):
#   bash scripts/gpu_session.sh bench       # ~7 min: benchmarks/RESULTS.md input
#   bash scripts/gpu_session.sh table2 SETTING EPS [SEEDS]
#        # the paper-budget Table 2 + ablation of one setting, seeds (default
#        # 0,1,2) trained together (scripts/cpu_paper.sh table with
#        # VECTORIZE=1); EPS as in RESULTS.md's status table;
#        # METHODS=none,global,cas for a subset. Only JSON comes back, and a
#        # run is read back only with its checkpoints, so a device table is
#        # its own table: it does not fill cells of the CPU runs.
#   bash scripts/gpu_session.sh setting SETTING
#        # one setting end to end: seed 0's phase 1 and eps grid, the eps
#        # chosen on validation, Table 2 + ablation (seeds vectorized), Fig.
#        # 5/6 of none/global/cas for each seed and their 3-seed report
#   bash scripts/gpu_session.sh bf16        # ~5 min: bf16 vs fp32 NDCG@10
#   bash scripts/gpu_session.sh compile     # ~8 min (issue 33): the short
#        # Video SASRec run (2 + 1 cas epochs, validation every epoch) from
#        # an empty compilation cache and again warm, the same with
#        # train.layout=buckets, then one whole 500 + 100 cas run (paper
#        # defaults, warm cache); seconds to the first epoch and in all in
#        # $OUT/compile.txt
# table2/setting/bf16 stop their training at BUDGET_S seconds (default 480)
# so that the archive is always written; give the device call a timeout_s
# about 60 s longer. Measured on an H200 (benchmarks/RESULTS.md): Video
# SASRec trains at 0.16 s per epoch, but every training or evaluation
# program compiles for 15-60 s, so a phase-2 method costs about a minute
# before its first epoch; a 15-minute session fits `bench` or one setting's
# Table 2 for a few methods, not both.
set -uo pipefail
usage="usage: gpu_session.sh bench | table2 SETTING EPS [SEEDS] | setting SETTING | bf16 | compile | pack_pretrain DIR SEEDS"
mode=${1:?$usage}; shift
case $mode in
  bench|table2|setting|bf16|compile|pack_pretrain) ;;
  *) echo "unknown mode '$mode'; $usage" >&2; exit 2 ;;
esac
if [ "$mode" = pack_pretrain ]; then  # runs here, not on the device
  src=${1:?a paper_<setting> folder, e.g. runs/paper_gru4rec_video}
  IFS=, read -ra seeds <<< "${2:?seeds, e.g. 1,2}"
  dst=.runs/$(basename "$src")
  for s in "${seeds[@]}"; do
    d=$src/seed$s
    [ -f "$d/pretrain/results.json" ] || {
      echo "$d/pretrain has no results.json: phase 1 of seed $s is not finished" >&2
      exit 1; }
    mkdir -p "$dst/seed$s/pretrain"
    # The seed folder's own files and its whole phase 1: a phase is finished
    # when its `latest` checkpoint is at the last epoch (phase.py), and
    # phase 2 starts from `best`.
    find "$d" -maxdepth 1 -type f -exec cp {} "$dst/seed$s/" \;
    cp -r "$d/pretrain/." "$dst/seed$s/pretrain/"
  done
  du -sh .runs
  exit 0
fi
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CAT_DATA_DIR=$PWD/.data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache  # reruns on a warm machine
work=/tmp/cat_runs
mkdir -p "$work"
if [ -d .runs ]; then cp -r .runs/. "$work/"; fi
budget=${BUDGET_S:-480}
keep() {  # the small result files of the workdir tree, as one archive
  (cd "$work" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
      -o -name '*.png' \) -print0 | tar -czf "$OUT/runs.tar.gz" --null -T -) ;}
case $mode in
  bench)
    # Sized from the first H200 session (2026-11-29, benchmarks/RESULTS.md),
    # which measured ML-1M and Video SASRec: each piece has its own limit, so
    # a slow one cannot take the others' time (~7 min in all).
    b="timeout 200 python3 benchmarks/bench.py"
    { $b --shapes=video --buckets=4 --packed --models=gru4rec \
          --what=epoch_base,epoch_cas,epoch_runs,eval
      $b --shapes=ml1m --models=sasrec,gru4rec --what=protocol --repeats=1
      $b --shapes=video --models=sasrec --what=cascade_100m --repeats=3
    } > "$OUT/bench.jsonl" 2> "$OUT/bench.err"
    ;;
  table2)
    setting=${1:?setting, e.g. sasrec_video}; eps=${2:?eps per method}
    RUNS=$work VECTORIZE=1 timeout "$budget" bash scripts/cpu_paper.sh \
        "$setting" table "$eps" "${3:-0,1,2}" > "$OUT/table2_$setting.log" 2>&1
    keep
    ;;
  setting)
    setting=${1:?setting, e.g. gru4rec_beauty}
    export RUNS=$work
    timeout "$budget" bash -c '
    p="bash scripts/cpu_paper.sh"; setting=$1
    $p "$setting" grid > "$OUT/grid_$setting.log" 2>&1
    if eps=$($p "$setting" chosen 2>> "$OUT/grid_$setting.log"); then
      VECTORIZE=1 $p "$setting" table "$eps" > "$OUT/table2_$setting.log" 2>&1
      for s in 0 1 2; do
        $p "$setting" robustness pretrain,none/none,global/global,cas/cas $s
      done > "$OUT/robustness_$setting.log" 2>&1
      $p "$setting" robustness_report 0,1,2 >> "$OUT/robustness_$setting.log" 2>&1
    fi' _ "$setting"
    keep
    ;;
  compile)
    cache=/tmp/cat_compile_cache; rm -rf "$cache"
    timed() {  # NAME ARGS...: wall seconds, and when the first epoch ended
      local name=$1; shift
      local t0; t0=$(date +%s.%N)
      timeout "$budget" python3 launch.py --config=configs/sasrec_video.py \
          --config.compilation_cache=${CACHE:-$cache} --workdir=$work/$name "$@" \
          > "$OUT/$name.log" 2>&1
      echo "$name rc=$? wall_s=$(echo "$(date +%s.%N) - $t0" | bc)" \
          "first_epoch_line=$(grep -m1 -o 'epoch 1/[0-9]*.*' "$OUT/$name.log" | head -c 120)" \
          >> "$OUT/compile.txt"
    }
    short=(--config.train.epochs=2 --config.train.eval_every=1
           --config.adv.epochs=1 --config.adv.eval_every=1)
    timed short_cold "${short[@]}"
    timed short_warm "${short[@]}"
    # The config's packed rows against length buckets (the layout before
    # issue 33), from its own empty cache.
    rm -rf "$cache.buckets"
    CACHE=$cache.buckets timed short_cold_buckets "${short[@]}" --config.train.layout=buckets
    CACHE=$cache.buckets timed short_warm_buckets "${short[@]}" --config.train.layout=buckets
    timed full_500_100 --config.adv.method=cas
    keep
    ;;
  bf16)
    # 100 epochs by default (override with --config.train.epochs=...): each
    # dtype compiles for about a minute first.
    for dtype in float32 bfloat16; do
      timeout $((budget / 2)) python3 launch.py --config=configs/sasrec_video.py \
          --workdir=$work/precision_$dtype --config.adv.epochs=0 \
          --config.model.dtype=$dtype --config.train.matmul_precision=float32 \
          --config.train.epochs=100 --config.train.eval_every=20 "$@" > "$OUT/precision_$dtype.log" 2>&1
    done
    keep
    ;;
esac
