#!/usr/bin/env bash
# Prove pdbatch's GPU path on one GPU: UCXX KV transfer device-to-device, greedy outputs equal to
# Hugging Face generate, and prefill/decode/KV-transfer figures for a random ~1B Llama.
#   bash scripts/gpu_check.sh [OUT_DIR]     (default gpu-check/; results in OUT_DIR/gpu_check.json)
# Needs a CUDA build of torch and the UCXX/RMM stack: pip install -e '.[ucx]' dask-cuda
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pdbatch.bench.gpu_check --out "${1:-gpu-check}"
