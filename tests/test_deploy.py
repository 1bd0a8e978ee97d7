"""deploy/ (CONTRACT.md 8b): the Kubernetes manifests, the alert rules and the dashboard.

Each kustomization is rendered with ``kubectl kustomize`` and validated against the
Kubernetes schemas (kubernetes-validate, offline); the rendered objects are checked for the
contract's invariants; the alert rules pass ``promtool check rules`` and their unit tests; and
every metric the rules and the dashboard query is one a running relay exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from conftest import CONTRACT_METRICS, EnvBuilder, run_relay

from relay.config import load_settings, parse_duration
from relay.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
MONITORING = KUBE / "monitoring"
RULES = MONITORING / "sfox-relay.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sfox-relay.json"
KUBERNETES_VERSION = "1.32.0"
SECRETS_DIR = "/etc/sfox-relay/secrets"

#: Secret inputs (CONTRACT.md 3): only ever given to the pod as <NAME>_FILE.
SECRET_VARIABLES = {
    "RELAY_API_KEY",
    "ENTERPRISE_API_KEY",
    "RELAY_SIGNING_SECRET",
    "RELAY_TOKEN_KEY",
    "RELAY_ADMIN_TOKEN",
    "RELAY_ENDPOINTS",
    "RELAY_STORE",
    "RELAY_ALERT_URL",
}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")


def render(kustomization: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one directory under deploy/kubernetes, as objects."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(name) for name in ("base", "overlays/postgres", "monitoring")}


# -- rendering and schemas ------------------------------------------------------------------


def test_each_kustomization_renders_what_it_should(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    kinds = {name: sorted(o["kind"] for o in objs) for name, objs in rendered.items()}
    assert kinds == {
        "base": ["ConfigMap", "Service", "StatefulSet"],
        "overlays/postgres": ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"],
        "monitoring": ["PrometheusRule", "ServiceMonitor"],
    }


@pytest.mark.parametrize("name", ["base", "overlays/postgres"])
def test_rendered_objects_pass_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    for obj in rendered[name]:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_schema_violation_is_caught() -> None:
    """The validation above can fail: a misspelt field is refused (strict)."""
    (obj,) = [o for o in render("base") if o["kind"] == "Service"]
    obj["spec"]["publishNotReadyAdresses"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_monitoring_objects_have_the_operator_shape(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """kubernetes-validate has no schemas for the operator's CRDs: their fields, by hand."""
    objects = rendered["monitoring"]
    monitor = only(objects, "ServiceMonitor")
    rule = only(objects, "PrometheusRule")
    assert monitor["apiVersion"] == rule["apiVersion"] == "monitoring.coreos.com/v1"
    service = only(rendered["base"], "Service")
    labels = service["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # SfoxRelayDown selects the job the operator names after the Service.
    assert f'job="{service["metadata"]["name"]}"' in rules_text()


# -- invariants of the pods -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "overlays/postgres"])
def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    pod = workload(rendered[name])["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Service links would inject RELAY_PORT & co., which the relay refuses as unknown.
    assert pod["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert mounts["/data"] == "data"


@pytest.mark.parametrize("name", ["base", "overlays/postgres"])
def test_probes_resources_and_grace(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objects = rendered[name]
    pod = workload(objects)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"admin": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # bench/results/latest.md: RSS peaks under 80 MB; requests and limits cover that.
    resources = container["resources"]
    assert _mebibytes(resources["requests"]["memory"]) >= 96
    assert _mebibytes(resources["limits"]["memory"]) >= 2 * 80
    assert "cpu" in resources["requests"]
    settings = only(objects, "ConfigMap")["data"]
    grace = parse_duration(settings["RELAY_SHUTDOWN_GRACE"])
    # Room after the grace to commit the verdicts and close the store before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= grace + 10


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


@pytest.mark.parametrize("name", ["base", "overlays/postgres"])
def test_secrets_reach_the_pod_only_as_files(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = rendered[name]
    pod = workload(objects)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "Secret" not in {o["kind"] for o in objects}  # created by the operator, not here
    for entry in container.get("env", []):
        assert entry["name"] not in SECRET_VARIABLES
        assert "secretKeyRef" not in entry.get("valueFrom", {})
    for source in container.get("envFrom", []):
        assert "secretRef" not in source
    settings = only(objects, "ConfigMap")["data"]
    assert not SECRET_VARIABLES & set(settings)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret_volumes = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_volumes] == ["sfox-relay"]
    mount = mounts[secret_volumes[0]["name"]]
    assert mount["mountPath"] == SECRETS_DIR and mount["readOnly"] is True
    files = {k: v for k, v in env_of(container).items() if k.endswith("_FILE")}
    assert {k.removesuffix("_FILE") for k in files} <= SECRET_VARIABLES
    assert all(path.startswith(SECRETS_DIR + "/") for path in files.values())


@pytest.mark.parametrize("name", ["base", "overlays/postgres"])
def test_the_relay_accepts_the_rendered_configuration(
    rendered: dict[str, list[dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    """The ConfigMap and env, with the Secret's files in place, load as valid settings."""
    objects = rendered[name]
    (container,) = workload(objects)["spec"]["template"]["spec"]["containers"]
    secrets = {
        "api-key": "k" * 32,
        "signing-secret": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "admin-token": "t" * 32,
        "endpoints": '[{"name": "crm", "url": "https://crm.example/hooks"}]',
        "store": "postgresql://relay:pw@db.example:5432/relay",
    }
    for key, value in secrets.items():
        (tmp_path / key).write_text(value + "\n")
    environ = {"RELAY_STORE": "sqlite:////data/relay.db"}  # the image's ENV
    environ.update(only(objects, "ConfigMap")["data"])
    for variable, value in env_of(container).items():
        environ[variable] = value.replace(SECRETS_DIR, str(tmp_path))
    settings = load_settings(environ, for_run=True)
    assert [ep.name for ep in settings.endpoints] == ["crm"]
    assert settings.shutdown_grace == 20
    store = settings.store.get_secret_value()
    if name == "base":
        assert store == "sqlite:////data/relay.db" and settings.replicas == 1
    else:
        assert store.startswith("postgresql://") and settings.replicas == 3


def test_base_is_one_sqlite_replica_with_its_volume(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["base"]
    sts = only(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    _service_selects_the_pods(objects, sts)


def _service_selects_the_pods(objects: list[dict[str, Any]], work: dict[str, Any]) -> None:
    service = only(objects, "Service")
    pod_labels = work["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["targetPort"] == "admin"


def test_postgres_overlay_runs_three_replicas_that_drain_safely(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["overlays/postgres"]
    deployment = only(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert only(objects, "ConfigMap")["data"]["RELAY_REPLICAS"] == "3"
    # A fourth replica during a rollout would exceed each one's share of sFOX's limits.
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert env_of(container)["RELAY_STORE_FILE"] == f"{SECRETS_DIR}/store"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    pdb = only(objects, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    _service_selects_the_pods(objects, deployment)


def test_postgres_overlay_keeps_the_base_pod_template(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """One pod template: the overlay adds the store, /data's volume and the spread only."""
    base = only(rendered["base"], "StatefulSet")["spec"]["template"]
    overlay = json.loads(json.dumps(only(rendered["overlays/postgres"], "Deployment")))
    template = overlay["spec"]["template"]
    spec = template["spec"]
    spec.pop("topologySpreadConstraints")
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "data"]
    container = spec["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "RELAY_STORE_FILE"]
    for t in (base, template):  # the ConfigMap's hashed name differs (RELAY_REPLICAS)
        t["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"] = "settings"
    assert template == base


# -- alert rules ----------------------------------------------------------------------------


def rules_text() -> str:
    return RULES.read_text()


def test_the_prometheusrule_wraps_the_rules_file_unchanged() -> None:
    wrapped = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert wrapped["spec"] == yaml.safe_load(rules_text())


def test_every_contract_alert_has_a_rule() -> None:
    rules = yaml.safe_load(rules_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert set(by_name) == {
        "SfoxRelayDown",
        "SfoxRelayFeedNotSubscribed",
        "SfoxRelayOutboxOldestAge",
        "SfoxRelayDeadDeliveries",
        "SfoxRelayEndpointNotActive",
        "SfoxRelayReconciliationFailing",
    }
    assert 'relay_endpoint_state{state=~"open|disabled"}' in by_name["SfoxRelayEndpointNotActive"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian: prometheus)")
def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    for command in (
        ["promtool", "check", "rules", RULES.name],
        ["promtool", "test", "rules", "sfox-relay.rules.test.yml"],
    ):
        done = subprocess.run(
            command, cwd=MONITORING, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # Every alert has a unit test.
    tests = (MONITORING / "sfox-relay.rules.test.yml").read_text()
    for rule in yaml.safe_load(rules_text())["groups"][0]["rules"]:
        assert f"alertname: {rule['alert']}" in tests


# -- the metrics the rules and the dashboard query ------------------------------------------


def queried_metrics() -> set[str]:
    """Every relay_* series name in the rules' and the dashboard's expressions."""
    expressions = [r["expr"] for r in yaml.safe_load(rules_text())["groups"][0]["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        expressions += [t["expr"] for t in panel.get("targets", [])]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    names = set()
    for expr in expressions:
        names |= set(re.findall(r"\brelay_[a-z0-9_]+", expr))
    return names


def exposed_names(text: str) -> set[str]:
    """Series names a Prometheus exposition allows, from its TYPE lines and samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind == "counter":
                names.add(name + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _contract_series() -> set[str]:
    histograms = {"relay_delivery_duration_seconds"}
    series = set(CONTRACT_METRICS)
    for name in histograms:
        series |= {name + "_bucket", name + "_sum", name + "_count"}
    return series


def test_the_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["expr"] and target["refId"]
            assert target["datasource"]["uid"] == "${datasource}"  # picked at import
    queried = queried_metrics()
    for name in (
        "relay_feed_state",
        "relay_events_stored_total",
        "relay_deliveries_total",
        "relay_delivery_duration_seconds_bucket",
        "relay_outbox_pending",
        "relay_outbox_oldest_age_seconds",
        "relay_endpoint_state",
        "relay_outbox_dead",
        "relay_reconcile_runs_total",
    ):
        assert name in queried


async def test_every_queried_metric_is_one_a_running_relay_exposes(
    relay_env: EnvBuilder, receiver: Receiver
) -> None:
    async with run_relay(relay_env(), stats_interval=0.05) as relay:
        await receiver.wait_for(40, timeout=10)
        await relay.reconciler.run_once()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{relay.admin.port}/metrics") as response,
        ):
            text = await response.text()
    scraped = exposed_names(text)
    queried = queried_metrics()
    assert queried <= _contract_series(), queried - _contract_series()
    assert queried <= scraped, queried - scraped
    # And every metric the contract names is there, with no _created series.
    assert _contract_series() <= scraped, _contract_series() - scraped
    assert "_created" not in text
