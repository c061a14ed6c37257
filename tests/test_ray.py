"""``smash-serve --ray`` on a real local two-node Ray cluster, with two replicas of tiny-flux.

One cluster (``ray.cluster_utils.Cluster``: a head and a worker node, one CPU each) and one
``smash-serve --ray`` process joined to it serve the whole module; the last test drains it with
SIGTERM. Counts are checked against Serve's own Prometheus metrics, scraped from each node's
metrics agent.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

serve = pytest.importorskip("ray.serve", reason="Ray is an optional extra: pip install 'smash-runtime[ray]'")
import openai  # noqa: E402
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from smash_runtime.server.ray_serve import APP_NAME, DEPLOYMENT_NAME, REPLICA_HEADER, proxy_environment  # noqa: E402

from server_helpers import answers_200, call, free_port  # noqa: E402

GEN_ROUTE = "/v1/images/generations"
REPLICA_CLASS = f"ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}"
SCALING = {"replicas": 2, "max_ongoing_requests": 2, "max_queued_requests": 4, "num_cpus": 1.0, "threads": 1}


def _script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def gen(port, seed=0, steps=1, timeout=120):
    return call(port, "POST", GEN_ROUTE, {"prompt": "a red cube", "size": "32x32", "num_inference_steps": steps,
                                         "seed": seed}, timeout=timeout)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


def serve_metrics() -> dict[tuple, float]:
    """Every ``ray_serve_*`` sample of every node's metrics agent, summed over the reporting workers."""
    out: dict[tuple, float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                if s.name.startswith("ray_serve_"):
                    keep = {k: v for k, v in s.labels.items() if k in ("application", "method", "status_code",
                                                                         "error_code", "replica", "route", "deployment")}
                    key = (s.name, tuple(sorted(keep.items())))
                    out[key] = out.get(key, 0.0) + s.value
    return out


def http_requests(snapshot, status: int) -> float:
    return sum(v for (name, labels), v in snapshot.items() if name == "ray_serve_num_http_requests_total"
               and dict(labels).get("application") == APP_NAME and dict(labels).get("method") == "POST"
               and dict(labels).get("status_code") == str(status))


def replica_requests(snapshot) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in snapshot.items():
        labels = dict(labels)
        if name == "ray_serve_deployment_request_counter_total" and labels.get("route") == GEN_ROUTE:
            out[labels["replica"]] = out.get(labels["replica"], 0.0) + v
    return out


def stable_metrics(timeout=30):
    """A snapshot once two reads 2.5 s apart agree (the agents report every second)."""
    previous = serve_metrics()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2.5)
        current = serve_metrics()
        if current == previous:
            return current
        previous = current
    return previous


def alive_replicas() -> list[dict]:
    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a["class_name"] == REPLICA_CLASS]


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    root = tmp_path_factory.mktemp("ray-artifact")
    table = "\n".join(f"{k} = {v}" for k, v in SCALING.items())
    (root / "tiny.toml").write_text(
        '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n\n'
        "[runtime.warmup]\nshapes = [{ height = 32, width = 32, steps = 1 }]\n\n"
        f"[serve]\n{table}\n"
    )
    return build(load_manifest(root / "tiny.toml"), out_dir=root / "tiny-flux").artifact.path


