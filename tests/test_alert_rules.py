"""The charts' alert rules: valid for Prometheus, unit-tested with ``promtool test rules``
(tests/promtool/*_test.yaml), each alert linking a runbook that exists, and shipped as a
PrometheusRule when the values flag asks for it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = sorted(ROOT.glob("charts/*/files/prometheus-rules.yaml"))
RUNBOOK_PREFIX = "https://github.com/aeterna/aeterna/blob/main/docs/runbooks/"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: run `make deps-system` (Debian package prometheus)"
    return found


def alerts(path: Path) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_chart_has_rules() -> None:
    charts = {p.parts[-3] for p in RULE_FILES}
    assert charts == {"memory", "governance", "knowledge", "sync", "gateway"}


def test_rules_are_valid_prometheus_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    tests = sorted((ROOT / "tests" / "promtool").glob("*_test.yaml"))
    assert tests
    done = subprocess.run(
        [promtool(), "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(tests), done.stdout


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.parts[-3])
def test_every_alert_links_an_existing_runbook_and_has_a_severity(path: Path) -> None:
    found = alerts(path)
    assert found
    for rule in found:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_PREFIX), rule["alert"]
        assert (ROOT / "docs" / "runbooks" / url.removeprefix(RUNBOOK_PREFIX)).is_file(), url
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert "tenant" not in rule["expr"]


def test_slo_alerts_are_multi_window_multi_burn_rate() -> None:
    rules = alerts(ROOT / "charts" / "memory" / "files" / "prometheus-rules.yaml")
    memory = {(r["alert"], r["labels"]["severity"]): r for r in rules}
    page = memory[("AeternaMemoryErrorBudgetBurn", "critical")]["expr"]
    # SRE workbook: 14.4x over 1 h and 5 min, or 6x over 6 h and 30 min, of a 0.1 % budget.
    for window, threshold in (
        ("1h", "0.0144"),
        ("5m", "0.0144"),
        ("6h", "0.006"),
        ("30m", "0.006"),
    ):
        assert f'ratio_rate{window}{{job="aeterna-memory"}} > {threshold}' in page
    ticket = memory[("AeternaMemoryErrorBudgetBurn", "warning")]["expr"]
    for window in ("1d", "2h", "3d", "6h"):
        assert f"ratio_rate{window}" in ticket


def test_prometheus_rule_is_rendered_behind_its_flag() -> None:
    chart = ROOT / "charts" / "memory"
    with helm_python.Chart.load(chart) as loaded:
        off = loaded.render(None, name="rel", namespace="aeterna", is_install=True)
        on = loaded.render(
            {"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}},
            name="rel",
            namespace="aeterna",
            is_install=True,
        )

    def kinds(manifests: dict[str, str]) -> list[dict[str, Any]]:
        return [d for t in manifests.values() for d in yaml.safe_load_all(t) if d]

    assert not [d for d in kinds(off) if d["kind"] == "PrometheusRule"]
    (rule,) = [d for d in kinds(on) if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((chart / "files" / "prometheus-rules.yaml").read_text())
