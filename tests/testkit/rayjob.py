"""A validator of KubeRay RayJob manifests: the fields and rules the KubeRay operator (v1 CRD and its
``ValidateRayJob*`` checks) enforces, plus this project's own (GPU workers, secrets from secretKeyRef)."""

from __future__ import annotations

import re
from typing import Any

import yaml

SECRET_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _gpu_limit(container: dict[str, Any]) -> Any:
    return ((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")


def rayjob_problems(doc: dict[str, Any]) -> list[str]:
    """Problems KubeRay (v1 CRD and the operator's ValidateRayJob*) or this project would reject; [] = fine."""
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "RayJob":
        problems.append(f"kind must be RayJob, got {doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name") or ""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 47:
        problems.append(f"metadata.name must be a DNS-1035 label of at most 47 characters, got {name!r}")
    spec = doc.get("spec") or {}
    if not str(spec.get("entrypoint") or "").strip():
        problems.append("spec.entrypoint is empty")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true (the cluster exists for this run only)")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not isinstance(ttl, int) or ttl < 0:
        problems.append("spec.ttlSecondsAfterFinished must be a non-negative integer")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("spec.backoffLimit must be >= 0")
    if "runtimeEnvYAML" in spec:
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            env = e
        if not isinstance(env, dict):
            problems.append("spec.runtimeEnvYAML must be a YAML mapping")
    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return problems + ["spec.rayClusterSpec is missing (this manifest creates its own cluster)"]

    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    workers = cluster.get("workerGroupSpecs") or []
    if not workers:
        problems.append("spec.rayClusterSpec.workerGroupSpecs is empty")
    seen = set()
    for i, group in enumerate(workers):
        where = f"workerGroupSpecs[{i}]"
        gname = group.get("groupName")
        if not gname:
            problems.append(f"{where}.groupName is missing")
        elif gname in seen:
            problems.append(f"{where}.groupName {gname!r} is used twice")
        seen.add(gname)
        reps = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        if not all(isinstance(v, int) and v >= 0 for v in reps.values()):
            problems.append(f"{where}: replicas, minReplicas, maxReplicas must be integers >= 0, got {reps}")
        elif not reps["minReplicas"] <= reps["replicas"] <= reps["maxReplicas"] or reps["maxReplicas"] < 1:
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas and maxReplicas >= 1, got {reps}")
        groups.append((where, group))

    gpu_groups = []
    for where, group in groups:
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{where}.rayStartParams must be a mapping (may be empty)")
        group_containers = containers(group.get("template"))
        if not group_containers:
            problems.append(f"{where}.template.spec.containers is empty")
        for c in group_containers:
            if not c.get("name") or not c.get("image"):
                problems.append(f"{where}: every container needs a name and an image")
            limit, request = _gpu_limit(c), ((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu")
            if limit is not None:
                gpu_groups.append(where)
                if not isinstance(limit, int) or limit < 1:
                    problems.append(f"{where}: nvidia.com/gpu limit must be a positive integer, got {limit!r}")
            if request is not None and request != limit:
                problems.append(f"{where}: nvidia.com/gpu requests must equal the limits")
            for env in c.get("env") or []:
                if SECRET_ENV.search(env.get("name", "")):
                    if "value" in env or "secretKeyRef" not in (env.get("valueFrom") or {}):
                        problems.append(f"{where}: env {env.get('name')} must come from a secretKeyRef")
        if where != "headGroupSpec" and "gpu" in str(group.get("groupName", "")).lower() and where not in gpu_groups:
            problems.append(f"{where} ({group.get('groupName')}) is a GPU group without nvidia.com/gpu limits")
    if not gpu_groups:
        problems.append("no worker group has nvidia.com/gpu limits")
    if "headGroupSpec" in gpu_groups:
        problems.append("the head requests GPUs; training runs on the worker groups")
    return problems
