"""Scaling settings ([serve], recorded as runtime.serve), the KubeRay RayService, and Ray staying optional.

None of this needs a Ray cluster; the Serve config is checked with Ray's own schema when Ray is
installed. The cluster tests are in test_ray.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from smash_runtime.errors import SettingsError
from smash_runtime.server.scaling import ServeSettings, serve_settings_from_dict

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "rayservice.ray.io-v1.schema.json").read_text())
TINY = '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n\n[runtime.warmup]\nshapes = [{ height = 32, width = 32, steps = 1 }]\n'


def smash_build(*args, cwd=None):
    """The real ``smash-build`` command, in process (click's runner): ``.exit_code``, ``.stderr``."""
    from click.testing import CliRunner

    from smash_build.cli import main

    with pytest.MonkeyPatch.context() as mp:
        if cwd is not None:
            mp.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    root = tmp_path_factory.mktemp("scaling")
    (root / "tiny.toml").write_text(TINY + "\n[serve]\nmin_replicas = 1\nmax_replicas = 6\nnum_gpus = 0.5\n")
    return build(load_manifest(root / "tiny.toml"), out_dir=root / "tiny-flux").artifact.path


# --------------------------------------------------------------------------------------------
# [serve]


def test_serve_table_is_recorded_with_defaults(artifact):
    recorded = json.loads((artifact / "smash.json").read_text())["runtime"]["serve"]
    assert recorded == ServeSettings(min_replicas=1, max_replicas=6, num_gpus=0.5).record()
    assert recorded["max_ongoing_requests"] == 4 and recorded["replicas"] is None


@pytest.mark.parametrize("table, key, words", [
    ("replicas = 0", "serve.replicas", "greater than or equal to 1"),
    ("replicas = 2\nmax_replicas = 4", "serve.replicas", "not both"),
    ("min_replicas = 5\nmax_replicas = 2", "serve.min_replicas", "at most max_replicas (2)"),
    ("max_ongoing_requests = \"4\"", "serve.max_ongoing_requests", "valid integer"),
    ("num_gpu = 1", "serve.num_gpu", "did you mean 'num_gpus'?"),
    ("threads = 0", "serve.threads", "greater than or equal to 1"),
])
def test_bad_serve_table_exits_2_and_writes_nothing(tmp_path, table, key, words):
    (tmp_path / "m.toml").write_text(TINY + f"\n[serve]\n{table}\n")
    result = smash_build("m.toml", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert f"{key} = " in result.stderr and words in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]


def test_flags_override_the_recorded_settings():
    recorded = serve_settings_from_dict({"replicas": 3, "max_ongoing_requests": 2})
    to_autoscaling = serve_settings_from_dict({"max_replicas": 8}, base=recorded)
    assert (to_autoscaling.replicas, to_autoscaling.max_replicas, to_autoscaling.max_ongoing_requests) == (None, 8, 2)
    options = to_autoscaling.deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 2.0}
    assert "num_replicas" not in options
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}
    fixed = serve_settings_from_dict({"replicas": 2}, base=to_autoscaling).deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    with pytest.raises(SettingsError, match="max_replicas"):
        serve_settings_from_dict({"min_replicas": 2})
    assert ServeSettings(num_cpus=2).torch_threads == 2 and ServeSettings(num_cpus=0.5).torch_threads == 1


# --------------------------------------------------------------------------------------------
# KubeRay


def _deploy(artifact, tmp_path, *extra) -> dict:
    out = tmp_path / "rayservice.yaml"
    result = smash_build("deploy", artifact, "--image", "registry.example.com/smash/tiny-flux:1", "--kuberay",
                         "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    return yaml.safe_load(out.read_text())


def test_rayservice_validates_and_carries_the_scaling_settings(artifact, tmp_path):
    doc = _deploy(artifact, tmp_path, "--compile-cache-claim", "smash-cache")
    jsonschema.validate(doc, SCHEMA)
    cluster = doc["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"][0]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 6) and cluster["enableInTreeAutoscaling"]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # 0.5 GPU per replica: a whole GPU per pod
    assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
    assert worker["volumeMounts"] == [{"name": "compile-cache", "mountPath": "/opt/smash/compile-cache"}]
    assert workers["template"]["spec"]["volumes"] == [
        {"name": "compile-cache", "persistentVolumeClaim": {"claimName": "smash-cache"}}]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    deployment = config["applications"][0]["deployments"][0]
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 2.0}
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert config["applications"][0]["import_path"] == "smash_runtime.server.ray_serve:build_app"


