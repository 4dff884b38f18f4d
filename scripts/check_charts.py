"""Static checks of the Helm charts, offline: ``make lint-charts``.

For each chart under ``charts/`` (the library chart included):

1. ``helm lint --strict`` (Helm's Go SDK through ``helm-python-sdk``), with the default values
   and with every optional feature on;
2. render (like ``helm template``) with both sets of values;
3. validate every rendered object with ``kubernetes-validate --strict`` against the Kubernetes
   1.31.0 schemas. CRD kinds are unknown to it (:data:`CRD_KINDS`, the Prometheus Operator's
   ServiceMonitor, PodMonitor and PrometheusRule) and are reported as skipped, not validated;
4. take each rendered Envoy bootstrap out of its ConfigMap and check it with
   ``envoy --mode validate``. Envoy reads the JWKS and TLS files at load, so the paths the pods
   mount (``/etc/aeterna/...``) are pointed at a throwaway JWKS and self-signed certificate.

The Kubernetes manifests under ``k8s/`` (the files holding ``apiVersion`` and ``kind``, not the
values examples) are validated the same way.

Exits 1 with every finding listed, 0 when everything passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from aeterna_devstack.envoy import (
    EnvoyError,
    chart_validation_files,
    replace_chart_paths,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
MANIFESTS = ROOT / "k8s"

KUBE_VERSION = "1.31.0"
"""Oldest Kubernetes release the charts support (native sidecars, gRPC probes, preStop sleep)."""

CRD_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
"""Custom resources kubernetes-validate has no schema for; rendered but not validated."""

RELEASE = "aeterna-memory"
NAMESPACE = "aeterna"


ALL_FEATURES: Mapping[str, dict[str, Any]] = {
    "memory": {
        "auth": {"jwks": {"configMapName": "", "secretName": "aeterna-jwks"}},
        "autoscaling": {"requestsPerSecond": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "extraSecretEnv": [
            {
                "name": "AETERNA_MEMORY_QDRANT_API_KEY",
                "secretName": "aeterna-qdrant",
                "key": "api-key",
            }
        ],
        "settings": {
            "AETERNA_MEMORY_VECTOR_STORE": "qdrant",
            "AETERNA_MEMORY_QDRANT_URL": "http://qdrant:6333",
        },
        "podDisruptionBudget": {"minAvailable": 1},
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "aeterna",
    },
    "governance": {
        "auth": {"jwks": {"configMapName": "", "secretName": "aeterna-jwks"}},
        "autoscaling": {"requestsPerSecond": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "settings": {"AETERNA_AUTH_TRUST_TOKEN_ROLES": "false"},
        "podDisruptionBudget": {"minAvailable": 1},
    },
    "knowledge": {
        "auth": {"jwks": {"configMapName": "", "secretName": "aeterna-jwks"}},
        "autoscaling": {"requestsPerSecond": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "settings": {"AETERNA_AUTH_TRUST_TOKEN_ROLES": "false"},
        "podDisruptionBudget": {"minAvailable": 1},
    },
    "sync": {
        "auth": {"jwks": {"configMapName": "", "secretName": "aeterna-jwks"}},
        "autoscaling": {"requestsPerSecond": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "settings": {"AETERNA_AUTH_TRUST_TOKEN_ROLES": "false"},
        "podDisruptionBudget": {"minAvailable": 1},
    },
    "gateway": {
        "auth": {"jwks": {"configMapName": "", "secretName": "aeterna-jwks"}},
        "tls": {"enabled": True, "secretName": "aeterna-gateway-tls"},
        "autoscaling": {"requestsPerSecond": {"enabled": True}},
        "service": {"type": "LoadBalancer"},
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "clients": [{"namespaceSelector": {"matchLabels": {"aeterna/client": "true"}}}]
        },
        "podDisruptionBudget": {"minAvailable": 1},
    },
}
"""Values turning on every optional feature of each application chart."""


SYMLINK_NOTE = "found symbolic link in path"
"""Helm's loader prints this to stderr for charts/<name>/charts/aeterna-lib, a link by design."""


@contextlib.contextmanager
def _without_symlink_notes() -> Iterator[None]:
    """Pass the Go library's stderr through, minus its notes about followed symlinks."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if SYMLINK_NOTE not in line:
                    sys.stderr.write(line)


def render(chart: Path, values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Render a chart as ``helm template`` would for a first install.

    Args:
        chart: Chart directory.
        values: Values overriding the chart's defaults.

    Returns:
        Template path → rendered text.

    Raises:
        helm_python.HelmError: The chart does not load, the values break its schema, or a
            template fails.

    """
    with _without_symlink_notes(), helm_python.Chart.load(chart) as loaded:
        return loaded.render(
            dict(values) if values else None, name=RELEASE, namespace=NAMESPACE, is_install=True
        )


