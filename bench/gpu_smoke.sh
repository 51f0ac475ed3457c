#!/usr/bin/env bash
# End to end on a GPU (issue #26): every script's real code path on a randomly initialised Qwen2.5-Math-1.5B-shaped
# model: HF rollout, bf16 autocast, gradient checkpointing, the paper's loss settings, 256-token responses, 4 prompts
# x 4 samples; 2 steps, a checkpoint, a resume for a third step; then eval.py on two benchmarks. Per script: seconds
# per step (generate / score / train), peak GPU memory (measured around each process by bench/gpu_smoke.py),
# logprob_gap and whether every loss and gradient norm was finite, in $OUT/summary.md (default: a temp folder).
#
#   bash bench/gpu_smoke.sh --prepare   # here, once: a few data rows into .smoke/, math-verify's wheels into .whl/
#   device run: command "bash bench/gpu_smoke.sh", carry [".whl", ".smoke"], timeout_s 540
#   bash bench/gpu_smoke.sh --cpu       # the same flags on the CPU, with a tiny-shaped model and no time budget
#   what the budget cut, in a second call on the still-warm machine (its model in /tmp/gpu_smoke is reused and
#   the table covers both calls): SMOKE_ONLY="one_shot hapo" bash bench/gpu_smoke.sh
#
# The lent GPU has torch and transformers but no vLLM, no math-verify and no network: the data and the wheels travel.
# Most important first, each script under its own timeout inside SMOKE_BUDGET_S (default 470 s), going on after a
# failure; the table is rewritten after every script, so a run cut short still leaves one.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu_smoke.sh [--prepare | --cpu]" >&2; exit 2 ;;
esac

if [ "$MODE" = prepare ]; then
  SHARED=${SHARED_DATA:-../shared/data}
  [ -f "$SHARED/train/one_shot_rlvr/dsr_sub.jsonl" ] || { echo "no data in $SHARED: set SHARED_DATA" >&2; exit 1; }
  mkdir -p .smoke/data/eval/math500 .smoke/data/eval/amc23
  head -n 64 "$SHARED/train/one_shot_rlvr/dsr_sub.jsonl" > .smoke/data/train.jsonl
  for b in math500 amc23; do head -n 8 "$SHARED/eval/$b/test.jsonl" > ".smoke/data/eval/$b/test.jsonl"; done
  # math-verify and what it pulls in that the GPU image lacks (it has sympy); all pure Python
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl math-verify==0.9.0 \
    latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 || exit 1
  du -sh .smoke .whl
  exit 0
