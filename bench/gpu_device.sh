#!/usr/bin/env bash
# What runs on the GPU machine (no network): install the carried wheels, then the GPU benchmark.
#
# Here, first:   bash bench/prepare_device_wheels.sh         (fills .device/wheels, ~10 MiB)
# There:         bash bench/gpu_device.sh [BUDGET_S [gpu.py args...]]
#
# With the device tool: run(command="bash bench/gpu_device.sh 540", carry=[".device"], timeout_s=600).
# Results (results.json, results.md, log.txt) go to $OUT, or out/gpu without it. The budget is
# what bench/gpu.py may spend from its start; it stops itself before it and keeps what it measured.
# Rehearse here on the CPU, wheel install included (the packages are imported from $SMASH_SITE):
#     bash bench/prepare_device_wheels.sh && OUT=/tmp/rehearsal PYTHON=.venv/bin/python bash bench/gpu_device.sh 300 --dry-run
# SMASH_WHEELS (default .device/wheels) and SMASH_SITE (default /tmp/smash-site) move the two folders.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET="${1:-540}"
shift || true
PY="${PYTHON:-python3}"
RESULTS="${OUT:-out/gpu}"
SITE="${SMASH_SITE:-/tmp/smash-site}"
WHEELS="${SMASH_WHEELS:-.device/wheels}"
mkdir -p "$RESULTS"
start=$(date +%s)

ls "$WHEELS"/*.whl >/dev/null || { echo "no $WHEELS: run bench/prepare_device_wheels.sh and carry .device" >&2; exit 1; }
# --target keeps the machine's own environment untouched; PYTHONPATH puts these first.
# By name from the folder: pip takes the wheel that fits this interpreter (blake3 is per CPython version).
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$WHEELS" \
    --target "$SITE" diffusers torchao blake3 smash-runtime smash-build || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "wheels installed in $(( $(date +%s) - start ))s"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

"$PY" bench/gpu.py --budget-s "$BUDGET" --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/log.txt"
exit "${PIPESTATUS[0]}"
