"""The cluster files in cluster/: launcher configs (AWS, GCP), the KubeRay RayJob, the guide's commands.

Offline: no cloud credentials, no Kubernetes, no Ray instance. The launcher configs go through Ray's own
``prepare_config`` (merges the provider's defaults.yaml, as ``ray up`` does first) and ``validate_config``
(ray/autoscaler/ray-schema.json plus Ray's cross-field checks). The RayJob is checked against the fields and rules
the KubeRay operator enforces (``testkit.rayjob.rayjob_problems``). Every check is also shown to reject a broken copy.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from testkit.rayjob import containers, rayjob_problems

from excb.cli import build_parser
from excb.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"

# Literal credentials that must never be committed (AWS key ids, PEM private keys, GCP service-account key files).
CREDENTIAL_PATTERNS = [r"\bAKIA[0-9A-Z]{16}\b", r"\bASIA[0-9A-Z]{16}\b", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                       r'"private_key_id"', r"aws_secret_access_key\s*[:=]\s*\S"]
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pins() -> dict[str, str]:
    """``name==version`` pins of pyproject.toml (extras dropped): torch, torchvision, ray."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


# ---------------------------------------------------------------------------------------------------------------
# every file parses


def test_cluster_folder_has_the_expected_files() -> None:
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"README.md", "aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml", "Dockerfile"} <= names


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_file_parses_to_a_mapping(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.iterdir() if p.is_file()), ids=lambda p: p.name)
def test_no_literal_credentials(path: Path) -> None:
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} holds something that looks like a credential ({pattern})"


# ---------------------------------------------------------------------------------------------------------------
# cluster-launcher configs: Ray's own validation + what excb needs


def validate_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does before it talks to the cloud: fill in the provider defaults, then validate.
    Raises jsonschema.ValidationError (schema) or ValueError/RuntimeError (Ray's cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """excb's own requirements on a launcher config, beyond Ray's schema."""
    problems = []
    provider = config.get("provider", {})
    kind = provider.get("type")
    for key in ("aws_credentials", "gcp_credentials"):
        if key in provider:
            problems.append(f"provider.{key}: credentials belong to instance profiles / service accounts")
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    head_res = types.get(head, {}).get("resources", {})
    if head_res.get("CPU") != 0 or head_res.get("GPU", 0) != 0:
        problems.append(f"head node type {head!r} must advertise CPU: 0 and no GPU (no training or decode there)")
    gpu_types, cpu_types = [], []
    for name, node in types.items():
        nc = node.get("node_config", {})
        if name != head:
            if node.get("max_workers", 0) < max(1, node.get("min_workers", 0)):
                problems.append(f"{name}: max_workers must be >= max(1, min_workers)")
            if kind == "aws" and "IamInstanceProfile" not in nc:
                problems.append(f"{name}: workers reach S3 through an IamInstanceProfile; none set")
            if kind == "gcp" and not any(sa.get("email") for sa in nc.get("serviceAccounts", [])):
                problems.append(f"{name}: workers reach GCS through a service account; none set")
        if kind == "aws":
            is_gpu = nc.get("InstanceType", "").split(".")[0] in AWS_GPU_FAMILIES
        else:
            gpus = node.get("resources", {}).get("GPU", 0)
            acc = sum(a.get("acceleratorCount", 0) for a in nc.get("guestAccelerators", []))
            if gpus != acc:
                problems.append(f"{name}: resources GPU={gpus} but guestAccelerators count {acc}")
            if acc and nc.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GPU instances need scheduling.onHostMaintenance: TERMINATE")
            is_gpu = gpus > 0
        if name != head:
            (gpu_types if is_gpu else cpu_types).append(name)
    if not gpu_types:
        problems.append("no GPU worker node type")
    if not cpu_types:
        problems.append("no CPU worker node type for Ray Data decoding")
    if kind == "aws" and "IamInstanceProfile" not in types.get(head, {}).get("node_config", {}):
        problems.append("head: no IamInstanceProfile (it launches instances and must PassRole the workers' one)")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name: str) -> None:
    prepared = validate_launcher_config(_load(CLUSTER / name))
    # prepare_config merged the common setup into the head's and workers' command lists
    assert any("pip install" in c and "/home/ray/excb" in c for c in prepared["worker_setup_commands"])
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_meets_excb_needs(name: str) -> None:
    assert launcher_problems(_load(CLUSTER / name)) == []


def _set(path: str, value: Any) -> Any:
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()


def _min_above_max(cfg: dict[str, Any]) -> None:
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    cfg["available_node_types"][worker]["min_workers"] = cfg["max_workers"] + 1
    cfg["available_node_types"][worker]["max_workers"] = cfg["max_workers"] + 1


