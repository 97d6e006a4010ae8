"""deploy/kubernetes/, checked offline: every manifest against the Kubernetes OpenAPI schemas that the
`kubernetes-validate` package bundles (strict: an unknown or misspelt field fails), the KServe InferenceService
(a CRD outside those schemas) by its structure with its pod part against the Pod schema, and the files against
each other and against the server: ports, probes, health names, settings, drain timing, selectors.

Also the client side of the headless Service: `load_balancing="round_robin"` in the channel's service config."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tensorgate.client import _common
from tensorgate.server.app import SERVICE_NAMES
from tensorgate.server.cli import _parser
from tensorgate.server.settings import ENV_PREFIX, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = KUBERNETES / "kserve"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
#: The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27), and the newest schemas bundled.
VERSIONS = ["1.28", kubernetes_validate.utils.latest_version()]
#: What the server publishes on grpc.health.v1 besides one name per model (app.py, `_publish_health`).
HEALTH_NAMES = {"", *SERVICE_NAMES}
#: ComponentExtensionSpec: what KServe's PredictorSpec adds to the Pod spec fields it inlines.
KSERVE_EXTENSIONS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}
#: PredictorSpec's model-server implementations: a custom predictor has none of them, only `containers`.
KSERVE_IMPLEMENTATIONS = {
    "model",
    "sklearn",
    "xgboost",
    "tensorflow",
    "pytorch",
    "triton",
    "onnx",
    "pmml",
    "lightgbm",
    "paddle",
    "huggingface",
}


# -- loading -------------------------------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def _kustomization(folder: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return document


def _resources(folder: Path) -> list[dict[str, Any]]:
    """Every object `kubectl apply -k folder` creates, the generated ConfigMaps included (without kustomize's
    hash suffix, which kustomize also adds to every reference)."""
    kustomization = _kustomization(folder)
    objects = [document for name in kustomization["resources"] for document in _documents(folder / name)]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(name).name: (folder / name).read_text() for name in generator["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    return objects


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _image_env() -> dict[str, str]:
    """The TENSORGATE_* variables the image sets (deploy/Dockerfile's ENV lines): they win over a config file."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: str(entry["value"]) for entry in container.get("env", [])}


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _settings(container: dict[str, Any], config_files: dict[str, str], tmp_path: Path) -> ServerSettings:
    """What the server in `container` really runs with: its flags over the image's and the container's variables
    over the --config file (looked up in the mounted ConfigMaps)."""
    args = container.get("args", [])
    assert args[:1] == ["serve"], "the image's entrypoint is `tensorgate`: args start with the command"
    flags = vars(_parser().parse_args(args[1:]))
    config = flags.pop("config")
    config_file = None
    if config is not None:
        config_file = tmp_path / "tensorgate.toml"
        config_file.write_text(config_files[str(config)])
    environ = {**_image_env(), **_container_env(container)}
    return ServerSettings.from_sources(flags, environ=environ, config_file=config_file)


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in container}


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return _resources(KUBERNETES)


@pytest.fixture(scope="module")
def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "Deployment", "tensorgate")


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    assert len(pod["containers"]) == 1
    container: dict[str, Any] = pod["containers"][0]
    return container


