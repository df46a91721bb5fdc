#!/usr/bin/env bash
# Everything issues 12, 20 and 21 ask of a lent GPU, in one call (the device tool: `run` with this script):
# the CUDA tests (bf16 compiled graphs for every bucket through the serving loop with Mimi, fp32
# replay against eager, an instance on cuda:1 when there are two GPUs), then bench/gpu_bench.py
# and bench/frame_bench.py. Results under $OUT (or build/gpu-check): the pytest log, the JSON
# figures, nvidia-smi. Figures go to docs/benchmarks.md by hand, with this command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
make setup > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
PY=.venv/bin/python
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count())" | tee "$OUT/torch.txt"
timeout 240 $PY -m pytest -q -rs tests/test_engine.py tests/test_prefix_pool.py -k "cuda or second_gpu" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -15
# Quantized CSM on the GPU (issue 20): torchao int8 weight-only and fp8 inside the compiled, captured step.
timeout 240 $PY -m pytest -q -rs tests/test_quantize.py -k cuda 2>&1 | tee "$OUT/pytest-quantize.log" | tail -8
timeout 300 $PY bench/gpu_bench.py --batches 1 8 64 256 --frames 30 --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -12
for scheme in int8 fp8; do
  timeout 240 $PY bench/gpu_bench.py --quantize $scheme --batches 1 8 64 --frames 30 --json "$OUT/gpu_bench_$scheme.json" 2>&1 | tee "$OUT/gpu_bench_$scheme.log" | tail -8
done
# Conversations (issue 21): time to first audio of turns 1..12, with and without prefix reuse, at 1 and 64 conversations.
for conversations in 1 64; do
  timeout 300 $PY bench/conversation_bench.py --device cuda --conversations $conversations --json "$OUT/conversation_$conversations.json" 2>&1 | tee "$OUT/conversation_$conversations.log" | tail -6
done
