"""Packaging and deploy files: structure checks that need no Docker engine.

``docker compose config -q`` (or the standalone ``docker-compose``) validates the compose file
when one is installed; the structure checks below run everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from blynk_bridge.cli import EMULATORS, STAGES
from pipeline import config as config_mod
from pipeline import metrics
from pipeline.keys import GROUP_EGRESS, GROUP_TRANSFORM

ROOT = Path(__file__).resolve().parent.parent
CONFIG_IN_CONTAINER = "/etc/blynk-bridge/bridge.yaml"
SCALED = ("transform", "egress", "ingest-mqtt")
DEMO = ("mosquitto", "blynk-emulator", "tts-fleet")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_every_stage_is_a_service_of_the_same_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for stage in STAGES:
        svc = services[stage]
        assert svc["command"] == [stage, "-c", CONFIG_IN_CONTAINER]
        assert "profiles" not in svc, f"{stage} must run without a profile"
    images = {(services[s]["image"], services[s]["build"]) for s in [*STAGES, "blynk-emulator",
                                                                      "tts-fleet"]}
    assert len(images) == 1, images


def test_scaled_services_have_no_fixed_names_or_host_ports(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, name
    for name in SCALED:
        assert "ports" not in compose["services"][name], name


def test_redis_is_durable(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_demo_profile_has_the_clouds(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in DEMO:
        assert services[name]["profiles"] == ["demo"], name
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["blynk-emulator"]["command"][:2] == ["emulate", "blynk"]
    assert services["tts-fleet"]["command"][:2] == ["emulate", "tts"]
    assert {"blynk", "tts"} <= set(EMULATORS)
    assert "mosquitto" in services["tts-fleet"]["command"]


def test_mounted_files_exist_in_the_repo(compose: dict[str, Any]) -> None:
    sources = {
        v.split(":")[0]
        for svc in compose["services"].values()
        for v in svc.get("volumes", [])
        if isinstance(v, str) and v.startswith("./")
    }
    assert "./blynk_bridge/examples/bridge.yaml" in sources
    missing = [s for s in sorted(sources) if not (ROOT / s).exists()]
    assert not missing, f"mounted but not in the repository: {missing}"


def test_mosquitto_demo_broker_allows_anonymous_on_1883() -> None:
    conf = (ROOT / "deploy" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883\b", conf, re.M)
    assert re.search(r"^allow_anonymous true$", conf, re.M)


@pytest.mark.skipif(
    not (shutil.which("docker-compose") or shutil.which("docker")),
    reason="neither docker compose nor docker-compose is installed",
)
def test_compose_config_validates() -> None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, cwd=ROOT, timeout=30)
        if probe.returncode != 0:
            continue
        for profile in ([], ["--profile", "demo"]):
            done = subprocess.run([*cmd, *profile, "config", "-q"], capture_output=True,
                                  text=True, cwd=ROOT, timeout=30)
            assert done.returncode == 0, done.stderr
        return
    pytest.skip("docker is installed without the compose plugin, and no docker-compose")


def test_dockerfile_runs_the_cli_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["blynk-bridge"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pipeline", "workers", "emulators", "blynk_bridge", "pyproject.toml"):
        assert needed not in ignored


def _metric_names() -> set[str]:
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            base = obj._name
            kind = obj._type
            if kind == "counter":
                names.add(f"{base}_total")
            elif kind == "histogram":
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            else:
                names.add(base)
    return names


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bbb_[a-z_]+", e)}
    assert used, "no bb_ metric in the dashboard"
    unknown = used - _metric_names()
    assert not unknown, f"dashboard queries metrics nobody exports: {unknown}"
    for needed in ("bb_ingested_total", "bb_written_values_total", "bb_stream_lag",
                   "bb_stream_pending", "bb_dead_letters_total", "bb_end_to_end_seconds_bucket",
                   "bb_integration_status"):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def _labels_of(metric_name: str) -> set[str]:
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase) and metric_name.startswith(obj._name):
            rest = metric_name[len(obj._name):]
            if rest in ("", "_total", "_bucket", "_sum", "_count"):
                return set(obj._labelnames) | ({"le"} if rest == "_bucket" else set())
    raise AssertionError(f"no metric {metric_name}")


def test_grafana_dashboard_groups_and_filters_by_labels_that_exist() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    for expr in (t["expr"] for p in dash["panels"] for t in p["targets"]):
        known = set().union(*(_labels_of(m) for m in re.findall(r"\bbb_[a-z_]+", expr)))
        used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr)
                for label in group.split(",")}
        used |= set(re.findall(r'([a-z_]+)\s*=~?\s*"', expr))
        assert used <= known, f"{expr}: labels {used - known} not on its metrics"


def test_metric_labels_name_integrations_one_way() -> None:
    """``integration`` everywhere (never app/name/webhook/server); a status is a ``state``."""
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            labels = set(obj._labelnames)
            assert not labels & {"name", "app", "application", "webhook", "server", "product"}, (
                obj._name, labels)
    assert set(metrics.INTEGRATION_STATUS._labelnames) == {"kind", "integration", "state"}
    assert set(metrics.WRITTEN._labelnames) == {"integration"}


def test_demo_profile_has_prometheus_and_grafana_with_the_dashboard(
    compose: dict[str, Any]
) -> None:
    services = compose["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    assert prom["profiles"] == grafana["profiles"] == ["demo"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == set(STAGES)
    assert sd["port"] == int(services["monitor"]["environment"]["METRICS_PORT"])
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana-dashboard.json"].rsplit("/", 1)[0]
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    (provider,) = yaml.safe_load((prov / "dashboards" / "blynk-bridge.yml").read_text())[
        "providers"]
    assert provider["options"]["path"] == dash_dir
    # Loopback only, like every other port but the webhooks'.
    assert all(p.startswith("127.0.0.1:") for svc in (prom, grafana) for p in svc["ports"])
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_liveness_probes_ask_the_event_loop() -> None:
    """Every stage's liveness probe is ``/healthz`` (answered by the event loop; a stuck loop
    fails it, tests/test_status_page.py), never ``/metrics``."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s-example.yaml").read_text()))
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        (container,) = d["spec"]["template"]["spec"]["containers"]
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz", d["metadata"]["name"]
        ports = {p["name"] for p in container["ports"]}
        assert probe["port"] in ports


