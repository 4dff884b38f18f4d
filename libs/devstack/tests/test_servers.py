from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aeterna_devstack import servers
from aeterna_devstack.servers import (
    DevServerError,
    PostgresServer,
    RedisServer,
    _ephemeral_low,
    free_port,
    scratch_dir,
)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = scratch_dir("aeterna-test-pg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_postgres_answers_over_tcp_and_unix_socket() -> None:
    with PostgresServer() as pg:
        print(f"postgres start: {pg.startup_seconds:.2f} s")
        conn = await asyncpg.connect(pg.dsn("postgres", "postgres"))
        try:
            assert await conn.fetchval("select current_user") == "postgres"
            assert await conn.fetchval("show fsync") == "off"
            assert await conn.fetchval("select rolsuper from pg_roles where rolname = 'postgres'")
            await conn.execute("create database app")
        finally:
            await conn.close()
        conn = await asyncpg.connect(pg.dsn("postgres", "app", unix_socket=True))
        try:
            assert await conn.fetchval("select current_database()") == "app"
        finally:
            await conn.close()
        data_dir, port = pg.data_dir, pg.port
    assert data_dir is not None
    assert not data_dir.exists()  # throwaway cluster removed on stop
    assert not _port_open(port)


async def test_postgres_keeps_and_reuses_its_data_dir(short_tmp: Path) -> None:
    data = short_tmp / "pg"
    with PostgresServer(data, keep=True) as pg:
        conn = await asyncpg.connect(pg.dsn())
        await conn.execute("create table kept (x int); insert into kept values (42)")
        await conn.close()
    assert (data / "PG_VERSION").is_file()
    with PostgresServer(data, keep=True) as pg:
        conn = await asyncpg.connect(pg.dsn())
        assert await conn.fetchval("select x from kept") == 42
        await conn.close()


def test_postgres_refuses_a_foreign_non_empty_dir(short_tmp: Path) -> None:
    (short_tmp / "something.txt").write_text("not a cluster")
    with pytest.raises(DevServerError, match="holds no cluster"):
        PostgresServer(short_tmp).start()
    assert (short_tmp / "something.txt").exists()


def test_dsn_before_start_is_an_error() -> None:
    with pytest.raises(DevServerError):
        PostgresServer().dsn()


async def test_redis_answers_and_stops() -> None:
    with RedisServer() as server:
        client = aioredis.from_url(server.url)
        try:
            assert await client.ping()
            await client.set("k", "v")
            assert await client.get("k") == b"v"
            assert await client.config_get("save") == {"save": ""}
            assert await client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            await client.aclose()
        port = server.port
    assert not _port_open(port)


@pytest.fixture
def root_only_clone(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    private = Path(tempfile.mkdtemp(prefix="aeterna-root-only-"))
    private.chmod(0o700)
    fallback = scratch_dir("aeterna-pg-fallback-")
    monkeypatch.setenv("AETERNA_PG_FALLBACK_DIR", str(fallback))
    yield private / "clone", fallback
    shutil.rmtree(private, ignore_errors=True)
    shutil.rmtree(fallback, ignore_errors=True)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root hands the cluster to another user; as that user any directory works",
)
async def test_postgres_in_a_root_only_directory_keeps_its_data(
    root_only_clone: tuple[Path, Path],
) -> None:
    # A clone under /root: the postgres user cannot enter it. The cluster moves to a reachable
    # directory and the requested path becomes a symlink to it; data survives a restart.
    clone, fallback = root_only_clone
    data = clone / ".var" / "postgres"
    with PostgresServer(data, keep=True) as pg:
        conn = await asyncpg.connect(pg.dsn())
        await conn.execute("create table kept (v int); insert into kept values (7)")
        await conn.close()
    assert data.is_symlink() and data.resolve().is_relative_to(fallback)
    with PostgresServer(data, keep=True) as pg:
        conn = await asyncpg.connect(pg.dsn())
        assert await conn.fetchval("select v from kept") == 7
        await conn.close()


def test_free_ports_lie_below_the_ephemeral_range_and_are_not_handed_out_twice() -> None:
    # Outgoing connections take their local port from the ephemeral range: a listening port
    # chosen there can be taken by any client between the choice and the server's bind.
    low = _ephemeral_low()
    ports = [free_port() for _ in range(100)]
    assert all(10_000 <= p < low for p in ports)
    assert len(set(ports)) == len(ports)


def test_free_port_skips_a_port_another_listener_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        free = free_port()
        # Draw the held port first, then the free one (forgotten as handed out).
        draws = iter([held, free])
        monkeypatch.setattr(
            servers.random.SystemRandom, "randrange", lambda self, a, b: next(draws)
        )
        monkeypatch.setattr(servers, "_ephemeral_low", lambda: 65536)
        monkeypatch.setattr(servers, "_handed_out", set())
        assert free_port() == free