def objects(manifests: Mapping[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(template path, object)`` for every non-empty document of a rendering."""
    for path, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def lint(chart: Path, values: Mapping[str, Any] | None) -> list[str]:
    """``helm lint --strict``: warnings and errors, as messages."""
    with _without_symlink_notes():
        report = helm_python.chart.lint(chart, dict(values) if values else None, strict=True)
    found = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return found + [e for e in report.get("errors", []) if not any(e in f for f in found)]


def validate_objects(manifests: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Validate every rendered object against the Kubernetes schemas (strict).

    Returns:
        ``(errors, skipped)``: messages for invalid objects, and the CRD objects not validated.

    """
    errors: list[str] = []
    skipped: list[str] = []
    for path, obj in objects(manifests):
        name = f"{path}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") in CRD_KINDS:
            skipped.append(name)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            errors.append(f"{name}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc}")
    return errors, skipped


def envoy_configs(manifests: Mapping[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(ConfigMap name, bootstrap)`` for every rendered Envoy configuration.

    Raises:
        ValueError: A ``envoy.json`` key does not hold a JSON object.

    """
    for _path, obj in objects(manifests):
        if obj.get("kind") == "ConfigMap" and "envoy.json" in obj.get("data", {}):
            name = obj["metadata"]["name"]
            config = json.loads(obj["data"]["envoy.json"])
            if not isinstance(config, dict):
                raise ValueError(f"ConfigMap {name}: envoy.json is not a JSON object")
            yield name, config


def check_chart(chart: Path, files: Mapping[str, str]) -> list[str]:
    """Run every check on one chart; returns the findings (empty when it passes)."""
    findings: list[str] = []
    is_library = yaml.safe_load((chart / "Chart.yaml").read_text()).get("type") == "library"
    variants: list[tuple[str, Mapping[str, Any] | None]] = [("defaults", None)]
    if chart.name in ALL_FEATURES:
        variants.append(("all features", ALL_FEATURES[chart.name]))
    for label, values in variants:
        findings += [f"lint ({label}): {m}" for m in lint(chart, values)]
        if is_library:
            print(f"  {label}: linted (a library chart renders nothing itself)")
            continue
        try:
            manifests = render(chart, values)
        except helm_python.HelmError as exc:
            findings.append(f"render ({label}): {exc}")
            continue
        errors, skipped = validate_objects(manifests)
        findings += [f"kubernetes-validate ({label}): {e}" for e in errors]
        for name in skipped:
            print(f"  {label}: not validated (CRD, no schema in kubernetes-validate): {name}")
        count = 0
        for name, config in envoy_configs(manifests):
            count += 1
            try:
                validate_config(replace_chart_paths(config, files))
            except EnvoyError as exc:
                findings.append(f"envoy --mode validate ({label}) {name}: {exc}")
        if count == 0:
            findings.append(f"render ({label}): no Envoy configuration rendered")
        print(f"  {label}: rendered, validated, {count} Envoy configuration(s) checked")
    return findings


def check_manifests(directory: Path) -> list[str]:
    """Validate the Kubernetes objects of every YAML file in ``directory`` (values files skipped).

    Returns:
        The findings; also when a file has no Kubernetes object and no ``-values`` suffix.

    """
    findings: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.stem.endswith("-values"):
            continue
        errors, skipped = validate_objects({path.name: path.read_text()})
        findings += [f"kubernetes-validate: {e}" for e in errors + skipped]
        if not any(True for _ in objects({path.name: path.read_text()})):
            findings.append(f"{path.name}: no Kubernetes object")
    return findings


def main(argv: list[str] | None = None) -> int:
    """Check the named charts (default: every chart under ``charts/``); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("charts", nargs="*", type=Path, help="chart directories")
    args = parser.parse_args(argv)
    charts = args.charts or sorted(p.parent for p in CHARTS.glob("*/Chart.yaml"))
    failed = False
    with chart_validation_files() as files:
        for chart in charts:
            print(f"{chart.name}:")
            findings = check_chart(chart, files)
            for finding in findings:
                print(f"  FAIL {finding}")
            failed = failed or bool(findings)
    if not args.charts:
        print("k8s/:")
        findings = check_manifests(MANIFESTS)
        if not findings:
            print("  manifests validated")
        for finding in findings:
            print(f"  FAIL {finding}")
        failed = failed or bool(findings)
    print("charts: FAILED" if failed else "charts: OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
