"""Prometheus labels stay bounded: no metric is labelled by tenant (an unbounded set)."""

from __future__ import annotations

import importlib
import pkgutil

import aeterna_common
import aeterna_memory
from prometheus_client import REGISTRY

UNBOUNDED = {"tenant", "tenant_id", "user", "user_id", "memory_id", "request_id"}


def _import_all(package: object) -> None:
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if info.name.endswith((".export", "__main__")):
            continue  # the model export needs torch; __main__ runs the service
        importlib.import_module(info.name)


def test_no_metric_has_a_per_tenant_label() -> None:
    _import_all(aeterna_common)
    _import_all(aeterna_memory)
    labelled = {
        collector._name: set(collector._labelnames)
        for collector in list(REGISTRY._collector_to_names)
        if hasattr(collector, "_labelnames")
    }
    assert "aeterna_embedding_cache_lookups" in labelled
    assert labelled["aeterna_embedding_cache_lookups"] == {"result"}
    assert {
        name: labels & UNBOUNDED for name, labels in labelled.items() if labels & UNBOUNDED
    } == {}
