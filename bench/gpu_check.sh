#!/usr/bin/env bash
# The GPU check of the fused log-prob (issue #9): each table goes to $OUT (or ./gpu_out).
# Liger-Kernel travels as a wheel in .whl/ (pure Python; the GPU box has torch, triton and no internet):
#   pip download liger-kernel --no-deps -d .whl      # here, before the run; carry [".whl"]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
# most important first: the time on the lent machine may run out before the end
timeout 150 python3 bench/logprob.py 2>&1 | tee "$OUT/logprob.md"
timeout 50 python3 bench/logprob.py --gradients --tokens 4096 2>&1 | tee "$OUT/gradients.md"
timeout 90 python3 bench/train_step.py 2>&1 | tee "$OUT/train_step.md"
timeout 60 python3 bench/profile_logprob.py 2>&1 | tee "$OUT/profile.txt"
# bench/ppo_memory.py was measured on the H200 (bench/results/ppo_memory_h200.md); run it again when time allows