@pytest.fixture(scope="module")
def cluster():
    """Head + worker node, one CPU each; nodes inherit the proxy's error-shape callback."""
    saved = {k: os.environ.get(k) for k in proxy_environment()}
    os.environ.update(proxy_environment())
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"metrics_report_interval_ms": 1000}})
    try:
        c.add_node(num_cpus=1)
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def server(cluster, artifact, tmp_path_factory):
    """``smash-serve ART --ray`` joined to the cluster; scaling comes from the artifact's [serve]."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [_script("smash-serve"), str(artifact), "--ray", "--ray-address", cluster.address, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--shutdown-grace-s", "60"],
            stdout=log, stderr=subprocess.STDOUT,
        )

    try:
        wait_until(answers_200(proc, log_path, port, "/ready"), 300, "smash-serve --ray to be ready")
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------------------------
# tests


def test_bad_scaling_flag_exits_2_before_touching_the_cluster(artifact):
    result = subprocess.run([_script("smash-serve"), str(artifact), "--ray", "--replicas", "0",
                             "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "replicas = 0" in result.stdout + result.stderr


def test_openai_client_gets_smash_runs_bytes_from_both_replicas(server, artifact, tmp_path):
    _, port, _ = server
    out = tmp_path / "ref.png"
    subprocess.run(
        [_script("smash-run"), str(artifact), "--prompt", "a red cube", "--seed", "11", "--steps", "2",
         "--height", "32", "--width", "32", "--device", "cpu", "--output", str(out)],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    reference = out.read_bytes()

    # The client's own retries honour Retry-After, should Serve's router count the arrivals as
    # queued for an instant before it assigns them.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=3, timeout=120)

    def one(_):
        raw = client.images.with_raw_response.generate(
            prompt="a red cube", size="32x32", extra_body={"seed": 11, "num_inference_steps": 2})
        return raw.headers.get(REPLICA_HEADER), base64.b64decode(raw.parse().data[0].b64_json)

    # Four at once: more than one replica holds (max_ongoing_requests = 2), so both serve.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(png == reference for _, png in results)
    served_by = {replica for replica, _ in results}
    running = {a["name"].rsplit("#", 1)[-1] for a in alive_replicas()}
    assert len(running) == 2 and served_by == running
    nodes = {a["node_id"] for a in alive_replicas()}
    assert len(nodes) == 2  # one replica on each node
    assert client.models.list().data[0].id == "tiny-flux"


@pytest.mark.slow
def test_burst_gets_only_200_and_429_matching_serves_metrics(server):
    _, port, _ = server
    before = stable_metrics()
    statuses: list[int] = []
    bodies: list[dict] = []
    lock = threading.Lock()

    def client(c):
        for i in range(24):
            status, headers, body = gen(port, seed=c * 100 + i)
            with lock:
                statuses.append(status)
                if status == 429:
                    assert int(headers["retry-after"]) >= 1
                    bodies.append(json.loads(body))

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(client, range(12)))
    counts = Counter(statuses)
    assert set(counts) == {200, 429}, counts
    assert {b["error"]["code"] for b in bodies} == {"queue_full"}

    def metrics_agree():
        after = serve_metrics()
        got = {s: http_requests(after, s) - http_requests(before, s) for s in (200, 429)}
        per_replica = {r: n - replica_requests(before).get(r, 0.0) for r, n in replica_requests(after).items()}
        served = {r: n for r, n in per_replica.items() if n > 0}
        ok = got == {200: counts[200], 429: counts[429]} and sum(served.values()) == counts[200]
        return (got, served) if ok else None

    got, served = wait_until(metrics_agree, 60, f"Serve's metrics to count {dict(counts)}")
    assert len(served) == 2  # both replicas took part in the burst


@pytest.mark.slow
def test_killed_replica_gives_503s_then_comes_back(server, cluster):
    _, port, _ = server
    before = alive_replicas()
    assert len(before) == 2
    # The proxy runs on the head node and prefers its local replica: that one is busy as soon
    # as there is load, so killing it breaks requests in flight.
    victim = next(a for a in before if a["node_id"] == cluster.head_node.node_id)
    results: list[object] = []
    lock = threading.Lock()

    def client(c):
        for i in range(6):
            try:
                status, headers, body = gen(port, seed=c * 100 + i, steps=30, timeout=120)
                try:
                    code = json.loads(body)["error"]["code"] if status != 200 else None
                except ValueError:
                    code = f"not JSON: {headers.get('content-type')} {body[:200]!r}"
                outcome = (status, code, headers.get("retry-after"))
            except Exception as exc:  # a reset or a hang past the timeout: the test fails below
                outcome = ("exception", repr(exc), None)
            with lock:
                results.append(outcome)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, c) for c in range(8)]
        wait_until(lambda: len(results) >= 4, 120, "the burst to get going")
        os.kill(victim["pid"], signal.SIGKILL)
        for f in futures:
            f.result(timeout=600)
    counts = Counter(r[0] for r in results)
    assert set(counts) <= {200, 429, 503}, [r for r in results if r[0] not in (200, 429)]
    assert counts[503] >= 1, counts  # both replicas were busy: the killed one held requests
    assert all(code == "replica_unavailable" and retry for status, code, retry in results if status == 503), results

    def recovered():
        alive = alive_replicas()
        ids = {a["actor_id"] for a in alive}
        return len(alive) == 2 and victim["actor_id"] not in ids and call(port, "GET", "/ready", timeout=10)[0] == 200

    wait_until(recovered, 180, "Serve to replace the killed replica")
    assert gen(port, seed=5)[0] == 200


def test_sigterm_drains_in_flight_request_and_deletes_the_app(server):
    proc, port, log_path = server
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gen, port, 1, 40)
        time.sleep(1.0)  # the request is on a replica
        proc.send_signal(signal.SIGTERM)
        status, _, body = slow.result(timeout=300)
    assert status == 200, body[:300]
    assert proc.wait(timeout=120) == 0
    assert APP_NAME not in serve.status().applications
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert events[-3:] == ["ready", "draining", "stopped"]
