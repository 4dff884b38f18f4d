"""Static checks of the service image (no Docker engine here: it is checked, not built)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from aeterna_common.config import CommonSettings
from aeterna_memory.settings import MemorySettings
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "services" / "memory" / "Dockerfile"


def stages() -> dict[str, list[tuple[str, str]]]:
    """``{stage name: [(INSTRUCTION, value), ...]}`` in file order, comments dropped."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for item in DockerfileParser(str(DOCKERFILE)).structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            name = value.split()[-1] if " AS " in value.upper() else f"stage{len(out)}"
            current = out.setdefault(name, [])
        if instruction != "COMMENT":
            current.append((instruction, value))
    return out


def envs(stage: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for instruction, value in stage:
        if instruction == "ENV":
            out.update(dict(part.split("=", 1) for part in shlex.split(value)))
    return out


def runs(stage: list[tuple[str, str]]) -> str:
    return "\n".join(v for i, v in stage if i == "RUN")


def test_stages_and_bases() -> None:
    s = stages()
    assert list(s) == ["builder", "model", "runtime"]
    assert s["builder"][0] == ("FROM", "python:3.11-slim AS builder")
    assert s["runtime"][0] == ("FROM", "python:3.11-slim AS runtime")


def test_builder_installs_the_service_alone_with_constraints() -> None:
    builder = runs(stages()["builder"])
    assert "-c constraints.txt" in builder
    assert re.search(r"\./libs/sdk\s+\./libs/common\s+\./services/memory", builder)
    assert "model-export" not in builder and "torch" not in builder


def test_model_stage_runs_the_same_export_as_make_model() -> None:
    model = runs(stages()["model"])
    assert "/opt/export" in model and "[model-export]" in model
    assert "python -m aeterna_common.embedding.export --out /opt/aeterna/models" in model
    makefile = (ROOT / "Makefile").read_text()
    assert "-m aeterna_common.embedding.export --out $(MODEL_DIR)" in makefile


def test_runtime_holds_only_the_venv_and_the_model() -> None:
    runtime = stages()["runtime"]
    copies = [v for i, v in runtime if i == "COPY"]
    assert copies == [
        "--from=builder /opt/aeterna/venv /opt/aeterna/venv",
        "--from=model /opt/aeterna/models /opt/aeterna/models",
    ]
    commands = runs(runtime)
    for forbidden in ("pip", "apt-get", "gcc", "torch", "build-essential"):
        assert forbidden not in commands


def test_runtime_user_env_volumes_and_entrypoint() -> None:
    runtime = stages()["runtime"]
    (user,) = [v for i, v in runtime if i == "USER"]
    uid, gid = user.split(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit()
    assert runtime[-1][0] == "CMD" and runtime[-2][0] == "ENTRYPOINT"
    entrypoint = json.loads(runtime[-2][1])  # exec form: a JSON array, no shell in between
    assert entrypoint == ["/opt/aeterna/venv/bin/aeterna-memory"]
    scripts = tomllib.loads((ROOT / "services" / "memory" / "pyproject.toml").read_text())
    assert "aeterna-memory" in scripts["project"]["scripts"]
    assert json.loads(runtime[-1][1]) == ["serve"]
    env = envs(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["AETERNA_MEMORY_MODEL_DIR"] == "/opt/aeterna/models"
    assert env["AETERNA_LISTEN"] == "127.0.0.1:50051"
    (volumes,) = [json.loads(v) for i, v in runtime if i == "VOLUME"]
    assert set(volumes) == {"/var/lib/aeterna/index", "/tmp"}
    # Read-only root: everything the service writes lies under a volume.
    for writable in (env["AETERNA_MEMORY_INDEX_DIR"], env["HOME"], env["TMPDIR"]):
        assert any(writable == v or writable.startswith(v + "/") for v in volumes), writable


def test_image_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("AETERNA_")]:
        monkeypatch.delenv(name)
    for name, value in envs(stages()["runtime"]).items():
        monkeypatch.setenv(name, value)
    memory, common = MemorySettings(), CommonSettings()
    assert memory.model_dir == Path("/opt/aeterna/models")
    assert memory.index_dir == Path("/var/lib/aeterna/index")
    assert common.listen == "127.0.0.1:50051"
    assert common.log_json is True


def test_dockerignore_sends_only_what_the_images_install() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything else (venvs, .var, models, .git) stays out
    copied = {
        v.split()[0].rstrip("/")
        for i, v in stages()["builder"]
        if i == "COPY" and not v.startswith("--")
    }
    assert copied == {"constraints.txt", "libs/sdk", "libs/common", "services/memory"}
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in copied:
        assert any(path == a or path.startswith(a + "/") for a in allowed), path
