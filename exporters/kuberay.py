"""A KubeRay ``RayService`` (``ray.io/v1``) that serves an artifact's image on Kubernetes.

    >>> from smash_build.exporters.kuberay import rayservice_manifest
    >>> doc = rayservice_manifest("dist/tiny-flux", image="registry.example.com/smash/tiny-flux:1")
    >>> doc["kind"], doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    ('RayService', 'replicas')

The image is one from ``smash-build image ART --with-ray``: the artifact sits at
``/opt/smash/artifact`` and Ray is installed next to smash-runtime, so KubeRay can start it as
a Ray node. Each worker pod is sized for one Serve replica (the ``[serve]`` settings recorded in
``smash.json``: ``num_cpus``, ``num_gpus``); the head runs Serve's controller and a proxy but no
replica (``num-cpus: 0``). The Serve config names
``smash_runtime.server.ray_serve:build_app`` with the scaling settings, so the deployment runs
exactly what ``smash-serve --ray`` runs. Worker pods turn ready on the app's ``/ready``. The
compile cache is a volume (a PersistentVolumeClaim when one is named, else an ``emptyDir``)
mounted where the image's ``SMASH_COMPILE_CACHE`` points.

Follows the KubeRay API reference for ``ray.io/v1`` (KubeRay v1.3/v1.4: ``RayServiceSpec``,
``RayClusterSpec``, ``HeadGroupSpec``, ``WorkerGroupSpec``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from smash_runtime.errors import SettingsError
from smash_runtime.format import read_record
from smash_runtime.server.scaling import ServeSettings, serve_settings_from_dict

API_VERSION = "ray.io/v1"
KUBERAY_VERSION = "v1.4"
RAY_VERSION = "2.60.0"
ARTIFACT_PATH = "/opt/smash/artifact"
COMPILE_CACHE_PATH = "/opt/smash/compile-cache"
SERVE_PORT = 8000
# Serve's proxies load the app's error shape from this callback (smash_runtime.server.ray_serve).
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "smash_runtime.server.ray_serve.proxy_middlewares"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def rayservice_manifest(
    artifact_dir: str | os.PathLike,
    *,
    image: str,
    name: str | None = None,
    scaling: dict[str, Any] | None = None,
    compile_cache_claim: str | None = None,
    memory: str = "8Gi",
) -> dict[str, Any]:
    """The RayService document for ``artifact_dir`` served from ``image``.

    ``scaling`` overrides the artifact's recorded ``runtime.serve`` (flag names of
    :class:`~smash_runtime.server.scaling.ServeSettings`); ``compile_cache_claim`` names an
    existing PersistentVolumeClaim for the compile cache (default: an ``emptyDir`` per pod);
    ``memory`` is each pod's memory request and limit.

    Raises:
        SettingsError: a bad name, image, memory quantity or scaling setting (nothing is written).
        ArtifactError: ``artifact_dir`` is not an artifact.
    """
    record = read_record(artifact_dir)
    recorded = record.runtime_settings.serve or {}
    settings = serve_settings_from_dict(scaling or {}, base=serve_settings_from_dict(recorded))
    name = name or _dns_name(record.name or Path(artifact_dir).resolve().name)
    if not _DNS_LABEL.match(name):
        raise SettingsError("name", name, "a DNS label: lower-case letters, digits and '-', at most 63 characters")
    if not image or any(c.isspace() for c in image):
        raise SettingsError("image", image, "an image reference such as registry.example.com/team/model:v1")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?", memory):
        raise SettingsError("memory", memory, "a Kubernetes quantity such as 8Gi")
    if compile_cache_claim is not None and not _DNS_LABEL.match(compile_cache_claim):
        raise SettingsError("compile_cache_claim", compile_cache_claim, "the name of a PersistentVolumeClaim")

    volume = ({"name": "compile-cache", "persistentVolumeClaim": {"claimName": compile_cache_claim}}
              if compile_cache_claim else {"name": "compile-cache", "emptyDir": {}})
    labels = {"app.kubernetes.io/name": "smash-serve", "app.kubernetes.io/instance": name}
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serveConfigV2": _yaml(serve_config(settings)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": settings.autoscaling,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(image, "ray-head", volume, labels, memory, cpus=1.0, gpus=0, head=True),
                },
                "workerGroupSpecs": [_workers(settings, image, volume, labels, memory)],
            },
        },
    }


def serve_config(settings: ServeSettings) -> dict[str, Any]:
    """The Serve config (``serveConfigV2``): one application, its deployment's scaling settings."""
    deployment = {"name": "SmashImages", **settings.deployment_options()}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{
            "name": "smash",
            "route_prefix": "/",
            "import_path": "smash_runtime.server.ray_serve:build_app",
            "args": {"artifact": ARTIFACT_PATH, "compile_cache": COMPILE_CACHE_PATH, "serve": settings.record()},
            "deployments": [deployment],
        }],
    }


