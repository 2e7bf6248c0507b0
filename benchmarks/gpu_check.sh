#!/usr/bin/env bash
# The GPU check: prints one JSON (latency of a LLaMA-2-7B-shaped MiT model with a CLIP
# ViT-L/14-336-shaped encoder against the paper's 69 ms, concatenation of 576 tokens beside it;
# a 7B-shaped MiT training step at batch 8 as is, with activation checkpointing and on a 4-bit
# base, beside a concat-576 step; a 2-process DDP smoke run). Under 5 minutes on a CUDA machine.
#   bash benchmarks/gpu_check.sh > benchmarks/results/gpu-check.json
# Extra flags go to benchmarks/gpu_check.py (--tiny: tiny shapes, what the test suite runs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" "$here/gpu_check.py" "$@"