def test_fixed_replicas_and_set_overrides(artifact, tmp_path):
    doc = _deploy(artifact, tmp_path, "--set", "replicas=3", "--set", "num_gpus=0", "--name", "flux-fast")
    jsonschema.validate(doc, SCHEMA)
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (3, 3, 3)
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert workers["template"]["spec"]["volumes"] == [{"name": "compile-cache", "emptyDir": {}}]
    assert doc["metadata"]["name"] == "flux-fast"


def test_the_schema_is_not_vacuous(artifact, tmp_path):
    doc = _deploy(artifact, tmp_path)
    broken = [
        lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        lambda d: d["spec"]["rayClusterConfig"].pop("headGroupSpec"),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="3"),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(groupname="x"),
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .update(resources={"limits": {"cpu": "one"}}),
    ]
    for mutate in broken:
        copy = json.loads(json.dumps(doc))
        mutate(copy)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(copy, SCHEMA)


def test_serve_config_passes_rays_own_schema_and_builds(artifact, tmp_path):
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from smash_runtime.server.ray_serve import build_app

    config = yaml.safe_load(_deploy(artifact, tmp_path)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    args = {**config["applications"][0]["args"], "artifact": str(artifact)}  # the image's path is not here
    app = build_app(args)
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize("extra, words", [
    (("--set", "replicas=0"), "replicas = 0"),
    (("--name", "Not_A_Label"), "name = 'Not_A_Label'"),
    (("--memory", "lots"), "memory = 'lots'"),
])
def test_bad_deploy_settings_exit_2_and_write_nothing(artifact, tmp_path, extra, words):
    out = tmp_path / "rayservice.yaml"
    result = smash_build("deploy", artifact, "--image", "x:1", "--kuberay", "-o", out, *extra)
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Ray stays optional


def _without_ray(code: str) -> subprocess.CompletedProcess:
    # sys.modules["ray"] = None makes every `import ray...` fail as if Ray were not installed.
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None\n" + code],
                          capture_output=True, text=True, timeout=300)


def test_plain_server_and_builder_never_import_ray():
    result = _without_ray(
        "import smash_runtime.server.app, smash_runtime.server.cli, smash_runtime.server.scaling\n"
        "import smash_build.cli, smash_build.exporters.kuberay\n"
        "from smash_runtime.server.cli import build_parser\n"
        "assert build_parser().parse_args(['x']).ray is False\n"
        "print('ok')"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_ray_flag_without_ray_names_the_extra(artifact):
    result = _without_ray(f"from smash_runtime.server.cli import main\nmain([{str(artifact)!r}, '--ray'])")
    assert result.returncode == 2, result.stderr
    assert "pip install 'smash-runtime[ray]'" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# the image as a Ray node


def test_with_ray_refuses_a_wheelhouse_without_ray(artifact, tmp_path):
    from smash_build.exporters.image import write_build_context
    from smash_build.exporters.lock import Wheelhouse

    lock = tmp_path / "wheels" / "requirements.lock"
    lock.parent.mkdir()
    lock.write_text("# smash-build wheelhouse lock\nfastapi==0.165.0 \\\n    --hash=sha256:00\n")
    plain = Wheelhouse(path=lock.parent, lock=lock, pip_wheel=lock.parent / "pip.whl",
                       runtime_wheel=lock.parent / "smash_runtime.whl", variant="cpu", python_version="3.11")
    with pytest.raises(SettingsError, match="locks ray"):
        write_build_context(artifact, tmp_path / "ctx", wheelhouse=plain, with_ray=True)
    assert not (tmp_path / "ctx").exists()


@pytest.mark.slow
def test_image_context_with_ray_locks_ray_serve(artifact, tmp_path):
    """The real resolve (about a minute here): Ray and its Serve dependencies join the hash lock."""
    result = smash_build("image", artifact, "--with-ray", "--context-only", tmp_path / "ctx")
    assert result.exit_code == 0, result.stderr
    lock = (tmp_path / "ctx" / "wheelhouse" / "deps" / "requirements.lock").read_text()
    names = {line.split("==")[0] for line in lock.splitlines() if "==" in line}
    assert {"ray", "fastapi", "uvicorn", "torch"} <= names
    assert "ray==2.60.0 " in lock and all("--hash=sha256:" in line for line in lock.splitlines() if line.startswith("    "))