fi

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke_out.XXXXXX")}
WORK=${SMOKE_WORK:-$([ "$MODE" = gpu ] && echo /tmp/gpu_smoke || mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")}
mkdir -p "$OUT" "$WORK/runs"
[ -n "${SMOKE_ONLY:-}" ] || rm -f "$WORK/status.jsonl" "$WORK/peaks.jsonl"  # a full run starts a fresh table
exec > >(tee -a "$OUT/log.txt") 2>&1
if [ "$MODE" = gpu ]; then
  SHAPE=1.5b BUDGET=${SMOKE_BUDGET_S:-470} SCALE=1
else
  SHAPE=tiny BUDGET=${SMOKE_BUDGET_S:-100000} SCALE=20
fi
[ -f .smoke/data/train.jsonl ] || { echo "no .smoke/data: run bash bench/gpu_smoke.sh --prepare first" >&2; exit 1; }
if ls .whl/math_verify-*.whl >/dev/null 2>&1 && ! python3 -c "import math_verify" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/math_verify-*.whl .whl/latex2sympy2_extended-*.whl .whl/antlr4_python3_runtime-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import math_verify" || { echo "math-verify missing: carry .whl (bench/gpu_smoke.sh --prepare)"; exit 1; }
export RLVR_DATA_DIR=$PWD/.smoke/data/eval
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "mode $MODE, shape $SHAPE, budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, importlib.metadata as m; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'math-verify', m.version('math-verify'), 'cuda', torch.cuda.is_available())"
} | tee "$OUT/gpu.txt"

START=$SECONDS
record() { echo "{\"label\": \"$1\", \"rc\": $2${3:+, $3}}" >> "$WORK/status.jsonl"; }

selected() { [ -z "${SMOKE_ONLY:-}" ] || [[ " $SMOKE_ONLY " == *" $1 "* ]]; }

job() {  # label timeout script args...: one process under its timeout, cut to what is left of the budget
  local label=$1 limit=$(($2 * SCALE)) left=$((BUDGET - (SECONDS - START))) t0=$SECONDS rc
  shift 2
  if ((left < 30)); then echo "== $label: skipped, out of time"; record "$label" '"skipped: out of time"'; return 1; fi
  ((limit > left)) && limit=$left
  echo "== $label (timeout ${limit}s): $*"
  timeout -k 10 "$limit" python3 bench/gpu_smoke.py exec --record "$WORK/peaks.jsonl" --label "$label" "$@"
  rc=$?
  echo "== $label: exit $rc after $((SECONDS - t0))s"
  record "$label" "$rc" "\"wall_s\": $((SECONDS - t0)), \"limit_s\": $limit"
  return $rc
}

MODEL=$WORK/model
COMMON=(--model "$MODEL" --rollout hf --gradient-checkpointing --max-new-tokens 256 --prompts-per-step 4
        --samples-per-prompt 4 --mini-batch 16 --micro-batch 8 --train-data .smoke/data/train.jsonl
        --eval-data math500 --eval-max-problems 2 --eval-every 0 --save-every 2 --lr 1e-6)

train() {  # script timeout-of-the-run timeout-of-the-resume flags...: 2 steps, then resume checkpoint-2 for a 3rd
  local s=$1 t_run=$2 t_resume=$3 dir=$WORK/runs/$1
  shift 3
  selected "$s" || return 0
  rm -rf "$dir"
  job "$s/run" "$t_run" "$s.py" "${COMMON[@]}" --output-dir "$dir" --total-steps 2 "$@"
  if [ -f "$dir/checkpoint-2/trainer_state.pt" ]; then
    job "$s/resume" "$t_resume" "$s.py" "${COMMON[@]}" --output-dir "$dir" --total-steps 3 \
      --resume "$dir/checkpoint-2" "$@"
    [ -f "$dir/checkpoint-3/trainer_state.pt" ] || echo "== $s: the resume wrote no checkpoint-3"
  else
    echo "== $s/resume: skipped, no checkpoint-2"
    record "$s/resume" '"skipped: no checkpoint-2"'
  fi
  du -sh "$dir" 2>/dev/null
  rm -rf "$dir"/checkpoint-*  # ~18 GB each at 1.5B (fp32 weights and AdamW's moments); the disk holds 64 GiB
  python3 bench/gpu_smoke.py summarize "$WORK" "$OUT" >/dev/null
}

if [ ! -f "$MODEL/config.json" ]; then
  timeout $((120 * SCALE)) python3 bench/gpu_smoke.py build --shape "$SHAPE" "$MODEL" || { echo "no model"; exit 1; }
fi
# the paper's loss settings, as each script's Args give them: KL 0.001 and entropy 0.001 (1-shot RLVR, for GRPO,
# PPO and 1-shot), KL 0.04 and seq-mean-token-mean (HAPO), neither (PCL); temperature 0.6 / 0.7 / default
train grpo 120 120 --temperature 0.6 --kl-coef 0.001 --entropy-coef 0.001
if selected eval; then
  job eval/run 60 eval.py --model "$MODEL" --engine hf --benchmarks math500,amc23 --limit 4 --max-tokens 256 \
    --output-dir "$WORK/runs/eval"
  python3 bench/gpu_smoke.py summarize "$WORK" "$OUT" >/dev/null
fi
train ppo 180 180 --temperature 0.6 --kl-coef 0.001 --entropy-coef 0.001 --critic-lr 1e-5
train pcl 150 150
train one_shot 120 120 --temperature 0.6 --example-index 0
train hapo 120 120 --temperature 0.7 --kl-coef 0.04 --loss-agg seq-mean-token-mean --train-problems 0
cp "$WORK/runs/eval/results.json" "$OUT/eval_results.json" 2>/dev/null
echo "total $((SECONDS - START))s; work folder $WORK; tables in $OUT"
python3 bench/gpu_smoke.py summarize "$WORK" "$OUT"