RAY_REJECTS = {
    "typo in a top-level key": _set("max_worker", 3),
    "unknown key in a node type": _set("available_node_types.head.min_worker", 0),
    "node type without resources": _set("available_node_types.head.resources", _DELETE),
    "fractional resource": _set("available_node_types.head.resources", {"CPU": 0.5}),
    "head_node_type not a node type": _set("head_node_type", "no_such_type"),
    "min_workers above the global max_workers": _min_above_max,
    "unknown docker key": _set("docker.imagee", "rayproject/ray:2.60.0-py311-gpu"),
    "command not a string": _set("setup_commands", [["pip", "install", "excb"]]),
}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("mutation", sorted(RAY_REJECTS), ids=str)
def test_ray_validation_rejects_a_broken_launcher_config(name: str, mutation: str, tmp_path: Path) -> None:
    cfg = _load(CLUSTER / name)
    RAY_REJECTS[mutation](cfg)
    broken = tmp_path / name  # through a file, as `ray up` reads it
    broken.write_text(yaml.safe_dump(cfg))
    with pytest.raises((jsonschema.ValidationError, ValueError, RuntimeError)):
        validate_launcher_config(_load(broken))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("mutation,expected", [
    (_set("available_node_types.head.resources", {"CPU": 8}), "CPU: 0"),
    (lambda c: [c["available_node_types"].pop(n) for n in list(c["available_node_types"]) if "gpu" in n],
     "no GPU worker"),
    (lambda c: [c["available_node_types"].pop(n) for n in list(c["available_node_types"]) if n.startswith("cpu")],
     "no CPU worker"),
    (lambda c: c["provider"].update(aws_credentials={"aws_access_key_id": "x"}), "credentials"),
], ids=["head-has-cpus", "no-gpu-type", "no-cpu-type", "credentials-in-provider"])
def test_excb_checks_reject_a_broken_launcher_config(name: str, mutation: Any, expected: str) -> None:
    cfg = _load(CLUSTER / name)
    mutation(cfg)
    assert any(expected in p for p in launcher_problems(cfg)), launcher_problems(cfg)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_setup_installs_the_pinned_versions_and_this_checkout(name: str) -> None:
    cfg = _load(CLUSTER / name)
    setup = " ".join(cfg["setup_commands"])
    pins = _pins()
    for pkg in ("torch", "torchvision", "ray"):
        assert re.search(rf'"?{pkg}(\[[^\]]*\])?=={re.escape(pins[pkg])}"?', setup), f"{pkg}=={pins[pkg]} not pinned"
    assert f":{pins['ray']}-py311" in cfg["docker"]["image"]  # the container's Ray is the pinned one
    # the checkout is mounted where setup_commands install it from, and is this repository
    mounts = cfg["file_mounts"]
    installed = re.findall(r"pip install (?:-q )?(/\S+)", setup)
    assert installed and all(path in mounts for path in installed), (installed, mounts)
    for remote in installed:
        assert (ROOT / mounts[remote] / "pyproject.toml").exists()
    assert ".gitignore" in cfg.get("rsync_filter", [])  # .venv, data/, runs/ stay behind


def test_installed_ray_is_the_pinned_one() -> None:
    import ray

    assert ray.__version__ == _pins()["ray"]


# ---------------------------------------------------------------------------------------------------------------
# KubeRay RayJob


def test_rayjob_manifest_is_valid() -> None:
    assert rayjob_problems(_load(RAYJOB)) == []


def _remove_gpu_limits(doc: dict[str, Any]) -> None:
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in containers(group["template"]):
            for part in c.get("resources", {}).values():
                part.pop("nvidia.com/gpu", None)


