"""The Grafana dashboards: generated from scripts/gen_dashboards.py (fresh), one overview and
one per service, every query a valid PromQL expression over metrics the code exports, no
tenant label, and shipped as ConfigMaps carrying Grafana's sidecar label."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_dashboards.py"
CODE_DIRS = [ROOT / "libs", ROOT / "services"]


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_dashboards", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_dashboards"] = module
    spec.loader.exec_module(module)
    return module


def exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from exprs(value)


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    files = generator().dashboard_files()
    assert set(files) == {
        "charts/gateway/files/dashboards/aeterna-overview.json",
        "charts/memory/files/dashboards/aeterna-memory.json",
        "charts/governance/files/dashboards/aeterna-governance.json",
        "charts/knowledge/files/dashboards/aeterna-knowledge.json",
        "charts/sync/files/dashboards/aeterna-sync.json",
    }
    for path, text in files.items():
        assert (ROOT / path).read_text() == text, f"{path} is stale: run make gen"


def test_queries_use_exported_metrics_and_no_tenant_label() -> None:
    exported = set()
    for directory in CODE_DIRS:
        for source in directory.rglob("*.py"):
            exported |= set(re.findall(r'"((?:grpc_server|aeterna)_[a-z_]+)"', source.read_text()))
    rules = "".join(p.read_text() for p in ROOT.glob("charts/*/files/prometheus-rules.yaml"))
    uids = set()
    for path in ROOT.glob("charts/*/files/dashboards/*.json"):
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        found = list(exprs(board))
        assert found, path
        for expr in found:
            assert "tenant" not in expr
            for name in re.findall(r"(?<![:\w])((?:grpc_server|aeterna)_[a-z_]+)\b", expr):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert base in exported, f"{path.name}: {name} is exported by no code"
            for record in re.findall(r"\baeterna:[a-z_:0-9]+", expr):
                assert f"record: {record}" in rules, f"{path.name}: {record} is recorded by no rule"
    assert len(uids) == 5


def test_queries_parse_as_promql() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make deps-system`"
    # A rule file of every dashboard query: promtool parses each expression.
    rules = []
    for path in sorted(ROOT.glob("charts/*/files/dashboards/*.json")):
        for i, expr in enumerate(exprs(json.loads(path.read_text()))):
            concrete = expr.replace("$__rate_interval", "5m")
            rules.append(
                {"record": f"dashboard:{path.stem.replace('-', '_')}:{i}", "expr": concrete}
            )
    tmp = ROOT / ".var" / "dashboard-queries.rules.yaml"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(tmp)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboards_ship_as_config_maps_with_the_sidecar_label() -> None:
    for chart, name in (("memory", "aeterna-memory"), ("gateway", "aeterna-overview")):
        with helm_python.Chart.load(ROOT / "charts" / chart) as loaded:
            manifests = loaded.render(None, name="rel", namespace="aeterna", is_install=True)
        docs = [d for t in manifests.values() for d in yaml.safe_load_all(t) if d]
        (cm,) = [
            d for d in docs if d["kind"] == "ConfigMap" and f"{name}.json" in d.get("data", {})
        ]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        board = json.loads(cm["data"][f"{name}.json"])
        assert board["uid"] == name
