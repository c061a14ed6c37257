"""Load time: ``smash_runtime.load`` against ``DiffusionPipeline.from_pretrained`` of the same weights.

The one load benchmark. A FLUX pipeline is saved by diffusers and built into an artifact (cached
in ``--work``); both loaders then read the same files, interleaved, after one untimed round (a
warm page cache, as a restarted replica on the same disk sees it). Medians, ratios to
``from_pretrained``, the loader's phases (``pipe.smash.timings``) and what was hashed.

Rows:
    from_pretrained                      diffusers maps the files and reads a page on first use
    from_pretrained + read every page    the same, then one read of every weight page
    load verify=fast                     the default: hashes this machine already checked for the
                                         very same files are reused (a restart, a second replica)
    load verify=full                     every file hashed now (also what the first load on a
                                         machine costs in either mode)

Models (``--model``): ``medium`` a 70.9M-parameter FLUX transformer in float32 (the issue's);
``2b`` a 2.06B-parameter one at FLUX's real width (24 heads x 128, 3 double + 7 single blocks)
in bfloat16. ``--transforms fused-int8wo`` builds with fuse_qkv + int8wo instead (diffusers
reads those artifacts too: format 2). ``--fresh-process`` times one load in each new process
(imports done first, untimed) instead of repeated loads in one process.

    python bench/load.py --model medium --runs 5
    python bench/load.py --model 2b --runs 3
    python bench/load.py --model medium --fresh-process --runs 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # transformer config overrides and dtype
    "medium": (dict(num_layers=4, num_single_layers=8, heads=8, head_dim=64), "float32"),
    "2b": (dict(num_layers=3, num_single_layers=7, heads=24, head_dim=128), "bfloat16"),
}
TRANSFORMS = {"none": "fuse_qkv = false\n", "fused-int8wo": 'fuse_qkv = true\n\n[build.quantize]\nmethod = "int8wo"\n'}
ROWS = ("from_pretrained", "from_pretrained + read every page", "load verify=fast", "load verify=full")

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import smash_runtime
from diffusers import DiffusionPipeline
sys.path.insert(0, sys.argv[4])
from load import one_load
print(json.dumps(one_load(sys.argv[1], sys.argv[2])))
"""


def build_artifact(model: str, transforms: str, work: Path) -> Path:
    """A FLUX pipeline saved by diffusers, then built into an artifact (both cached in ``work``)."""
    import torch

    from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config

    overrides, dtype = MODELS[model]
    artifact = work / f"{model}-{transforms}-artifact"
    if (artifact / "smash.json").is_file():
        return artifact
    source = work / f"{model}-source"
    if not (source / "model_index.json").is_file():
        with torch.device("cpu"):
            pipe = build_tiny("tiny-flux", transformer_config=tiny_flux_transformer_config(**overrides))
        pipe.to(getattr(torch, dtype)).save_pretrained(source)
        del pipe
    manifest = work / f"{model}-{transforms}.toml"
    manifest.write_text(f'manifest_version = 1\n\n[model]\nsource = "{source}"\ndtype = "{dtype}"\n\n'
                        f'[build]\n{TRANSFORMS[transforms]}\n[output]\ndir = "{artifact}"\n')
    subprocess.run([str(Path(sys.executable).parent / "smash-build"), "-q", str(manifest)], check=True)
    return artifact


def touch_weights(pipe) -> None:
    """Read one element of every 4 KiB page of every weight: from_pretrained maps files lazily."""
    import torch

    def plain(tensor):  # torchao weights hold their data in inner tensors
        if hasattr(tensor, "__tensor_flatten__"):
            for name in tensor.__tensor_flatten__()[0]:
                yield from plain(getattr(tensor, name))
        else:
            yield tensor

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for weight in [*component.parameters(), *component.buffers()]:
                for tensor in plain(weight.detach()):
                    flat = tensor.reshape(-1)
                    flat[:: max(1, 4096 // flat.element_size())].float().sum()


def one_load(artifact: str | Path, row: str) -> dict:
    """Time one load of ``row`` (one of ROWS); returns seconds, phases and what was hashed."""
    import torch
    from diffusers import DiffusionPipeline

    import smash_runtime

    start = time.perf_counter()
    if row.startswith("from_pretrained"):
        dtype = json.loads((Path(artifact) / "smash.json").read_text())["dtype"]
        pipe = DiffusionPipeline.from_pretrained(artifact, dtype=getattr(torch, dtype))
        if row.endswith("every page"):
            touch_weights(pipe)
        out = {"seconds": time.perf_counter() - start}
    else:
        pipe = smash_runtime.load(artifact, device="cpu", verify=row.split("=")[1], cacher=False, compiler=False)
        out = {"seconds": time.perf_counter() - start, "phases": dict(pipe.smash.timings),
               "hashed_bytes": pipe.smash.verification["hashed_bytes"]}
    out["parameters"] = sum(p.numel() for p in pipe.transformer.parameters())
    del pipe
    gc.collect()
    return out


def _in_fresh_process(artifact: Path, row: str, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(artifact), row, str(threads), str(Path(__file__).parent)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="medium")
    parser.add_argument("--transforms", choices=tuple(TRANSFORMS), default="none")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh-process", action="store_true", help="one load per new process instead of repeats")
    parser.add_argument("--work", type=Path, default=None, help="folder for the source and artifact; reused when present")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="smash-load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    artifact = build_artifact(args.model, args.transforms, work)
    measure = (lambda row: _in_fresh_process(artifact, row, args.threads)) if args.fresh_process else (
        lambda row: one_load(artifact, row))
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    load_averages = []
    for i in range(args.runs + 1):  # the first round warms the page cache, the imports and the hash record
        for row in ROWS:
            result = measure(row)
            if i:
                results[row].append(result)
        load_averages.append(os.getloadavg()[0])
        print(f"  round {i}: " + ", ".join(f"{row} {r[-1]['seconds']:.3f}s" for row, r in results.items())
              if i else "  warm-up round", file=sys.stderr)

    base = statistics.median(r["seconds"] for r in results["from_pretrained"])
    params = results["from_pretrained"][0]["parameters"]
    weights = sum(p.stat().st_size for p in artifact.rglob("*.safetensors"))
    how = "one load per fresh process (imports untimed)" if args.fresh_process else "repeated loads in one process"
    lines = [f"load, {args.model} ({args.transforms}): FLUX transformer {params / 1e6:.1f}M parameters "
             f"({MODELS[args.model][1]}), {weights / 1e6:.0f} MB of safetensors; medians of {args.runs} interleaved "
             f"rounds, {how}, {args.threads} torch thread(s), load average {min(load_averages):.1f}-{max(load_averages):.1f}.",
             "", "| load | seconds | vs from_pretrained | hashed MB | phases (median s) |", "|---|---:|---:|---:|---|"]
    report = {"model": args.model, "transforms": args.transforms, "parameters": params, "weights_bytes": weights,
              "runs": args.runs, "fresh_process": args.fresh_process, "load_average": [min(load_averages), max(load_averages)],
              "rows": {}}
    for row, runs in results.items():
        median = statistics.median(r["seconds"] for r in runs)
        phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in runs[0].get("phases", {})}
        hashed = statistics.median(r.get("hashed_bytes", 0) for r in runs) / 1e6
        detail = ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
        lines.append(f"| {row} | {median:.3f} | {median / base:.2f}x | {hashed:.0f} | {detail} |")
        report["rows"][row] = {"median_s": median, "ratio": median / base, "hashed_mb": hashed, "phases": phases}
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
