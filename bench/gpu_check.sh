#!/usr/bin/env bash
# Everything issue 12 asks of a lent GPU, in one call (the device tool: `run` with this script):
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
timeout 240 $PY -m pytest -q -rs tests/test_engine.py -k "cuda or second_gpu" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -15
timeout 300 $PY bench/gpu_bench.py --batches 1 8 64 256 --frames 30 --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -12
