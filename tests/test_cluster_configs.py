"""The cluster files in cluster/: launcher configs (AWS, GCP), the KubeRay RayJob, the guide's commands.

Offline: no cloud credentials, no Kubernetes, no Ray instance. The launcher configs go through Ray's own
``prepare_config`` (merges the provider's defaults.yaml, as ``ray up`` does first) and ``validate_config``
(ray/autoscaler/ray-schema.json plus Ray's cross-field checks). The RayJob is checked against the fields and rules
the KubeRay operator enforces (``testkit.rayjob.rayjob_problems``). All three run the project image built from
cluster/Dockerfile: the torch CUDA build it pins is checked against the NVIDIA driver of each GPU host image (a small
table, ``HOST_DRIVER`` / ``MIN_DRIVER``), no node pip-installs torch or Ray, and Ray's token authentication is on.
Every check is also shown to reject a broken copy.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
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
    # prepare_config merged the common setup into the head's and workers' command lists: the workers install nothing
    assert prepared["worker_setup_commands"] == []
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
# the project image: the torch CUDA build it carries against the hosts' NVIDIA driver, no per-node installs, tokens

DOCKERFILE = CLUSTER / "Dockerfile"
# NVIDIA driver branch (major) of each host image a config may name. Sources in cluster/README.md, "GPU driver and
# CUDA". A config naming an image missing here fails the check until its driver is looked up and added.
HOST_DRIVER = {
    # AWS Deep Learning Base OSS NVIDIA Driver GPU AMI (Ubuntu 22.04), newest release through SSM: the 580 branch or
    # newer (595.91.07 in release 20260929); "latest" only moves forward
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id": 580,
    # GCP Deep Learning VM image families; the family name ends in the driver branch
    "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2204-nvidia-580": 580,
    "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570": 570,
}
# Minimum NVIDIA driver for each torch CUDA build (NVIDIA's CUDA compatibility table: CUDA 12.x runs on >= 525
# through minor-version compatibility, CUDA 13.x needs >= 580).
MIN_DRIVER = {"cu126": 525, "cu128": 525, "cu129": 525, "cu130": 580, "cu132": 580}
# The build `pip install torch==VERSION` gets from PyPI on Linux x86_64 (2.14.1: the CUDA 13.0 build, as this
# project's .venv shows: torch.__version__ == "2.14.1+cu130").
PYPI_TORCH_BUILD = {"2.14.1": "cu130"}
STACK = {"torch", "torchvision", "ray"}


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def is_project_image(image: str) -> bool:
    """REGISTRY/excb:VERSION, the image built from cluster/Dockerfile for this version of the project."""
    return "/" in image and image.rsplit("/", 1)[-1] == f"excb:{_project_version()}"


def _dockerfile_runs(text: str) -> str:
    """The Dockerfile's RUN instructions, continuation lines joined, ARG defaults substituted."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    runs = " ".join(line[4:] for line in re.sub(r"\\\n", " ", text).splitlines() if line.startswith("RUN "))
    for key, value in args.items():
        runs = runs.replace("${%s}" % key, value)
    return runs


def torch_build(dockerfile: str) -> tuple[str, list[str]]:
    """The CUDA build of torch a Dockerfile installs ("cu126", ...), and what is wrong with how it is pinned."""
    runs, pins, problems = _dockerfile_runs(dockerfile), _pins(), []
    torch = re.search(r"(?<![\w-])torch==([0-9][\w.]*)(?:\+(\w+))?", runs)
    if not torch:
        return "", ["torch is not pinned (torch==VERSION) in the Dockerfile"]
    version, label = torch.groups()
    if version != pins["torch"]:
        problems.append(f"torch=={version} in the Dockerfile, {pins['torch']} in pyproject.toml")
    index = re.search(r"--(?:extra-)?index-url[= ]\"?https://download\.pytorch\.org/whl/(\w+)", runs)
    if label:
        build = label
        if not index or index.group(1) != label:
            problems.append(f"torch+{label} is on https://download.pytorch.org/whl/{label}, which pip is not given")
    elif index:
        build = index.group(1)
    else:
        build = PYPI_TORCH_BUILD.get(version, "")
        if not build:
            problems.append(f"which CUDA build PyPI serves for torch {version} is not in PYPI_TORCH_BUILD")
    vision = re.search(r"(?<![\w-])torchvision==([0-9][\w.]*)(?:\+(\w+))?", runs)
    if not vision or vision.group(1) != pins["torchvision"]:
        problems.append(f"torchvision is not pinned to {pins['torchvision']} in the Dockerfile")
    elif vision.group(2) != label:
        problems.append(f"torchvision build {vision.group(2)} differs from torch's {label}")
    if build and build not in MIN_DRIVER:
        problems.append(f"no minimum NVIDIA driver known for the torch build {build!r}")
    return build, problems


