"""One side of an evaluation: load a pipeline, warm it up, time every image, measure memory.

A phase runs either in this process or in a fresh one (``python -m smash_build.evaluate.phase
SPEC.json RESULT.json``), so that the peak memory it reports belongs to that side alone: a
process's peak RSS cannot be reset, and freed tensors are not always returned to the OS.
Progress goes to stdout as ``SMASH-EVAL {json}`` lines for the parent's progress bar.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import PeakRss

PROGRESS_MARK = "SMASH-EVAL "

# spec keys: side ("base" | "artifact"), label, source {id, revision, dtype, base_dir} (base),
# artifact (path), cacher / compiler (bool or table), jobs [{prompt, seed}], generation {steps,
# height, width, guidance_scale}, device, warmup (count), image_dir.
PhaseSpec = dict[str, Any]
Progress = Callable[[dict[str, Any]], None]


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _weights_bytes(pipe) -> int:
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in list(component.parameters()) + list(component.buffers()):
                total += t.numel() * t.element_size()
    return total


def _default_steps(pipe) -> int | None:
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    return param.default if param is not None and isinstance(param.default, int) else None


def _preimport(spec: PhaseSpec) -> None:
    """Import what loading will use, so load time measures loading, not Python imports."""
    import diffusers

    import smash_runtime  # noqa: F401
    from smash_runtime import images  # noqa: F401

    if spec["side"] == "base":
        from smash_build import sources  # noqa: F401

        if str(spec["source"]["id"]).startswith("builtin:"):
            from smash_build import tiny_models  # noqa: F401
        return
    from smash_runtime.format import read_record

    getattr(diffusers, read_record(Path(spec["artifact"])).pipeline_class, None)  # diffusers imports lazily
    if spec.get("cacher") is not False and spec.get("cacher") is not None:
        from smash_runtime import cachers  # noqa: F401
    if spec.get("compiler") is not False and spec.get("compiler") is not None:
        from smash_runtime import compilers  # noqa: F401


def _load(spec: PhaseSpec):
    device = spec["device"]
    if spec["side"] == "base":
        from smash_build.sources import load_pipeline, resolve_source

        src = spec["source"]
        base_dir = Path(src["base_dir"]) if src.get("base_dir") else None
        pipe = load_pipeline(resolve_source(src["id"], src.get("revision"), base_dir), src["dtype"])
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, {}
    import smash_runtime

    pipe = smash_runtime.load(spec["artifact"], device=device, cacher=spec["cacher"], compiler=spec["compiler"],
                              verify=spec.get("verify", "full"))
    return pipe, dict(pipe.smash.timings)


def run_phase(spec: PhaseSpec, progress: Progress = lambda event: None) -> dict[str, Any]:
    """Load the side ``spec`` describes, generate every job, and return its timings and memory."""
    import torch

    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        return _run_phase(spec, progress)
    finally:
        torch.set_num_threads(threads)


def _run_phase(spec: PhaseSpec, progress: Progress) -> dict[str, Any]:
    import torch

    from smash_runtime.images import encode_png, generate

    device = spec["device"]
    cuda = device.startswith("cuda")
    image_dir = Path(spec["image_dir"])
    image_dir.mkdir(parents=True, exist_ok=True)
    progress({"event": "loading"})
    t0 = time.perf_counter()
    _preimport(spec)
    import_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # baseline: the process with its libraries imported, before any weight is read
    sampler = None if cuda else PeakRss().start()
    baseline = torch.cuda.memory_allocated(device) if cuda else sampler.start_rss
    t0 = time.perf_counter()
    pipe, load_phases = _load(spec)
    if cuda:
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated(device) if cuda else sampler.current()
    gen = {k: v for k, v in spec["generation"].items() if v is not None}
    steps = gen.get("steps") or _default_steps(pipe)
    jobs = spec["jobs"]
    total = len(jobs) + spec["warmup"]
    progress({"event": "loaded", "load_s": load_s, "total": total})

    warmup_s = []
    for i in range(spec["warmup"]):
        # Warm-up uses the first job's shape: compile/autotune/caches happen here, not in the timings.
        t = time.perf_counter()
        generate(pipe, jobs[0]["prompt"], seed=jobs[0]["seed"], **gen)
        if cuda:
            torch.cuda.synchronize(device)
        warmup_s.append(time.perf_counter() - t)
        progress({"event": "image", "done": i + 1, "total": total})
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    latencies, files = [], []
    for i, job in enumerate(jobs):
        t = time.perf_counter()
        image = generate(pipe, job["prompt"], seed=job["seed"], **gen)[0]
        if cuda:
            torch.cuda.synchronize(device)
        latencies.append(time.perf_counter() - t)
        name = f"{i:04d}.png"
        (image_dir / name).write_bytes(encode_png(image))
        files.append(name)
        progress({"event": "image", "done": spec["warmup"] + i + 1, "total": total})

    if cuda:
        memory = {
            "kind": "cuda_max_allocated",
            "peak_bytes": int(max(load_peak, torch.cuda.max_memory_allocated(device))),
            "load_peak_bytes": int(load_peak),
            "generate_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
            "baseline_bytes": int(baseline),
            "above_baseline_bytes": int(max(load_peak, torch.cuda.max_memory_allocated(device)) - baseline),
        }
    else:
        peak = sampler.stop()
        method = "sampled every 5 ms"
        if spec.get("isolated"):
            peak = max(peak, _ru_maxrss())  # exact: the whole process is this phase
            method = "getrusage peak of a dedicated process"
        memory = {"kind": "peak_rss", "peak_bytes": int(peak), "load_peak_bytes": int(load_peak),
                  "baseline_bytes": int(baseline), "above_baseline_bytes": int(peak - baseline), "method": method}
    return {
        "label": spec["label"],
        "side": spec["side"],
        "device": device,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "import_s": import_s,
        "load_s": load_s,
        "load_phases": load_phases,
        "warmup_s": warmup_s,
        "latencies_s": latencies,
        "memory": memory,
        "weights_bytes": _weights_bytes(pipe),
        "cacher": getattr(getattr(pipe, "smash", None), "cacher", None),
        "compiler": getattr(getattr(pipe, "smash", None), "compiler", None),
        "images": files,
        "image_dir": str(image_dir),
    }


def _main(argv: list[str]) -> int:
    spec_path, result_path = argv
    from smash_runtime.logs import quiet_third_party_logs

    quiet_third_party_logs()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    spec["isolated"] = True

    def progress(event: dict[str, Any]) -> None:
        sys.stdout.write(PROGRESS_MARK + json.dumps(event) + "\n")
        sys.stdout.flush()

    result = run_phase(spec, progress)
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
