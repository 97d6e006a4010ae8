"""The docker-compose stack, checked offline (no Docker engine here): the compose file through Debian's
`docker-compose config`, and the collector, Prometheus and Grafana configs parsed and cross-checked against each
other, the Dockerfiles and the metrics the server really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tensorgate.server.settings import ENV_PREFIX, ServerSettings
from tensorgate.server.telemetry.metrics import Metrics, nvml_collector
from tests.unit.test_telemetry import FakeNvml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
GPU_COMPOSE = DEPLOY / "docker-compose.gpu.yml"
SERVICES = {"tensorgate", "otel-collector", "jaeger", "prometheus", "grafana"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = _yaml(COMPOSE)
    return document


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _env(compose: dict[str, Any], service: str = "tensorgate") -> dict[str, str]:
    return {key: str(value) for key, value in _services(compose)[service]["environment"].items()}


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    ports = {}
    for entry in service.get("ports", []):
        host, container = str(entry).split(":")
        ports[int(container)] = int(host)
    return ports


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (bind mounts)."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = str(entry).split(":")
        mounts[target] = (ROOT / source).resolve()
    return mounts


# -- docker-compose itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_COMPOSE]], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_files(files: list[Path]) -> None:
    program = shutil.which("docker-compose")
    if program is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (make test installs Debian's package)")
        pytest.skip("docker-compose is not installed (make test installs it: apt-get install docker-compose)")
    command = [program, *(arg for path in files for arg in ("-f", str(path))), "config"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == SERVICES
    build = resolved["services"]["tensorgate"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).is_file()


def test_the_stack_has_its_services_and_each_port_once(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert set(services) == SERVICES
    published = [host for service in services.values() for host in _published(service).values()]
    assert len(published) == len(set(published))
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on an unknown service {dependency}"


def test_tensorgate_is_built_from_the_cpu_dockerfile_and_serves_the_bundled_models(compose: dict[str, Any]) -> None:
    service = _services(compose)["tensorgate"]
    assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    env = _env(compose)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"COPY examples/models/ {env['TENSORGATE_REPOSITORY']}/" in dockerfile
    assert any((ROOT / "examples" / "models").glob("*/config.pbtxt")) or any((ROOT / "examples" / "models").iterdir())
    # Every TENSORGATE_* variable is a real setting with a value the server accepts.
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key.removeprefix(ENV_PREFIX).lower() in ServerSettings.field_names(), key
    settings = ServerSettings.from_sources({}, environ=env)
    assert settings.tracing is True
    assert settings.metrics_address.startswith("0.0.0.0:")
    assert settings.address.startswith("0.0.0.0:")
    exposed = {int(port) for line in dockerfile.splitlines() if line.startswith("EXPOSE") for port in line.split()[1:]}
    assert {_port(settings.address), _port(settings.metrics_address)} <= exposed
    assert set(_published(service)) == {_port(settings.address), _port(settings.metrics_address)}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_dockerfiles_install_the_server_with_observability(name: str) -> None:
    text = (DEPLOY / name).read_text()
    extras = re.search(r'"\.\[([a-z,]+)\]"', text)
    assert extras is not None, f"{name} does not pip install the server"
    assert "observability" in extras.group(1).split(",")
    assert 'ENTRYPOINT ["tensorgate"]' in text
    assert 'CMD ["serve"]' in text
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            source = line.split()[1]
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    if name == "Dockerfile.gpu":
        assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\S+-py3$", text, re.MULTILINE)
        assert "onnxruntime-gpu" in text
        assert "tensorrt" in extras.group(1).split(",")
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore


def test_the_gpu_image_keeps_plans_in_a_writable_volume_the_server_uses() -> None:
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    (cache,) = re.findall(r"TENSORGATE_PLAN_CACHE=(\S+)", text)
    assert "plan_cache" in ServerSettings.field_names()
    assert ServerSettings.from_sources({}, environ={"TENSORGATE_PLAN_CACHE": cache}).plan_cache == cache
    assert f'VOLUME ["{cache}"]' in text
    # The server runs as a user without a home directory: the cache folder must be created and given to it.
    assert re.search(rf"mkdir -p {re.escape(cache)}\b.*\n.*chown tensorgate {re.escape(cache)}\b", text)


# -- the collector ------------------------------------------------------------------------------------------------


def test_the_collector_receives_what_tensorgate_sends_and_forwards_to_jaeger(compose: dict[str, Any]) -> None:
    services = _services(compose)
    mounts = _mounts(services["otel-collector"])
    config_path = next(iter(mounts.values()))
    assert config_path == DEPLOY / "otel-collector.yaml"
    assert any(f"--config={target}" in services["otel-collector"]["command"] for target in mounts)
    config = _yaml(config_path)

    env = _env(compose)
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector"
    protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    receiver = config["receivers"]["otlp"]["protocols"]["grpc" if protocol == "grpc" else "http"]
    assert _port(receiver["endpoint"]) == endpoint.port

    for kind in ("receivers", "processors", "exporters"):
        for pipeline in config["service"]["pipelines"].values():
            for component in pipeline[kind]:
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]

    jaeger = config["exporters"]["otlp/jaeger"]
    host, port = jaeger["endpoint"].rsplit(":", 1)
    assert host == "jaeger"
    assert int(port) == 4317
    assert _env(compose, "jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "otlp/jaeger" in config["service"]["pipelines"]["traces"]["exporters"]


# -- Prometheus ---------------------------------------------------------------------------------------------------


def test_prometheus_scrapes_tensorgates_metrics_port(compose: dict[str, Any]) -> None:
    services = _services(compose)
    mounts = _mounts(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    config = _yaml(DEPLOY / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "tensorgate"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [target for group in job["static_configs"] for target in group["targets"]]
    host, port = target.rsplit(":", 1)
    assert host == "tensorgate"
    assert int(port) == _port(_env(compose)["TENSORGATE_METRICS_ADDRESS"])


# -- Grafana ------------------------------------------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    """Every sample name the server's metrics can produce (GPU ones through a stand-in NVML)."""
    metrics = Metrics()
    families = list(metrics.registry.collect())
    gpu = nvml_collector(FakeNvml())
    assert gpu is not None
    families += list(gpu.collect())
    metrics.close()
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names |= {family.name + "_total"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _datasource_uids(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        datasource = node.get("datasource")
        if isinstance(datasource, dict) and "uid" in datasource:
            found.add(datasource["uid"])
        for value in node.values():
            found |= _datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            found |= _datasource_uids(value)
    return found


def test_grafana_provisions_the_datasources_and_the_dashboard(compose: dict[str, Any]) -> None:
    services = _services(compose)
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"

    datasources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")["datasources"]
    by_uid = {source["uid"]: source for source in datasources}
    assert {"prometheus", "jaeger"} <= set(by_uid)
    prometheus_url = urlsplit(by_uid["prometheus"]["url"])
    assert prometheus_url.hostname == "prometheus"
    assert prometheus_url.port in _published(services["prometheus"])
    jaeger_url = urlsplit(by_uid["jaeger"]["url"])
    assert jaeger_url.hostname == "jaeger"
    assert jaeger_url.port in _published(services["jaeger"])

    (provider,) = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert dashboards_dir == DEPLOY / "grafana" / "dashboards"
    home = _env(compose, "grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).relative_to(provider["options"]["path"])).is_file()

    dashboard = json.loads((dashboards_dir / "tensorgate.json").read_text())
    assert dashboard["uid"] == "tensorgate"
    assert _datasource_uids(dashboard) <= set(by_uid)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_uses_metrics_the_server_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tensorgate.json").read_text())
    exported = _exported_metric_names()
    used = {name for expr in _expressions(dashboard) for name in re.findall(r"\btensorgate_[a-z_]+\b", expr)}
    assert used
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    variable = dashboard["templating"]["list"][0]
    assert re.findall(r"\btensorgate_[a-z_]+\b", variable["definition"])[0] in exported


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("throughput", r"rate\(tensorgate_requests_total\{[^}]*code=\"OK\""),
        ("errors by code", r"sum by \(code\) \(rate\(tensorgate_requests_total"),
        ("latency percentiles per stage", r"histogram_quantile\(0\.99, sum by \(le, stage\)"),
        ("latency median per stage", r"histogram_quantile\(0\.5, sum by \(le, stage\)"),
        ("batch size", r"tensorgate_batch_size_(sum|bucket)"),
        ("queue depth", r"tensorgate_queue_depth"),
    ],
)
def test_the_dashboard_shows(what: str, pattern: str) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tensorgate.json").read_text())
    assert any(re.search(pattern, expr) for expr in _expressions(dashboard)), what
