#!/usr/bin/env bash
# GPU check for a machine with CUDA (see bench/gpu_check.py): installs repsim with the bench extra, then prints the
# CUDA-vs-CPU difference, CKA throughput vs the fp32 peak, one AMP training step and the stream bench on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
pip install -q -e '.[bench]'
python bench/gpu_check.py
