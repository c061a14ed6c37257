"""bench/run.py --quick: the CPU suite's whole code path (real builder, smash_runtime.load, every
configuration, the JSON and the Markdown table) on tiny models in a fresh process; ~30-60 s.

Timings are never asserted: the machine is shared and --quick's models are too small to say
anything about speed. The full suite's numbers live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run.py"
ROW_KEYS = {
    "config", "family", "settings", "device", "status", "median_s", "p90_s", "speedup", "peak_rss_mb",
    "artifact_bytes", "load_s", "psnr_db", "identical", "latencies_s", "baseline_latencies_s",
}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "suite.json"
    md = out.with_name("table.md")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--markdown", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    return json.loads(out.read_text()), md.read_text(), log


def _expected_configs() -> list[str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip() and "(only when named)" not in line]


@pytest.mark.timeout(300)
def test_quick_suite_has_a_complete_row_per_configuration(quick_run):
    report, _table, log = quick_run
    assert report["quick"] is True and report["suite"] == "cpu"
    assert report["settings"]["reps"] == 1
    assert {"cpu", "cores", "threads", "torch"} <= set(report["machine"])
    rows = {r["config"]: r for r in report["rows"]}
    expected = ["flux-baseline", "sdxl-baseline", *_expected_configs()]
    assert sorted(rows) == sorted(expected), log
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), (name, sorted(ROW_KEYS - set(row)))
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert row["device"] == "cpu"
        assert len(row["latencies_s"]) >= 1 and all(_finite(t) and t > 0 for t in row["latencies_s"]), row
        assert _finite(row["median_s"]) and _finite(row["p90_s"]) and row["p90_s"] >= row["median_s"] > 0, row
        assert _finite(row["speedup"]) and row["speedup"] > 0, row
        assert _finite(row["peak_rss_mb"]) and _finite(row["load_s"]) and row["load_s"] > 0, row
        assert isinstance(row["artifact_bytes"], int) and row["artifact_bytes"] > 0, row
        if name.endswith("-baseline"):
            assert row["speedup"] == pytest.approx(1.0) and row["psnr_db"] is None, row
        else:
            # Same seed as the baseline: a finite PSNR, or bit-identical images said as such.
            assert _finite(row["psnr_db"]) or row["identical"] is True, row
            assert len(row["baseline_latencies_s"]) == len(row["latencies_s"]), row


@pytest.mark.timeout(300)
def test_quick_suite_artifacts_reflect_their_build(quick_run):
    report, _table, _log = quick_run
    rows = {r["config"]: r for r in report["rows"]}
    # int8 weights are smaller than the float32 ones; a cacher changes no weight.
    assert rows["flux-int8wo"]["artifact_bytes"] < rows["flux-fora3"]["artifact_bytes"]
    assert rows["flux-fora3"]["artifact_bytes"] == rows["flux-first-block"]["artifact_bytes"]
    fused = rows["flux-fuse-qkv"]
    assert fused["identical"] or fused["psnr_db"] > 80  # fusion is exact up to rounding


@pytest.mark.timeout(300)
def test_quick_suite_writes_the_markdown_table(quick_run):
    report, table, _log = quick_run
    assert "| configuration | settings | device | median (s) | p90 (s) | speed-up |" in table
    for row in report["rows"]:
        assert f"| {row['config']} |" in table, row["config"]
    assert "error" not in table
