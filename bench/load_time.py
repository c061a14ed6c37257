"""Load time of an artifact: ``smash_runtime.load`` against plain diffusers' ``from_pretrained``.

    python bench/load_time.py                                  # fuse_qkv + int8wo, and no transforms
    python bench/load_time.py --layers 2 --single-layers 4 --runs 7 --workdir /tmp/sb-load

Set-up (once, cached in --workdir): a FluxPipeline folder whose transformer has width
``--heads x 128`` (default 1024) and the given block counts, random float32 weights; the other
components are the tiny ones. Two artifacts are built from it (``fuse_qkv`` + ``int8wo``
excluding norms and embeddings, and no transforms). Every measurement is a fresh process that
imports everything first and then times only the load call (``cacher=False, compiler=False``,
``verify="off"`` so that hashing the files does not hide the weight layout's cost);
``smash_runtime.load``'s own phase timings are reported beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import smash_runtime
from diffusers import DiffusionPipeline
path, how = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if how == "smash_runtime":
    pipe = smash_runtime.load(path, device="cpu", verify="off", cacher=False, compiler=False)
    phases = pipe.smash.timings
else:
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    phases = {}
print(json.dumps({"load_s": time.perf_counter() - start, "phases": phases}))
"""


def _source(workdir: Path, layers: int, single_layers: int, heads: int) -> Path:
    folder = workdir / f"source-{layers}-{single_layers}-{heads}"
    if not (folder / "model_index.json").is_file():
        from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config

        config = tiny_flux_transformer_config(num_layers=layers, num_single_layers=single_layers, heads=heads, head_dim=128)
        build_tiny("tiny-flux", transformer_config=config).save_pretrained(folder)
    return folder


def _artifact(workdir: Path, source: Path, name: str, build_table: str) -> Path:
    from smash_build.builder import build
    from smash_build.manifest import parse_manifest

    out = workdir / name
    if not (out / "smash.json").is_file():
        text = f'[model]\nsource = "{source}"\ndtype = "float32"\n\n[build]\n{build_table}\n[output]\ndir = "{out}"\n'
        build(parse_manifest(text, base_dir=workdir), out_dir=out)
    return out


def _measure(path: Path, how: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{how} failed on {path}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smash-load-time"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = _source(args.workdir, args.layers, args.single_layers, args.heads)
    artifacts = {
        "fuse_qkv+int8wo": _artifact(args.workdir, source, "fused-int8wo",
                                     'fuse_qkv = true\nquantize = { method = "int8wo", exclude = ["norm+embedding"] }\n'),
        "none": _artifact(args.workdir, source, "plain", "fuse_qkv = false\n"),
    }
    rows = []
    for name, path in artifacts.items():
        size = sum(p.stat().st_size for p in (path / "transformer").glob("*.safetensors"))
        for how in ("smash_runtime", "diffusers"):
            runs = [_measure(path, how) for _ in range(args.runs)]
            rows.append({
                "artifact": name, "loader": how, "transformer_mb": round(size / 1e6, 1),
                "median_load_s": round(statistics.median(r["load_s"] for r in runs), 3),
                "median_read_weights_s": round(statistics.median(r["phases"].get("read_weights", 0.0) for r in runs), 3),
            })
    print(json.dumps({"machine": platform.processor() or platform.machine(), "runs": args.runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