def _workers(settings: ServeSettings, image: str, volume: dict, labels: dict, memory: str) -> dict[str, Any]:
    # One worker pod per replica: the autoscaler adds pods as Serve adds replicas.
    if settings.autoscaling:
        low = 1 if settings.min_replicas is None else settings.min_replicas
        counts = {"replicas": low, "minReplicas": low, "maxReplicas": settings.max_replicas}
    else:
        n = settings.replicas or 1
        counts = {"replicas": n, "minReplicas": n, "maxReplicas": n}
    return {
        "groupName": "replicas",
        **counts,
        "rayStartParams": {},
        "template": _pod(image, "ray-worker", volume, labels, memory, cpus=max(settings.num_cpus, 1.0),
                         gpus=math.ceil(settings.num_gpus), head=False),
    }


def _pod(image: str, container: str, volume: dict, labels: dict, memory: str, *, cpus: float, gpus: int,
         head: bool) -> dict[str, Any]:
    resources = {"cpu": _cpu(cpus), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    ports = [{"containerPort": SERVE_PORT, "name": "serve"}]
    if head:
        ports += [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    # Probes given here replace KubeRay's defaults, which call wget (not in the slim image).
    if head:
        readiness = {"httpGet": {"path": "/api/gcs_healthz", "port": 8265}, "periodSeconds": 5, "failureThreshold": 10}
        liveness = {"httpGet": {"path": "/api/gcs_healthz", "port": 8265}, "periodSeconds": 10,
                    "initialDelaySeconds": 30, "failureThreshold": 120}
    else:
        readiness = {"httpGet": {"path": "/ready", "port": SERVE_PORT}, "periodSeconds": 5, "failureThreshold": 1}
        liveness = {"httpGet": {"path": "/api/local_raylet_healthz", "port": 52365}, "periodSeconds": 10,
                    "initialDelaySeconds": 30, "failureThreshold": 120}
    env = [{"name": k, "value": v} for k, v in {**PROXY_ENV, "SMASH_COMPILE_CACHE": COMPILE_CACHE_PATH}.items()]
    return {
        "metadata": {"labels": labels},
        "spec": {
            "containers": [{
                "name": container,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "env": env,
                "ports": ports,
                "resources": {"requests": dict(resources), "limits": dict(resources)},
                "readinessProbe": readiness,
                "livenessProbe": liveness,
                "volumeMounts": [{"name": "compile-cache", "mountPath": COMPILE_CACHE_PATH}],
            }],
            "volumes": [volume],
        },
    }


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower()).strip("-")[:63].strip("-")
    return name or "smash"


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def dump_rayservice(doc: dict[str, Any]) -> str:
    """YAML text of the document (``serveConfigV2`` as a block scalar, as KubeRay's samples write it)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # repeated label maps are written out, not as &anchors
            return True

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, text)
    header = (f"# RayService for KubeRay {KUBERAY_VERSION} ({API_VERSION}), written by smash-build deploy.\n"
              "# Apply: kubectl apply -f THIS_FILE  (needs the KubeRay operator; see docs/ray.md)\n")
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