def installs_stack(command: str) -> list[str]:
    """The torch / torchvision / ray requirements a shell command pip-installs."""
    found = []
    for part in re.split(r"&&|\|\||;", command):
        tokens = shlex.split(part, comments=True)
        at = next((i for i, t in enumerate(tokens[:-1]) if t.endswith(("pip", "pip3")) and tokens[i + 1] == "install"),
                  None)
        for tok in tokens[at + 2:] if at is not None else []:
            name = re.match(r"[A-Za-z0-9_.-]*", tok).group(0).lower()
            if not tok.startswith(("-", "/", ".", "~")) and "://" not in tok and name in STACK:
                found.append(tok)
    return found


def _is_gpu_node(kind: str, node: dict[str, Any]) -> bool:
    nc = node.get("node_config", {})
    if kind == "aws":
        return nc.get("InstanceType", "").split(".")[0] in AWS_GPU_FAMILIES
    return node.get("resources", {}).get("GPU", 0) > 0 or bool(nc.get("guestAccelerators"))


def host_image(node: dict[str, Any]) -> str:
    """The VM image of a launcher node type: the AWS ImageId, or the GCP boot disk's sourceImage."""
    nc = node.get("node_config", {})
    if "ImageId" in nc:
        return nc["ImageId"]
    boot = [d for d in nc.get("disks", []) if d.get("boot")]
    return boot[0].get("initializeParams", {}).get("sourceImage", "") if boot else ""


def driver_problems(config: dict[str, Any], build: str) -> list[str]:
    """GPU node types whose host image's NVIDIA driver is older than the torch CUDA build needs (or unknown)."""
    need, problems = MIN_DRIVER.get(build), []
    if need is None:
        return [f"no minimum NVIDIA driver known for the torch build {build!r}"]
    kind = config.get("provider", {}).get("type", "")
    for name, node in config.get("available_node_types", {}).items():
        if not _is_gpu_node(kind, node):
            continue
        image = host_image(node)
        driver = HOST_DRIVER.get(image)
        if driver is None:
            problems.append(f"{name}: the NVIDIA driver of host image {image!r} is unknown (not in HOST_DRIVER)")
        elif driver < need:
            problems.append(f"{name}: host image {image!r} has NVIDIA driver {driver}, torch {build} needs >= {need}")
    return problems


def image_problems(config: dict[str, Any]) -> list[str]:
    """Launcher config: every node runs the project image, nothing reinstalls torch/Ray, token auth is on."""
    docker, problems = config.get("docker") or {}, []
    images = {key: docker[key] for key in ("image", "head_image", "worker_image") if docker.get(key)}
    if not images:
        problems.append("no docker image: the hosts would need torch, Ray and excb installed")
    for key, image in images.items():
        if not is_project_image(image):
            problems.append(f"docker.{key} {image!r} is not the project image (REGISTRY/excb:{_project_version()})")
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in config.get(key) or []:
            if stack := installs_stack(command):
                problems.append(f"{key} installs {stack} at every node start; the project image has them")
    options = " ".join(docker.get("run_options") or [])
    if not re.search(r"(--env[= ]|-e )RAY_AUTH_MODE=token\b", options):
        problems.append("docker.run_options do not set RAY_AUTH_MODE=token for the containers")
    if (config.get("file_mounts") or {}).get("~/.ray") != "~/.ray":
        problems.append("file_mounts do not sync ~/.ray (the Ray auth token) to the nodes")
    return problems


def rayjob_image_problems(doc: dict[str, Any]) -> list[str]:
    """RayJob: every container runs the project image, the job installs no packages, token auth is on."""
    spec = doc.get("spec") or {}
    cluster, problems = spec.get("rayClusterSpec") or {}, []
    for group in [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]:
        for c in containers(group.get("template")):
            if not is_project_image(str(c.get("image", ""))):
                problems.append(f"{group.get('groupName', 'head')}: image {c.get('image')!r} is not the project image")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    for key in ("pip", "uv", "conda"):
        if runtime_env.get(key):
            problems.append(f"runtimeEnvYAML.{key} installs packages for every job; the project image has them")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append("rayClusterSpec.authOptions.mode is not token (Ray token authentication off)")
    return problems


