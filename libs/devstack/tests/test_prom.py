"""The local Prometheus of ``make run``: it starts on loopback, loads the charts' alert rules
and scrapes the targets it is given (a real metrics endpoint here)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from aeterna_common.telemetry import start_metrics_server
from aeterna_devstack.prom import (
    PrometheusProcess,
    chart_rule_files,
    find_prometheus,
    scrape_config,
)
from aeterna_devstack.servers import free_port


def api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]


def test_prometheus_scrapes_the_replicas_with_the_charts_rules(tmp_path: Path) -> None:
    assert find_prometheus() is not None, "prometheus is missing: run `make deps-system`"
    port = free_port()
    start_metrics_server(port)
    config = scrape_config(
        {"aeterna-memory": [f"127.0.0.1:{port}"]},
        envoy_admin=None,
        rule_files=chart_rule_files(),
        interval_s=1,
    )
    with PrometheusProcess(config, tmp_path) as prom:
        assert prom.url.startswith("http://127.0.0.1:")
        groups = {g["name"] for g in api(prom.url + "/api/v1/rules")["groups"]}
        assert {"aeterna-memory-alerts", "aeterna-gateway-alerts"} <= groups
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            targets = api(prom.url + "/api/v1/targets")["activeTargets"]
            health = [(t["labels"]["job"], t["health"]) for t in targets]
            if health == [("aeterna-memory", "up")]:
                break
            time.sleep(0.5)
        assert health == [("aeterna-memory", "up")]
