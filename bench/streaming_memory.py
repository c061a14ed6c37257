"""Peak memory of the in-memory vs the streaming build of a ~2B-parameter FLUX transformer.

    python bench/streaming_memory.py                         # ~2B params: 3 double + 7 single blocks
    python bench/streaming_memory.py --layers 1 --single-layers 1 --workdir /tmp/sb-small

Set-up (once, cached in --workdir): a FluxPipeline folder whose transformer has the real
FLUX.1-dev dimensions (width 3072, 24 heads, context 4096, pooled 768) with fewer blocks and
random bf16 weights written straight to safetensors; the other components are the tiny ones
(the build only transforms the transformer and copies the rest).

Each build is the real CLI (`smash-build MANIFEST -o OUT`) in its own process, with fuse_qkv +
int8wo; its peak RSS is the kernel's ``ru_maxrss`` for that child (``os.wait4``), so the
figure covers the whole process: interpreter, torch, mapped pages. The two artifacts must be
byte-identical; the streaming peak is checked against 1.5 GB + the largest single block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
ALLOWANCE = int(1.5 * 1e9)  # "1.5 GB" of the issue, in bytes

MANIFEST = """\
[model]
source = "{source}"
dtype = "bfloat16"

[build]
fuse_qkv = true
quantize = {{ method = "int8wo", exclude = ["norm+embedding"] }}
streaming = {streaming}

[output]
dir = "artifact"
"""


def flux_config(layers: int, single_layers: int) -> dict:
    """FLUX.1-dev's transformer configuration with ``layers`` double and ``single_layers`` single blocks."""
    from gpu import FLUX_DEV_TRANSFORMER  # bench/ is on sys.path when this runs as a script

    return {**FLUX_DEV_TRANSFORMER, "num_layers": layers, "num_single_layers": single_layers}


def make_source(folder: Path, layers: int, single_layers: int, seed: int = 0) -> dict:
    """Write the source pipeline folder; returns the transformer's parameter count and block sizes."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from smash_build.tiny_models import build_tiny
    from smash_runtime.structure import module_units, unit_of

    config = flux_config(layers, single_layers)
    marker = folder / "bench-source.json"
    if marker.is_file() and json.loads(marker.read_text())["config"] == json.loads(json.dumps(config)):
        return json.loads(marker.read_text())
    print(f"writing the source pipeline to {folder}", flush=True)
    pipe = build_tiny("tiny-flux", seed=seed, dtype=torch.bfloat16)
    pipe.save_pretrained(folder)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    out = folder / "transformer"
    for stale in out.glob("diffusion_pytorch_model*"):
        stale.unlink()
    model.register_to_config(_name_or_path=None)
    model.save_config(out)
    units = module_units(model)
    sizes = {name: meta.numel() * 2 for name, meta in model.state_dict().items()}
    unit_bytes: dict[str, int] = {}
    for name, nbytes in sizes.items():
        unit_bytes[unit_of(name, units)] = unit_bytes.get(unit_of(name, units), 0) + nbytes
    plan: list[list[str]] = [[]]
    for name, nbytes in sizes.items():  # shards of about 2 GiB, like the Hub's FLUX repo
        if plan[-1] and sum(sizes[n] for n in plan[-1]) + nbytes > 2 * GIB:
            plan.append([])
        plan[-1].append(name)
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(model.state_dict().items())
    weight_map = {}
    for i, names in enumerate(plan, 1):
        file = f"diffusion_pytorch_model-{i:05d}-of-{len(plan):05d}.safetensors"
        # Scaled so activations stay finite; the values only need to be deterministic.
        shard = {n: (torch.randn(shapes[n].shape, generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, out / file)
        weight_map.update({n: file for n in names})
        print(f"  {file}: {sum(sizes[n] for n in names) / GIB:.2f} GiB", flush=True)
        del shard
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = sum(meta.numel() for meta in shapes.values())
    info = {"config": config, "parameters": params, "bytes": sum(unit_bytes.values()),
            "largest_block": max(unit_bytes.items(), key=lambda kv: kv[1])}
    marker.write_text(json.dumps(info, indent=2))
    return json.loads(marker.read_text())


def run_build(workdir: Path, source: Path, streaming: bool) -> dict:
    """One build in a fresh process; wall time and that child's peak RSS."""
    name = "streaming" if streaming else "in-memory"
    manifest = workdir / f"{name}.toml"
    manifest.write_text(MANIFEST.format(source=source, streaming=str(streaming).lower()))
    out = workdir / name / "artifact"
    cmd = [sys.executable, "-m", "smash_build.cli", "build", str(manifest), "-o", str(out)]
    print(f"building {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} build failed with exit code {proc.returncode}")
    return {"mode": name, "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "artifact": str(out)}


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def markdown(results: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    lines = ["| build | peak RSS | wall time | artifact sha256 (tree) |", "|---|---:|---:|---|"]
    for row in results["builds"]:
        lines.append(f"| {row['mode']} | {gb(row['peak_rss_bytes'])} | {row['wall_s']:.0f} s | `{row['tree_sha256'][:16]}` |")
    src, bound = results["source"], results["streaming_bound_bytes"]
    lines += ["", f"Source transformer: {src['parameters'] / 1e9:.2f}B parameters, {gb(src['bytes'])} bf16; largest "
              f"block `{src['largest_block'][0]}` {gb(src['largest_block'][1])}. Streaming bound 1.5 GB + largest "
              f"block = {gb(bound)}: {'met' if results['streaming_within_bound'] else 'NOT met'}. Artifacts "
              f"{'byte-identical' if results['identical'] else 'DIFFER'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smash-streaming-bench"))
    parser.add_argument("--layers", type=int, default=3, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single-layers", type=int, default=7, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "streaming_memory.json")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / "source"
    info = make_source(source, args.layers, args.single_layers)
    print(f"source transformer: {info['parameters'] / 1e9:.2f}B parameters, {info['bytes'] / 1e9:.2f} GB", flush=True)
    builds = [run_build(args.workdir, source, streaming) for streaming in (True, False)]
    for row in builds:
        row["tree_sha256"] = tree_digest(Path(row["artifact"]))
    bound = ALLOWANCE + info["largest_block"][1]
    import torch

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                    "torch": torch.__version__},
        "source": info,
        "builds": builds,
        "streaming_bound_bytes": bound,
        "streaming_within_bound": builds[0]["peak_rss_bytes"] <= bound,
        "identical": builds[0]["tree_sha256"] == builds[1]["tree_sha256"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0 if results["identical"] and results["streaming_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