def test_dockerfile_pins_a_torch_build_with_a_known_driver_floor() -> None:
    build, problems = torch_build(DOCKERFILE.read_text())
    assert problems == []
    assert build in MIN_DRIVER


@pytest.mark.parametrize("old,new,expected", [
    ('ARG TORCH_CUDA=cu126', 'ARG TORCH_CUDA=cu999', "no minimum NVIDIA driver"),
    ('--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" ', '', "which pip is not given"),
    ('"torchvision==0.29.1+${TORCH_CUDA}"', '"torchvision==0.29.1"', "torchvision build"),
    ('"torch==2.14.1+${TORCH_CUDA}"', '"torch"', "torch is not pinned"),
    ('"torch==2.14.1+${TORCH_CUDA}"', '"torch==2.13.0+${TORCH_CUDA}"', "in pyproject.toml"),
], ids=["unknown-build", "label-without-its-index", "torchvision-other-build", "torch-unpinned", "other-version"])
def test_dockerfile_check_rejects_a_broken_copy(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    _, problems = torch_build(text.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_torch_from_pypi_is_the_cuda13_build() -> None:
    """Without the PyTorch index the Dockerfile would get PyPI's torch 2.14.1: the CUDA 13.0 build."""
    text = DOCKERFILE.read_text()
    pypi = text.replace('--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" ', "").replace(
        "+${TORCH_CUDA}", "")
    assert torch_build(pypi) == ("cu130", [])
    # the .venv's torch, installed from PyPI (its distribution version has no +label), is that build (read from
    # torch/version.py without importing torch, which takes seconds)
    spec = importlib.util.find_spec("torch")
    installed = importlib.metadata.version("torch")
    if spec and spec.origin and installed in PYPI_TORCH_BUILD:
        text = (Path(spec.origin).parent / "version.py").read_text()
        cuda = re.search(r"^cuda\b.*?=\s*'([\d.]+)'", text, re.MULTILINE)
        assert cuda and "cu" + cuda.group(1).replace(".", "") == PYPI_TORCH_BUILD[installed], text


def test_host_driver_table_agrees_with_the_family_names() -> None:
    for image, driver in HOST_DRIVER.items():
        if m := re.search(r"-nvidia-(\d+)$", image):
            assert int(m.group(1)) == driver, image


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_gpu_hosts_have_the_driver_the_image_needs(name: str) -> None:
    build, _ = torch_build(DOCKERFILE.read_text())
    cfg = _load(CLUSTER / name)
    assert driver_problems(cfg, build) == []
    assert any(_is_gpu_node(cfg["provider"]["type"], n) for n in cfg["available_node_types"].values())


def _pypi_build() -> str:
    text = DOCKERFILE.read_text().replace('--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" ', "")
    return torch_build(text.replace("+${TORCH_CUDA}", ""))[0]


def _gcp_driver_570(cfg: dict[str, Any]) -> None:
    for node in cfg["available_node_types"].values():
        for disk in node["node_config"].get("disks", []):
            disk["initializeParams"]["sourceImage"] = disk["initializeParams"]["sourceImage"].replace(
                "common-cu129-ubuntu-2204-nvidia-580", "common-cu128-ubuntu-2204-nvidia-570")


def _aws_unknown_ami(cfg: dict[str, Any]) -> None:
    cfg["available_node_types"]["gpu_g5_12xlarge"]["node_config"]["ImageId"] = "ami-0123456789abcdef0"


@pytest.mark.parametrize("name,mutate,build,expected", [
    # the defect of issue 12: GCP's driver-570 family with PyPI's torch 2.14.1 (CUDA 13)
    ("gcp.yaml", _gcp_driver_570, "pypi", "needs >= 580"),
    ("aws.yaml", _aws_unknown_ami, "image", "unknown"),
    ("gcp.yaml", lambda cfg: None, "cu999", "no minimum NVIDIA driver"),
], ids=["gcp-570-with-cuda13-torch", "aws-unknown-ami", "unknown-build"])
def test_driver_check_rejects_a_broken_copy(name: str, mutate: Any, build: str, expected: str) -> None:
    cfg = _load(CLUSTER / name)
    mutate(cfg)
    build = {"pypi": _pypi_build(), "image": torch_build(DOCKERFILE.read_text())[0]}.get(build, build)
    problems = driver_problems(cfg, build)
    assert any(expected in p for p in problems), problems


def test_the_image_build_also_runs_on_the_old_gcp_driver() -> None:
    """Why the image carries the CUDA 12.6 build: it would start even on the driver-570 family."""
    cfg = _load(CLUSTER / "gcp.yaml")
    _gcp_driver_570(cfg)
    assert driver_problems(cfg, torch_build(DOCKERFILE.read_text())[0]) == []


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_run_the_project_image_with_token_auth(name: str) -> None:
    assert image_problems(_load(CLUSTER / name)) == []


def _drop_auth_env(cfg: dict[str, Any]) -> None:
    cfg["docker"]["run_options"] = [o for o in cfg["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("mutation,expected", [
    (_set("docker.image", "rayproject/ray:2.60.0-py311-gpu"), "not the project image"),
    (_set("docker.worker_image", "your-registry.example.com/excb:0.0.9"), "docker.worker_image"),
    (_set("docker", _DELETE), "no docker image"),
    (_set("setup_commands", ['pip install -q "torch==2.14.1" "torchvision==0.29.1"']), "installs ['torch==2.14.1'"),
    (_set("worker_setup_commands", ["pip install -U ray[default]==2.60.0 && pip install -q /home/ray/excb"]),
     "installs ['ray[default]==2.60.0']"),
    (_drop_auth_env, "RAY_AUTH_MODE=token"),
    (_set("file_mounts", {}), "auth token"),
], ids=["ray-image", "old-worker-image", "no-docker", "pip-torch", "pip-ray", "no-auth-mode", "no-token-sync"])
def test_image_check_rejects_a_broken_launcher_config(name: str, mutation: Any, expected: str) -> None:
    cfg = _load(CLUSTER / name)
    mutation(cfg)
    problems = image_problems(cfg)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("command,stack", [
    ('pip install -q "torch==2.14.1" "torchvision==0.29.1" "ray[default,data,train,tune]==2.60.0"',
     ["torch==2.14.1", "torchvision==0.29.1", "ray[default,data,train,tune]==2.60.0"]),
    ("python -m pip install --upgrade torch", ["torch"]),
    ("pip install -q /home/ray/excb", []),
    ('pip install -q "boto3>=1.34"', []),
    ("pip install -q google-api-python-client; ray stop", []),
])
def test_installs_stack_finds_only_stack_requirements(command: str, stack: list[str]) -> None:
    assert installs_stack(command) == stack


def test_rayjob_runs_the_project_image_with_token_auth() -> None:
    doc = _load(RAYJOB)
    assert rayjob_image_problems(doc) == []
    # and the image it names carries a torch build whose driver floor the manifest and the guide state
    build, _ = torch_build(DOCKERFILE.read_text())
    for text in (RAYJOB.read_text(), (CLUSTER / "README.md").read_text()):
        floors = [int(d) for d in re.findall(r"GPU nodes need an NVIDIA driver (?:>=|≥) (\d+)", text)]
        assert floors and all(f >= MIN_DRIVER[build] for f in floors), floors


def _rayjob_worker_image(doc: dict[str, Any]) -> None:
    containers(doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])[0]["image"] = (
        "rayproject/ray:2.60.0-py311-gpu")


@pytest.mark.parametrize("mutate,expected", [
    (_rayjob_worker_image, "gpu: image 'rayproject/ray:2.60.0-py311-gpu' is not the project image"),
    (lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions.mode is not token"),
    (lambda d: d["spec"].update(runtimeEnvYAML="working_dir: /home/ray/excb\npip: [torch==2.14.1]\n"),
     "runtimeEnvYAML.pip"),
], ids=["worker-ray-image", "no-auth", "runtime-env-pip"])
def test_rayjob_image_check_rejects_a_broken_manifest(mutate: Any, expected: str) -> None:
    doc = _load(RAYJOB)
    mutate(doc)
    problems = rayjob_image_problems(doc)
    assert any(expected in p for p in problems), problems


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
                   "cluster/kuberay-rayjob.yaml", "cluster/Dockerfile", "secretKeyRef", "Resume", "docker build",
                   "docker push", "RAY_AUTH_MODE=token", "ray get-auth-token", "RAY_AUTH_TOKEN", "authOptions"):
        assert needle in text, needle
