#!/usr/bin/env bash
# Issue 31's GPU measurements in one call (benchmarks/gpu_speed.py says what each row is).
#
#   bash benchmarks/gpu_speed.sh --fetch-wheels   # here, on a machine with PyPI: what the GPU image lacks (diffusers, omegaconf, importlib_metadata), into .whl/
#   bash benchmarks/gpu_speed.sh                  # on the GPU machine (carry .whl/): install, run, results in $OUT
#   bash benchmarks/gpu_speed.sh --tiny           # CPU check of the whole path (toy widths, same structure, 1 s, a few steps)
#
# Extra arguments go to gpu_speed.py (e.g. --skip train, --interval 0.0 0.9, --threshold 0.3). An attention
# backend's package (flash-attn 3, sageattention>=2.1.1) travels as a wheel in .whl/ too, when one is at hand;
# without one the table has the cuDNN row (`_native_cudnn`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_speed_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
  # the GPU image has torch, peft, lightning, timm, accelerate, transformers, rich, safetensors, scipy (KINDS.md)
  # .whl/ and gpu_speed_out/ are in .gitignore: the device tool carries .whl only when the call names it (carry: [".whl"])
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 omegaconf==2.4.0 importlib_metadata==10.2.0
  ls -la .whl
  exit 0
fi

ARGS=("$@")
if [ "${1:-}" != "--tiny" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # soe itself, editable: the experts are found through its entry points
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" \
  | tee "$OUT/versions.txt"
set -o pipefail
$PY benchmarks/gpu_speed.py --json "$OUT/gpu_speed.json" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_speed.log"
