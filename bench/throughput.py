"""Throughput of ``smash-serve --ray`` with 1 and 2 replicas, in one run: requests/s, p50/p95 latency.

Same artifact, same client load (``--clients`` concurrent clients, ``--requests`` in total, each
a fixed size/steps/seed), one torch thread and one CPU per replica, on a local Ray instance with
``--cpus`` CPUs. Before each measurement every replica is warmed by the deployment's own warm-up
and ``--clients`` requests that are not counted. For reference, the same request is timed in this
process, sequentially, without any server (the ceiling of one replica).

    python bench/throughput.py                                   # tiny-flux, 64x64, 4 steps
    python bench/throughput.py --artifact dist/tiny-flux --size 128 --steps 8 --json bench/results/throughput.json

Scaling efficiency = (requests/s with 2 replicas) / (2 x requests/s with 1 replica).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_artifact(folder: Path) -> Path:
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    (folder / "tiny.toml").write_text(
        '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n\n'
        "[runtime.warmup]\nshapes = [{ height = 64, width = 64, steps = 1 }]\n")
    return build(load_manifest(folder / "tiny.toml"), out_dir=folder / "tiny-flux").artifact.path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def post(port: int, body: dict) -> tuple[int, float, float | None]:
    """(status, latency s, generation s that the replica reports in Server-Timing)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        timing = dict(part.strip().split(";dur=") for part in (resp.getheader("server-timing") or "").split(",")
                      if ";dur=" in part)
        generate = float(timing["generate"]) / 1000 if "generate" in timing else None
        return resp.status, time.perf_counter() - start, generate
    finally:
        conn.close()


def load(port: int, clients: int, total: int, body: dict) -> dict:
    """``total`` requests from ``clients`` threads; every status must be 200 (the queue is unbounded here)."""
    latencies: list[float] = []
    generation: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    todo = iter(range(total))

    def client() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            status, seconds, generate = post(port, body)
            with lock:
                statuses.append(status)
                latencies.append(seconds)
                if generate is not None:
                    generation.append(generate)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {sorted(set(bad))}")
    return {"requests": total, "seconds": round(wall, 2), "rps": round(total / wall, 3),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "generate_p50_s": round(statistics.median(generation), 3) if generation else None}


def in_process(artifact: Path, body: dict, runs: int) -> dict:
    import torch

    import smash_runtime
    from smash_runtime.images import generate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = smash_runtime.load(artifact, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        call = dict(seed=body["seed"], steps=body["num_inference_steps"], height=body["_side"], width=body["_side"])
        generate(pipe, body["prompt"], **call)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            generate(pipe, body["prompt"], **call)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"median_s": round(statistics.median(times), 3), "rps": round(1 / statistics.median(times), 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=None, help="default: build tiny-flux into a temp folder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--rounds", type=int, default=2, help="1-then-2-replica rounds (medians reported): "
                        "alternating spreads the drift of a shared machine's load over both")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from smash_runtime.server.ray_serve import APP_NAME, build_app, proxy_environment, start_serve

    body = {"prompt": "a red cube on a table", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps,
            "seed": 0}
    with tempfile.TemporaryDirectory(prefix="smash-throughput.") as tmp:
        artifact = args.artifact or build_artifact(Path(tmp))
        reference = in_process(artifact, {**body, "_side": args.size}, runs=5)
        os.environ.update(proxy_environment())
        load_before = os.getloadavg()
        ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        try:
            start_serve("127.0.0.1", args.port)
            for _ in range(args.rounds):
                for replicas in (1, 2):
                    scaling = {"replicas": replicas, "num_cpus": 1.0, "threads": 1,
                               "max_ongoing_requests": args.clients, "max_queued_requests": args.requests}
                    serve.run(build_app({"artifact": str(artifact), "serve": scaling}), name=APP_NAME,
                              route_prefix="/")
                    load(args.port, args.clients, args.clients, body)  # warm every replica's caches, uncounted
                    runs[replicas].append(load(args.port, args.clients, args.requests, body))
                    print(f"{replicas} replica(s): {runs[replicas][-1]}", file=sys.stderr, flush=True)
                    serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
        load_after = os.getloadavg()

    results = {n: {key: statistics.median(r[key] for r in rs) for key in ("rps", "p50_s", "p95_s", "generate_p50_s")}
               for n, rs in runs.items()}
    efficiency = results[2]["rps"] / (2 * results[1]["rps"])
    report = {
        "artifact": str(args.artifact or "builtin:tiny-flux (float32)"),
        "request": {"size": body["size"], "steps": args.steps, "clients": args.clients, "requests": args.requests},
        "in_process_one_thread": reference,
        "replicas": {str(k): {"median": v, "runs": runs[k]} for k, v in results.items()},
        "speedup_2_vs_1": round(results[2]["rps"] / results[1]["rps"], 3),
        "scaling_efficiency": round(efficiency, 3),
        "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus, "loadavg_before": [round(x, 1) for x in load_before],
                    "loadavg_after": [round(x, 1) for x in load_after]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
