"""Start-up of the memory service: the model artifact, migrations, waiting for the schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from aeterna_common.auth import TokenVerifier
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings, apply_migrations, role_of, schema_versions
from aeterna_common.server import GrpcServer, StartupError
from aeterna_devstack.pytest_plugin import auth_settings, session_auth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import require_model
from aeterna_memory.app import MIGRATIONS, build
from aeterna_memory.settings import MemorySettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

MIGRATION_NAMES = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
LATEST = len(MIGRATION_NAMES)
BIN = Path(sys.executable).parent


def run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AETERNA_")}
    # Token verification is configured, so each test reaches the step it is about.
    trusted = session_auth().server_env()
    return subprocess.run(
        args, env={**clean, **trusted, **env}, capture_output=True, text=True, timeout=timeout
    )


def dead_dsn(user: str = "aeterna_app") -> str:
    return f"postgresql://{user}@127.0.0.1:{free_port()}/nothing"


def test_missing_model_stops_the_service(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = run(
        [sys.executable, "-m", "aeterna_memory"],
        {
            "AETERNA_MEMORY_MODEL_DIR": str(tmp_path / "models"),
            "AETERNA_DATABASE_URL": dead_dsn(),
            "AETERNA_LISTEN": f"127.0.0.1:{free_port()}",
        },
    )
    assert proc.returncode == 1, proc.stderr
    assert "AETERNA_MEMORY_MODEL_DIR" in proc.stderr
    assert "make model" in proc.stderr
    assert str(tmp_path / "models") in proc.stderr
    assert "Traceback" not in proc.stderr
    # It stops at once: no export, no database.
    assert time.monotonic() - started < 60
    assert not (tmp_path / "models").exists()


async def test_unreadable_model_stops_build(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    source = require_model()
    for name in ("manifest.json", "tokenizer.json"):
        (models / name).write_text((source / name).read_text())
    (models / "model.onnx").write_bytes(b"\0" * 64)
    (models / "model-int8.onnx").write_bytes(b"\0" * 64)
    common = CommonSettings(database_url=dead_dsn())
    with pytest.raises(StartupError, match=r"AETERNA_MEMORY_MODEL_DIR=.*cannot load.*make model"):
        await build(common, MemorySettings(model_dir=models, index_dir=tmp_path / "index"))


async def test_migrate_command(make_database: Any) -> None:
    urls = await make_database()
    env = {"AETERNA_DATABASE_URL": urls.app, "AETERNA_DATABASE_OWNER_URL": urls.owner}
    first = await asyncio.to_thread(run, [str(BIN / "aeterna-memory"), "migrate"], env)
    assert first.returncode == 0, first.stderr
    assert f"applied now: {', '.join(MIGRATION_NAMES)}" in first.stdout
    # The application role can read the recorded versions (it waits on them) ...
    assert await schema_versions(urls.app) == set(range(1, LATEST + 1))
    # ... and was granted what the migrations grant it.
    second = await asyncio.to_thread(run, [sys.executable, "-m", "aeterna_memory", "migrate"], env)
    assert second.returncode == 0, second.stderr
    assert f"schema at version {LATEST}; applied now: nothing" in second.stdout


def test_migrate_failure_is_readable() -> None:
    proc = run(
        [sys.executable, "-m", "aeterna_memory", "migrate"],
        {"AETERNA_DATABASE_URL": dead_dsn(), "AETERNA_DATABASE_OWNER_URL": dead_dsn("owner")},
    )
    assert proc.returncode == 1
    assert "migrate failed" in proc.stderr
    assert "AETERNA_DATABASE_OWNER_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_waits_for_the_schema_then_serves(
    make_database: Any, redis_server: Any, tmp_path: Path
) -> None:
    urls = await make_database()
    common = CommonSettings(
        database_url=urls.app,
        database_owner_url=urls.owner,
        redis_url=redis_server.url,
        **auth_settings(),
    )
    settings = MemorySettings(model_dir=require_model(), index_dir=tmp_path / "index")
    with capture_logs() as logs:
        building = asyncio.create_task(
            build(common, settings, SchemaSettings(migrate_on_start=False, schema_wait_s=60))
        )
        await asyncio.sleep(3)
        assert not building.done()
        # It never migrates itself, although its settings name an owner DSN.
        assert await schema_versions(urls.app) == set()
        await apply_migrations(urls.owner, MIGRATIONS, role_of(urls.app))
        app = await asyncio.wait_for(building, 30)
    waits = [e for e in logs if e["event"] == "schema.waiting"]
    assert waits, logs
    assert waits[0]["missing"] == MIGRATION_NAMES
    assert any(e["event"] == "schema.ready" for e in logs)
    server = GrpcServer(app, verifier=TokenVerifier.from_settings(common), grace_period_s=1)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="aeterna.memory.v1.MemoryService")
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


async def test_gives_up_after_the_bound(make_database: Any, tmp_path: Path) -> None:
    urls = await make_database()
    # Half the schema: 0001 applied by hand, 0002 missing.
    await apply_migrations(urls.owner, MIGRATIONS, role_of(urls.app))
    import asyncpg

    conn = await asyncpg.connect(urls.owner)
    await conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    await conn.close()
    started = time.monotonic()
    proc = await asyncio.to_thread(
        run,
        [sys.executable, "-m", "aeterna_memory"],
        {
            "AETERNA_DATABASE_URL": urls.app,
            "AETERNA_DATABASE_OWNER_URL": urls.owner,
            "AETERNA_MEMORY_MODEL_DIR": str(require_model()),
            "AETERNA_MEMORY_INDEX_DIR": str(tmp_path / "index"),
            "AETERNA_LISTEN": f"127.0.0.1:{free_port()}",
            "AETERNA_MIGRATE_ON_START": "false",
            "AETERNA_SCHEMA_WAIT_S": "2",
        },
    )
    assert proc.returncode == 1, proc.stderr
    assert f"lacks schema version {LATEST}" in proc.stderr
    assert "missing 0002_index_cursors.sql. Apply" in proc.stderr  # and only that one
    assert "AETERNA_MIGRATE_ON_START" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60
    # Still not migrated: the service never applies migrations in this mode.
    assert await schema_versions(urls.app) == set(range(1, LATEST + 1)) - {2}


def test_schema_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AETERNA_MIGRATE_ON_START", raising=False)
    assert SchemaSettings().migrate_on_start is True
    monkeypatch.setenv("AETERNA_MIGRATE_ON_START", "false")
    monkeypatch.setenv("AETERNA_SCHEMA_WAIT_S", "7.5")
    assert (SchemaSettings().migrate_on_start, SchemaSettings().schema_wait_s) == (False, 7.5)
    monkeypatch.setenv("AETERNA_SCHEMA_WAIT_S", "0")
    with pytest.raises(ValueError):
        SchemaSettings()