def test_keda_scales_transform_and_egress_on_their_groups_lag_summed_over_partitions() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "keda-scaledobject.yaml").read_text()))
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    expected = {"blynk-bridge-transform": GROUP_TRANSFORM, "blynk-bridge-egress": GROUP_EGRESS}
    assert set(scaled) == set(expected)
    for target, group in expected.items():
        (trigger,) = scaled[target]["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        query = meta["query"]
        # The per-stream lag the monitor exports, one series per partition, summed.
        assert query.startswith("sum(")
        (metric,) = set(re.findall(r"\bbb_[a-z_]+", query))
        assert metric == "bb_stream_lag" and metric in _metric_names()
        known = _labels_of(metric)
        assert {"stream", "group"} <= known
        assert re.findall(r"\b([a-z_]+)=\"([^\"]*)\"", query) == [("group", group)]
        assert {label.strip() for by in re.findall(r"\bby \(([^)]*)\)", query)
                for label in by.split(",")} <= known
        assert int(meta["threshold"]) > 0


def test_k8s_example_has_a_deployment_per_stage_and_a_valid_config(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s-example.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {f"blynk-bridge-{s}" for s in STAGES}
    for stage in STAGES:
        (container,) = deployments[f"blynk-bridge-{stage}"]["spec"]["template"]["spec"][
            "containers"]
        assert container["args"][:3] == [stage, "-c", CONFIG_IN_CONTAINER]
    assert deployments["blynk-bridge-monitor"]["spec"]["replicas"] == 1

    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    text = configmap["data"]["bridge.yaml"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    for key, value in secret["stringData"].items():
        (tmp_path / key).write_text(value)
    text = text.replace("/run/secrets/blynk-bridge", str(tmp_path))
    env = {"REDIS_URL": "redis://redis:6379/0", "BLYNK_CLIENT_ID": "client"}
    cfg = config_mod.parse(text, "yaml", "deploy/k8s-example.yaml#bridge.yaml", env)
    assert cfg.metrics.port == 9100
    assert cfg.tts[0].api_key is not None and cfg.tts[0].api_key.reveal().startswith("NNSXS.")


def test_example_config_resolves_to_the_compose_services(compose: dict[str, Any]) -> None:
    """The example bridge.yaml, with a stage container's environment, names the compose hosts."""
    raw_env = compose["services"]["transform"]["environment"]
    env = {k: config_mod.substitute_env(str(v), {}, "compose") for k, v in raw_env.items()
           if v is not None}
    passed_through = {k for k, v in raw_env.items() if v is None}
    assert {"PARTICLE_WEBHOOK_SECRET", "BLYNK_WEBHOOK_SECRET", "TTS_API_KEY",
            "BLYNK_CLIENT_SECRET"} <= passed_through
    # The secrets come from the operator's .env: the example has none of its own.
    env |= {k: f"secret-of-{k.lower()}" for k in passed_through}
    cfg = config_mod.load(ROOT / "blynk_bridge" / "examples" / "bridge.yaml", env)
    assert cfg.ingest_http.host == cfg.metrics.host == "0.0.0.0"  # reachable to be published
    services = set(compose["services"])
    assert cfg.redis.url.startswith("redis://redis:")
    assert all(t.host in services for t in cfg.tts)
    assert all(any(f"//{s}:" in url for s in services) for url in cfg.blynk.servers.values())
    healthcheck = " ".join(compose["services"]["transform"]["healthcheck"]["test"])
    assert f"127.0.0.1:{cfg.metrics.port}/healthz" in healthcheck


def test_demo_emulator_webhook_reaches_ingest_http_with_the_bridges_secret(
    compose: dict[str, Any]
) -> None:
    """The emulator's valve webhook, with its container's environment, posts to the ingest-http
    service (127.0.0.1 would be the emulator's own container) on the path and with the header and
    secret the example bridge.yaml checks: one BLYNK_WEBHOOK_SECRET for both services."""
    from emulators.blynk.settings import load_spec

    services = compose["services"]
    raw_env = services["blynk-emulator"]["environment"]
    assert raw_env["BRIDGE_URL"] == "http://ingest-http:8080"
    # Passed through from the operator's shell or .env, like the bridge's (no value here).
    assert "BLYNK_WEBHOOK_SECRET" in raw_env and raw_env["BLYNK_WEBHOOK_SECRET"] is None
    assert services["ingest-http"]["environment"]["BLYNK_WEBHOOK_SECRET"] is None
    secret = "0123456789abcdef0123456789abcdef"  # what `openssl rand -hex 16` gives
    env = {k: v for k, v in raw_env.items() if v is not None} | {"BLYNK_WEBHOOK_SECRET": secret}
    spec = load_spec(ROOT / "blynk_bridge" / "examples" / "blynk-emulator.yaml", env)
    (hook,) = spec.webhooks
    assert hook.url.startswith("http://ingest-http:8080/blynk/")

    bridge_env = {k: config_mod.substitute_env(str(v), {}, "compose")
                  for k, v in services["ingest-http"]["environment"].items() if v is not None}
    bridge_env |= {k: f"secret-of-{k.lower()}" for k, v in
                   services["ingest-http"]["environment"].items() if v is None}
    bridge_env["BLYNK_WEBHOOK_SECRET"] = secret
    cfg = config_mod.load(ROOT / "blynk_bridge" / "examples" / "bridge.yaml", bridge_env)
    (webhook,) = [w for w in cfg.blynk_webhooks if hook.url.endswith(f"/blynk/{w.name}")]
    assert webhook.auth is not None and webhook.auth.header is not None
    assert webhook.auth.secret is not None
    assert hook.headers == {webhook.auth.header: webhook.auth.secret.reveal()}
    assert cfg.ingest_http.port == 8080  # the port BRIDGE_URL names