def _mounted_config(pod: dict[str, Any], container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """Mounted ConfigMap files by their path in the container."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        config_map = volumes[mount["name"]].get("configMap")
        if config_map is not None:
            data = _one(objects, "ConfigMap", config_map["name"])["data"]
            files.update({f"{mount['mountPath']}/{name}": text for name, text in data.items()})
    return files


# -- schemas -------------------------------------------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = _kustomization(KUBERNETES)
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert (KUBERNETES / name).is_file(), name
    assert set(_kustomization(KSERVE)["resources"]) == {path.name for path in KSERVE.glob("*.yaml")} - {
        "kustomization.yaml"
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(objects: list[dict[str, Any]], version: str) -> None:
    kinds = set()
    for resource in objects:
        kubernetes_validate.validate(resource, version, strict=True)
        kinds.add(resource["kind"])
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    assert expected <= kinds


def test_the_validation_is_strict_enough_to_catch_a_misspelt_field(deployment: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(deployment))
    _container(_pod(broken))["readinessProbe"]["grcp"] = _container(_pod(broken))["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# -- the Deployment against the server ----------------------------------------------------------------------------


def test_ports_probes_and_settings_agree(
    objects: list[dict[str, Any]], deployment: dict[str, Any], tmp_path: Path
) -> None:
    pod = _pod(deployment)
    container = _container(pod)
    settings = _settings(container, _mounted_config(pod, container, objects), tmp_path)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert _port(settings.address) == ports["grpc"]
    assert settings.address.startswith("0.0.0.0:"), "pods are reached on their own IP, not loopback"
    assert _port(settings.metrics_address) == ports["metrics"]
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind}: the gRPC health check"
        assert probe["grpc"]["port"] == ports["grpc"], kind
        assert probe["grpc"].get("service", "") in HEALTH_NAMES, f"{kind}: a health name the server publishes"
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    # The model repository is the mounted volume, read-only.
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[str(settings.repository)].get("readOnly") is True


def test_the_settings_file_is_not_shadowed_by_variables(
    objects: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    """A variable wins over the file: a key the file sets and the image or the container also sets is dead."""
    container = _container(_pod(deployment))
    import tomllib

    keys = set(tomllib.loads(_one(objects, "ConfigMap", "tensorgate-config")["data"]["tensorgate.toml"]))
    assert keys <= set(ServerSettings.field_names())
    variables = {**_image_env(), **_container_env(container)}
    shadowed = {key for key in keys if ENV_PREFIX + key.upper() in variables}
    assert not shadowed


def test_termination_outlasts_the_prestop_sleep_and_the_drain(
    objects: list[dict[str, Any]], deployment: dict[str, Any], tmp_path: Path
) -> None:
    pod = _pod(deployment)
    container = _container(pod)
    settings = _settings(container, _mounted_config(pod, container, objects), tmp_path)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert 0 < pre_stop < settings.grace_period
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_period
    # Liveness must not kill a draining pod (it answers NOT_SERVING, then stops listening).
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.grace_period


def test_each_worker_gets_a_cpu_and_the_pod_runs_locked_down(
    objects: list[dict[str, Any]], deployment: dict[str, Any], tmp_path: Path
) -> None:
    pod = _pod(deployment)
    container = _container(pod)
    settings = _settings(container, _mounted_config(pod, container, objects), tmp_path)
    assert settings.workers >= 1
    assert _cpus(container["resources"]["requests"]["cpu"]) >= settings.workers
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    uid = int(re.search(r"--uid (\d+)", DOCKERFILE.read_text()).group(1))  # type: ignore[union-attr]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_volumes_resolve(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    pod = _pod(deployment)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in _container(pod)["volumeMounts"]:
        assert mount["name"] in volumes
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            _one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        if "configMap" in volume:
            _one(objects, "ConfigMap", volume["configMap"]["name"])


def test_prometheus_scrapes_the_metrics_port(
    objects: list[dict[str, Any]], deployment: dict[str, Any], tmp_path: Path
) -> None:
    pod = _pod(deployment)
    container = _container(pod)
    settings = _settings(container, _mounted_config(pod, container, objects), tmp_path)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _port(settings.metrics_address)
    assert annotations["prometheus.io/path"] == "/metrics"


# -- the objects against each other -------------------------------------------------------------------------------


def test_selectors_match_the_pods(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {port["name"] for port in _container(_pod(deployment))["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"tensorgate", "tensorgate-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        grpc_ports = [port for port in service["spec"]["ports"] if port["name"] == "grpc"]
        assert len(grpc_ports) == 1
        assert grpc_ports[0]["appProtocol"] == "grpc"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    assert _one(objects, "Service", "tensorgate-headless")["spec"]["clusterIP"] == "None"
    assert _one(objects, "Service", "tensorgate")["spec"].get("clusterIP") != "None"
    budget = _one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_autoscaler_and_the_budget_target_the_deployment(
    objects: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    autoscaler = _one(objects, "HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "tensorgate")
    assert deployment["metadata"]["name"] == "tensorgate"
    minimum = autoscaler["spec"]["minReplicas"]
    assert minimum <= deployment["spec"]["replicas"] <= autoscaler["spec"]["maxReplicas"]
    # A node drain can always evict one pod: the budget keeps fewer than the fewest pods there are.
    assert _one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] < minimum


# -- KServe ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inference_service() -> dict[str, Any]:
    return _one(_resources(KSERVE), "InferenceService", "tensorgate")


def test_the_inference_service_has_kserves_shape(inference_service: dict[str, Any]) -> None:
    assert inference_service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", inference_service["metadata"]["name"])
    predictor = inference_service["spec"]["predictor"]
    assert not set(predictor) & KSERVE_IMPLEMENTATIONS, "a custom predictor: containers only"
    assert predictor.get("minReplicas", 1) <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"cpu", "memory", "concurrency", "rps"}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_predictors_pod_part_matches_the_pod_schema(inference_service: dict[str, Any], version: str) -> None:
    """PredictorSpec inlines the Pod spec: without KServe's own fields it must be a valid Pod spec."""
    predictor = inference_service["spec"]["predictor"]
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_EXTENSIONS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_predictor_serves_the_open_inference_protocol_on_h2c_8081(
    inference_service: dict[str, Any], tmp_path: Path
) -> None:
    container = _container(inference_service["spec"]["predictor"])
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    settings = _settings(container, {}, tmp_path)
    assert settings.address == "0.0.0.0:8081"
    assert str(settings.repository) == "/mnt/models"  # where KServe puts STORAGE_URI
    assert "STORAGE_URI" in _container_env(container)
    probes = _probes(container)
    assert {"livenessProbe", "readinessProbe"} <= set(probes)
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == 8081, kind
        assert probe["grpc"].get("service", "") in HEALTH_NAMES, kind
    assert probes["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    annotations = inference_service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(annotations["prometheus.kserve.io/port"]) == _port(settings.metrics_address) != 8081
    assert _cpus(container["resources"]["requests"]["cpu"]) >= settings.workers


# -- the client side of the headless Service ---------------------------------------------------------------------


def _service_config(**arguments: Any) -> dict[str, Any]:
    """The channel's service config as `channel_settings` builds it ({} when it sets none)."""
    settings = _common.channel_settings(
        "dns:///tensorgate-headless:8001",
        tls=False,
        root_certificates=None,
        private_key=None,
        certificate_chain=None,
        metadata=(),
        **{"options": (), **arguments},
    )
    config: dict[str, Any] = json.loads(dict(settings.options).get("grpc.service_config") or "{}")
    return config


def test_round_robin_goes_into_the_channels_service_config() -> None:
    config = _service_config(load_balancing="round_robin")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # ...beside whatever the client's defaults put there (its retry policy), untouched.
    assert config == {**_service_config(), "loadBalancingConfig": [{"round_robin": {}}]}


def test_load_balancing_keeps_a_service_config_already_given() -> None:
    given = {"methodConfig": [{"name": [{}], "timeout": "5s"}]}
    options = [("grpc.service_config", json.dumps(given))]
    config = _service_config(load_balancing="pick_first", options=options)
    assert config == {**given, "loadBalancingConfig": [{"pick_first": {}}]}


def test_an_unknown_load_balancing_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        _service_config(load_balancing="least_loaded")
