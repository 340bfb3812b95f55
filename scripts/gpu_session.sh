#!/bin/bash
# The GPU measurements as short device calls; each writes only small
# JSON/Markdown files to $OUT (checkpoints stay in /tmp there).
#
# Prepare here (this machine), once:
#   echo /.whl/ >> .git/info/exclude      # .data/ is already git-ignored
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       ml_collections==1.1.0
#   mkdir -p .data && cp ../shared/data/Video.txt ../shared/data/Beauty.txt .data/
# Then, through the device tool, with carry [".whl", ".data"]:
#   bash scripts/gpu_session.sh bench       # ~4 min: benchmarks/RESULTS.md input
#   bash scripts/gpu_session.sh table2 sasrec_video EPS
#        # the paper-budget Table 2 + ablation of one setting, 3 seeds trained
#        # together (scripts/cpu_paper.sh table with VECTORIZE=1); EPS as in
#        # RESULTS.md's status table, e.g. linear=0.1,seq=0.1,global=0.1,...
#   bash scripts/gpu_session.sh setting gru4rec_beauty
#        # one setting end to end: seed 0's phase 1 and eps grid, the eps
#        # chosen on validation, Table 2 + ablation (seeds vectorized), Fig.
#        # 5/6 of none/global/cas for each seed and their 3-seed report
#   bash scripts/gpu_session.sh bf16        # ~3 min: bf16 vs fp32 NDCG@10
# Timing numbers use the machine's own JAX (CUDA plugin); nothing is
# installed from the network. Keep each call inside the session's 15 minutes
# of device time: run `bench` first, then as many table2 settings as fit.
set -uo pipefail
mode=${1:?usage: gpu_session.sh bench|table2 SETTING EPS|setting SETTING|bf16}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CAT_DATA_DIR=$PWD/.data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt"
work=/tmp/cat_runs
keep() {  # copy the small result files of a workdir tree to $OUT
  (cd "$work" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
      -o -name '*.png' \) -print0 | xargs -0 -I{} cp --parents {} "$OUT/") ;}
case $mode in
  bench)
    b="python3 benchmarks/bench.py"
    { $b --shapes=ml1m,video,video_file --buckets=1,4 \
          --what=epoch_base,epoch_cas,epoch_runs,eval,cascade,topk
      $b --shapes=ml1m --models=sasrec,gru4rec --what=protocol --repeats=1
      $b --shapes=video --models=sasrec --what=cascade_100m --repeats=3
      $b --shapes=large --models=sasrec --what=eval,topk --item_chunk=65536 \
          --repeats=1
    } > "$OUT/bench.jsonl" 2> "$OUT/bench.err"
    ;;
  table2)
    setting=${1:?setting, e.g. sasrec_video}; eps=${2:?eps per method}
    RUNS=$work VECTORIZE=1 bash scripts/cpu_paper.sh "$setting" table "$eps" \
        > "$OUT/table2_$setting.log" 2>&1
    keep
    ;;
  setting)
    setting=${1:?setting, e.g. gru4rec_beauty}; p="bash scripts/cpu_paper.sh"
    export RUNS=$work
    $p "$setting" grid > "$OUT/grid_$setting.log" 2>&1
    if eps=$($p "$setting" chosen 2>> "$OUT/grid_$setting.log"); then
      VECTORIZE=1 $p "$setting" table "$eps" > "$OUT/table2_$setting.log" 2>&1
      for s in 0 1 2; do
        $p "$setting" robustness pretrain,none/none,global/global,cas/cas $s
      done > "$OUT/robustness_$setting.log" 2>&1
      $p "$setting" robustness_report 0,1,2 >> "$OUT/robustness_$setting.log" 2>&1
    fi
    keep
    ;;
  bf16)
    for dtype in float32 bfloat16; do
      python3 launch.py --config=configs/sasrec_video.py \
          --workdir=$work/precision_$dtype --config.adv.epochs=0 \
          --config.model.dtype=$dtype --config.train.matmul_precision=float32 \
          "$@" > "$OUT/precision_$dtype.log" 2>&1
    done
    keep
    ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
