"""Load time: ``smash_runtime.load`` against ``DiffusionPipeline.from_pretrained`` of the same weights.

One process; the source pipeline folder (plain diffusers) and an artifact built from it with no
transform (so both hold the same weights) are loaded alternately ``--runs`` times after one
untimed round (a warm page cache, as a restarted replica on the same disk sees it). Prints
medians per verify mode, the ratio to diffusers, and the loader's phases (``pipe.smash.timings``).

    python bench/load.py --runs 7                    # the FLUX transformer of issue 18 (~70M parameters)
    python bench/load.py --runs 5 --layers 2 --single-layers 4 --heads 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--single-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--modes", default="full,fast,off")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for source/ and artifact/; reused when both exist (compare runtimes on the same files)")
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    import smash_runtime

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="smash-load-bench-"))
    source, artifact = work / "source", work / "artifact"
    if not (source.is_dir() and artifact.is_dir()):
        _make(source, artifact, args)
    modes = args.modes.split(",")

    def diffusers_load() -> float:
        start = time.perf_counter()
        DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
        return time.perf_counter() - start

    phases: dict[str, list[dict[str, float]]] = {m: [] for m in modes}

    def smash_load(mode: str) -> float:
        start = time.perf_counter()
        loaded = smash_runtime.load(artifact, device="cpu", verify=mode, cacher=False, compiler=False)
        seconds = time.perf_counter() - start
        phases[mode].append(dict(loaded.smash.timings))
        return seconds

    diffusers_load()
    for mode in modes:
        smash_load(mode)
    for mode in modes:
        phases[mode].clear()
    times: dict[str, list[float]] = {"diffusers": [], **{m: [] for m in modes}}
    for _ in range(args.runs):
        times["diffusers"].append(diffusers_load())
        for mode in modes:
            times[mode].append(smash_load(mode))

    base = statistics.median(times["diffusers"])
    weights = sum(p.stat().st_size for p in artifact.rglob("*.safetensors"))
    params = sum(p.numel() for p in DiffusionPipeline.from_pretrained(source).transformer.parameters())
    print(f"smash_runtime from {Path(smash_runtime.__file__).parent}")
    print(f"FLUX transformer {params / 1e6:.1f}M parameters, {weights / 1e6:.0f} MB of safetensors, "
          f"{args.runs} runs, load average {os.getloadavg()[0]:.1f}")
    print("| loader | median (s) | vs from_pretrained |\n|---|---:|---:|")
    print(f"| diffusers from_pretrained | {base:.3f} | 1.00x |")
    report = {"parameters": params, "weights_bytes": weights, "runs": args.runs, "load_average": os.getloadavg()[0],
              "diffusers_s": base, "modes": {}}
    for mode in modes:
        median = statistics.median(times[mode])
        phase = {k: round(statistics.median(p.get(k, 0.0) for p in phases[mode]), 4) for k in phases[mode][0]}
        print(f"| smash_runtime.load verify={mode} | {median:.3f} | {median / base:.2f}x |")
        report["modes"][mode] = {"median_s": median, "ratio": median / base, "phases": phase}
    for mode in modes:
        print(f"phases verify={mode}: {json.dumps(report['modes'][mode]['phases'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _make(source: Path, artifact: Path, args) -> None:
    """The source pipeline folder and an artifact of the same weights (no transform)."""
    from smash_build.builder import build
    from smash_build.manifest import parse_manifest
    from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config

    config = tiny_flux_transformer_config(args.layers, args.single_layers, args.heads, args.head_dim)
    build_tiny("tiny-flux", transformer_config=config).save_pretrained(source)
    text = f'[model]\nsource = "{source}"\ndtype = "float32"\n[build]\nfuse_qkv = false\n[output]\ndir = "artifact"\n'
    build(parse_manifest(text, base_dir=source.parent), out_dir=artifact)


if __name__ == "__main__":
    main()