def _literal_secret(doc: dict[str, Any]) -> None:
    c = containers(doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    c["env"] = [e for e in c["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    c["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"})


def _worker(field: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        if value is _DELETE:
            del group[field]
        else:
            group[field] = value
    return mutate


RAYJOB_BREAKS = {
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "wrong kind": (lambda d: d.update(kind="RayCluster"), "kind"),
    "name too long": (lambda d: d["metadata"].update(name="x" * 48), "metadata.name"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="Excb_Run"), "metadata.name"),
    "no entrypoint": (lambda d: d["spec"].pop("entrypoint"), "entrypoint"),
    "cluster kept": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    "negative ttl": (lambda d: d["spec"].update(ttlSecondsAfterFinished=-1), "ttlSecondsAfterFinished"),
    "runtime env not a mapping": (lambda d: d["spec"].update(runtimeEnvYAML="- a\n- b\n"), "runtimeEnvYAML"),
    "no rayClusterSpec": (lambda d: d["spec"].pop("rayClusterSpec"), "rayClusterSpec"),
    "head image missing": (lambda d: containers(d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
                           .pop("image"), "image"),
    "no worker groups": (lambda d: d["spec"]["rayClusterSpec"].update(workerGroupSpecs=[]), "workerGroupSpecs"),
    "groupName missing": (_worker("groupName", _DELETE), "groupName"),
    "minReplicas above replicas": (_worker("minReplicas", 3), "minReplicas <= replicas"),
    "replicas above maxReplicas": (_worker("replicas", 9), "minReplicas <= replicas"),
    "maxReplicas missing": (_worker("maxReplicas", _DELETE), "maxReplicas"),
    "rayStartParams missing": (_worker("rayStartParams", _DELETE), "rayStartParams"),
    "GPU group without GPU limits": (_remove_gpu_limits, "nvidia.com/gpu"),
    "literal secret": (_literal_secret, "secretKeyRef"),
}


@pytest.mark.parametrize("case", sorted(RAYJOB_BREAKS), ids=str)
def test_rayjob_check_rejects_a_broken_manifest(case: str) -> None:
    mutate, expected = RAYJOB_BREAKS[case]
    doc = _load(RAYJOB)
    mutate(doc)
    problems = rayjob_problems(doc)
    assert any(expected in p for p in problems), problems


def test_rayjob_storage_credentials_come_from_a_secret_on_every_container() -> None:
    doc = _load(RAYJOB)
    cluster = doc["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in containers(group["template"]):
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs), c["name"]


def test_rayjob_head_does_no_work_and_versions_match() -> None:
    doc = _load(RAYJOB)
    cluster = doc["spec"]["rayClusterSpec"]
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus")) == "0"
    assert cluster["rayVersion"] == _pins()["ray"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_pins()['ray']}-py311-gpu" in dockerfile
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={_pins()[pkg]}" in dockerfile
    # the runtime env's working_dir is where the Dockerfile puts the checkout
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] in dockerfile


# ---------------------------------------------------------------------------------------------------------------
# the excb command lines in the manifest and the guide


def _excb_argv(command: str) -> list[str]:
    """The arguments after ``excb`` in a shell command line (``ray job submit ... -- excb ...`` included)."""
    tokens = shlex.split(command, comments=True)
    starts = [i for i, t in enumerate(tokens) if t == "excb" or t.endswith("/excb")]
    assert starts, f"no excb command in {command!r}"
    return tokens[starts[0] + 1:]


def check_excb_command(command: str) -> None:
    """The command parses with excb's own parser, names files that exist, and its config and overrides load."""
    args = build_parser().parse_args(_excb_argv(command))
    assert args.command == "pretrain", command
    assert args.storage_path.split("://")[0] in ("s3", "gs"), "cluster runs write to object storage"
    assert args.name, "a fixed --name is what makes a re-submitted run resume"
    assert args.config and (ROOT / args.config).is_file(), f"{args.config} is not a file of this repository"
    load_config(ROOT / args.config, args.overrides)  # validates every key and value


def test_rayjob_entrypoint_is_a_valid_excb_command() -> None:
    check_excb_command(_load(RAYJOB)["spec"]["entrypoint"])


def _guide_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            if re.search(r"(^|\s)excb pretrain\s", cmd):
                commands.append(cmd)
    return commands


def test_guide_excb_commands_are_valid() -> None:
    commands = _guide_commands()
    assert any("ray job submit" in c for c in commands)
    for cmd in commands:
        if "experiments/" in cmd:  # the existing-cluster example uses experiments/fashion_mnist.yaml too
            check_excb_command(cmd)


@pytest.mark.parametrize("command,error", [
    ("excb pretrian --config experiments/imagenet_resnet50_ep400.yaml", SystemExit),
    ("excb pretrain --config experiments/no_such_recipe.yaml --name a --storage-path s3://b/r", AssertionError),
    ("excb pretrain --config experiments/imagenet_resnet50_ep400.yaml --name a --storage-path runs", AssertionError),
    ("excb pretrain --config experiments/imagenet_resnet50_ep400.yaml --name a --storage-path s3://b/r "
     "train.epoch=3", Exception),
])
def test_excb_command_check_rejects_a_broken_command(command: str, error: type[BaseException]) -> None:
    with pytest.raises(error):
        check_excb_command(command)


def test_guide_names_the_files_and_steps() -> None:
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up", "ray job submit", "--working-dir .", "ray job logs", "ray down", "kubectl apply",
                   "kubectl get rayjob", "kubectl delete", "cluster/aws.yaml", "cluster/gcp.yaml",
                   "cluster/kuberay-rayjob.yaml", "cluster/Dockerfile", "secretKeyRef", "Resume"):
        assert needle in text, needle
