#!/usr/bin/env bash
# The GPU check of the sglang backend's encode side (see hack/gpu_check.py), for a machine
# with one NVIDIA GPU, a CUDA 13 torch and transformers. It reaches no registry: the GPU
# image's Mooncake build (trimmed to its transfer engine) and the Debian RDMA and NUMA
# libraries travel in .cache/gpu-wheels, made here with `python hack/gpu_wheels.py`
# (about 24 MiB). Under 5 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wheels=.cache/gpu-wheels
if [[ -d $wheels ]]; then
  for deb in "$wheels"/*.deb; do [[ -e $deb ]] && dpkg -x "$deb" /; done
  ldconfig
  pip install --quiet --no-index --no-deps "$wheels"/*.whl
fi
pip install --quiet --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH="$PWD/runtime:$PWD/operator:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 280 python3 hack/gpu_check.py
