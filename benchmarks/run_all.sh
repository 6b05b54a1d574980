#!/usr/bin/env bash
# Every CPU figure in benchmarks/README.md (GPU: benchmarks/gpu.sh), JSON results under ${OUT:-runs/bench}.
# Run from the repository root on a quiet machine (load average < 1.5):
#   bash benchmarks/run_all.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
G=(--shape gpt2-small --pairs 4 --prompt-len 96 --completion-len 32)

uptime
$PY -m benchmarks.vs_trl "${G[@]}" --steps 3 --rounds 2 --json-out "$OUT/vs_trl_gpt2.json"
$PY -m benchmarks.vs_trl "${G[@]}" --steps 3 --rounds 2 --layout prefix_shared \
  --json-out "$OUT/vs_trl_gpt2_prefix.json"
$PY -m benchmarks.vs_trl --shape tiny --pairs 4 --prompt-len 96 --completion-len 32 \
  --steps 10 --rounds 2 --json-out "$OUT/vs_trl_tiny.json"
$PY -m benchmarks.train_step "${G[@]}" --steps 3 --sweep unembed --json-out "$OUT/unembed_gpt2.json"
$PY -m benchmarks.train_step "${G[@]}" --steps 2 --sweep scan --json-out "$OUT/scan_gpt2.json"
$PY -m benchmarks.prefix_sharing --shape gpt2-small --pairs 4 --completion-len 32 \
  --ratios 3,0.25 --steps 2 --json-out "$OUT/prefix_sharing_gpt2.json"
$PY -m benchmarks.train_step "${G[@]}" --steps 3 --sweep reference --no-peak \
  --json-out "$OUT/reference_gpt2.json"
$PY -m benchmarks.train_step "${G[@]}" --steps 3 --sweep remat --no-peak \
  --json-out "$OUT/remat_gpt2.json"
$PY -m benchmarks.logprobs_memory --shape tiny --vocab 128256 --pairs 2 --prompt-len 96 \
  --completion-len 32 --chunks 0,32,16 --steps 2 --json-out "$OUT/logprobs_memory_128k.json"
$PY -m benchmarks.padding --shape tiny --pairs 8 --max-length 128 --batches 6 \
  --json-out "$OUT/padding_tiny.json"
uptime
# Long context (issue 20): AOT scratch memory at 2k/8k/32k tokens per row, then CPU step time at 2k.
$PY -m benchmarks.long_context --shape tiny --lengths 2048,8192,32768 \
  --json-out "$OUT/long_context_memory.json"
$PY -m benchmarks.long_context --shape tiny --lengths 2048 --time-length 2048 --steps 3 \
  --rounds 2 --json-out "$OUT/long_context_time_2k.json"
