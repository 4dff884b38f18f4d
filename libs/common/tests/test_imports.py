"""aeterna_common is a runtime library: it imports without test or development tooling."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = (
    "pytest",
    "_pytest",
    "aeterna_devstack",
    "torch",
    "transformers",
    "sentence_transformers",
    "aeterna_memory",
    "aeterna_cli",
)

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
            return None

    for name in BLOCKED:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, Block())
    import aeterna_common

    imported = []
    for info in pkgutil.walk_packages(aeterna_common.__path__, "aeterna_common."):
        importlib.import_module(info.name)
        imported.append(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("\\n".join(imported))
    """
)


def test_common_imports_without_dev_tooling() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    # The walk really reached the leaves, including the serving-side embedder and the
    # export module (whose torch imports happen only when an export runs).
    assert {
        "aeterna_common.server",
        "aeterna_common.db",
        "aeterna_common.interceptors",
        "aeterna_common.embedding.onnx_minilm",
        "aeterna_common.embedding.export",
        "aeterna_common.vectors.edge",
    } <= imported


def test_blocker_really_blocks() -> None:
    script = SCRIPT.format(blocked=BLOCKED).replace("import aeterna_common\n", "import pytest\n")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "blocked: pytest" in proc.stderr
