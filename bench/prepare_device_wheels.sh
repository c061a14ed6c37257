#!/usr/bin/env bash
# Build the wheels bench/gpu.py needs on a GPU machine that has no network.
#
# The GPU machines (Python 3.12, torch 2.11+cu130) already hold torch, transformers, huggingface_hub,
# safetensors, torchmetrics, numpy, pillow, click, rich, psutil, regex, requests, filelock, tqdm;
# they lack diffusers, torchao, blake3 (format-3 file hashes) and our two packages. This fetches/builds exactly those, for
# CPython 3.12 on linux x86_64, into an ignored folder (default .device/wheels) that travels with
# the working tree (keep it well under the 64 MiB carry limit):
#
#     bash bench/prepare_device_wheels.sh            # -> .device/wheels/*.whl
#     bash bench/gpu_device.sh                       # there: install them and run bench/gpu.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.device/wheels}"
PY="${PYTHON:-python3}"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="${PYTHON:-$ROOT/.venv/bin/python}"; fi

rm -rf "$DEST"
mkdir -p "$DEST"

# Pure-python or abi3 wheels for the target interpreter, never built from source.
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any -d "$DEST")
"$PY" -m pip download -q "${target[@]}" diffusers==0.42.1 torchao==0.18.0 "blake3>=1.0,<2"
# diffusers' other requirement, importlib_metadata, is only imported on Python < 3.8: not carried.
# blake3 is built per CPython version: also carry this interpreter's, so a rehearsal here installs.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "blake3>=1.0,<2"

# Our two distributions, from this checkout (pure python).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ROOT/runtime" "$ROOT"

ls -l "$DEST"
du -sh "$DEST"
size=$(du -sb "$DEST" | cut -f1)
if [ "$size" -gt $((48 * 1024 * 1024)) ]; then
    echo "error: $DEST is $((size / 1024 / 1024)) MiB; the device carry limit is 64 MiB for the whole tree" >&2
    exit 1
fi
