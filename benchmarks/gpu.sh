#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md in one run: cuDNN attention numbers against XLA,
# then train-step MFU of a ~1.1B Llama shape in bfloat16 (XLA vs cuDNN attention, and a
# larger batch). Writes JSON and a log under $OUT (default /tmp/dpo_jax_gpu).
#
#   bash benchmarks/gpu.sh                 # from the repository root, on the GPU machine
#   SHAPE=tiny SCALE=16 bash benchmarks/gpu.sh   # a quick smoke run anywhere
#
# Uses the machine's own jax/flax/optax; wheels in .whl/ (e.g. ml_collections) are
# installed to /tmp/site first when present.
set -u
OUT=${OUT:-/tmp/dpo_jax_gpu}
SHAPE=${SHAPE:-llama-1b}
SCALE=${SCALE:-1}  # divides every sequence length (smoke runs)
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"

[ -n "${SKIP_ATTENTION_CHECK:-}" ] || timeout 120 $PY -m benchmarks.attention_check --json-out "$OUT/attention_check.json" 2>&1 \
  | tee -a "$OUT/log.txt"

B="$PY -m benchmarks.train_step --shape $SHAPE --dtype bfloat16 --steps 5 --warmup 2"
P=$((512 / SCALE))
# Without remat a 1.1B model saves ~3.5 MB of activations per token (all 22 layers), and
# XLA attention adds its [N, H, L, L] float32 probabilities: 8k tokens fit both paths.
timeout 150 $B --pairs 4 --prompt-len $P --completion-len $P --sweep attention \
  --json-out "$OUT/train_step_attention.json" 2>&1 | tee -a "$OUT/log.txt"
timeout 120 $B --pairs 8 --prompt-len $P --completion-len $P --attention-impl cudnn \
  --json-out "$OUT/train_step_16k.json" 2>&1 | tee -a "$OUT/log.txt"
# 32k tokens per step need block remat (recompute is not counted as model FLOPs).
timeout 120 $B --pairs 16 --prompt-len $((768 / SCALE)) --completion-len $((256 / SCALE)) \
  --attention-impl cudnn --remat block --json-out "$OUT/train_step_32k_remat.json" 2>&1 \
  | tee -a "$OUT/log.txt"
echo "gpu.sh done"
