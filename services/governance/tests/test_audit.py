"""The audit log on real PostgreSQL: the hash chain, idempotent appends, append-only tables,
tamper detection with checkpoints, and AuditService over a real server."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import asyncpg
import grpc
import pytest
from aeterna.governance.v1 import audit_service_pb2 as svc
from aeterna.governance.v1 import audit_service_pb2_grpc as svc_grpc
from aeterna_common import leases
from aeterna_governance.audit.chain import (
    GENESIS_HASH,
    Event,
    InvalidEventError,
    entry_hash,
    parse_envelope,
)
from aeterna_governance.audit.log import AuditLog
from audit_testkit import envelope, until
from governance_testkit import GovernanceEnv, admin, expect, md, new_tenant, start_governance


async def fill(gov: GovernanceEnv, tenant: str, count: int) -> AuditLog:
    audit = AuditLog(gov.app.deps.db)
    for n in range(1, count + 1):
        await audit.append(parse_envelope(envelope(tenant, n)))
    return audit


async def superuser(gov: GovernanceEnv) -> asyncpg.Connection:
    # The tamperer: the app role cannot change rows (grants and trigger, tested below).
    return await asyncpg.connect(gov.urls.superuser)


async def checkpoint(gov: GovernanceEnv) -> int:
    pool = gov.app.deps.db.pool
    lease = await leases.acquire(pool, f"test:checkpoint:{new_tenant()}", "test", 30)
    assert lease is not None
    return await AuditLog(gov.app.deps.db).checkpoint(lease)


async def test_chain_links_and_idempotent_appends(gov: GovernanceEnv) -> None:
    t = new_tenant()
    audit = AuditLog(gov.app.deps.db)
    first, appended = await audit.append(parse_envelope(envelope(t, 1)))
    assert appended and first.sequence == 1 and first.previous_hash == GENESIS_HASH
    again, appended = await audit.append(parse_envelope(envelope(t, 1, time="2027-01-01T00:00Z")))
    assert not appended and again == first  # the same event id: the existing entry
    second, _ = await audit.append(parse_envelope(envelope(t, 2)))
    assert second.sequence == 2 and second.previous_hash == first.hash
    # Concurrent appends of one tenant are serialised: no gaps, no shared predecessor, and
    # each event once although every event is sent twice.
    await asyncio.gather(
        *(audit.append(parse_envelope(envelope(t, n))) for n in [*range(3, 23), *range(3, 23)])
    )
    entries = await audit.page(t, after=0, limit=100)
    assert [e.sequence for e in entries] == list(range(1, 23))
    assert sorted(e.event_id for e in entries) == sorted(f"memory:{n}" for n in range(1, 23))
    assert all(b.previous_hash == a.hash for a, b in itertools.pairwise(entries))
    # The microsecond-precise event time and the canonical payload round-trip.
    assert first.event_time.microsecond == 123456
    assert json.loads(first.payload) == {"layer": "USER", "n": 1, "ratio": 0.1}
    outcome = await audit.verify(t)
    assert outcome.valid and outcome.entries_checked == 22 and outcome.head_hash == entries[-1].hash


async def test_a_batch_appends_as_single_appends_would(gov: GovernanceEnv) -> None:
    t, other = new_tenant(), new_tenant()
    audit = AuditLog(gov.app.deps.db)
    await audit.append(parse_envelope(envelope(t, 1)))
    # Already in the chain (1), twice in the batch (3), two tenants in one batch.
    batch = [parse_envelope(envelope(t, n)) for n in (1, 2, 3, 3, 4)]
    batch.insert(2, parse_envelope(envelope(other, 7)))
    assert await audit.append_many(batch) == 4
    assert await audit.append_many(batch) == 0  # delivered again: nothing twice
    entries = await audit.page(t, after=0, limit=100)
    assert [(e.sequence, e.event_id) for e in entries] == [(n, f"memory:{n}") for n in (1, 2, 3, 4)]
    assert all(b.previous_hash == a.hash for a, b in itertools.pairwise(entries))
    # A single append goes on from the batch's head, and the whole chain verifies.
    fifth, appended = await audit.append(parse_envelope(envelope(t, 5)))
    assert appended and fifth.sequence == 5 and fifth.previous_hash == entries[-1].hash
    outcome = await audit.verify(t)
    assert outcome.valid and outcome.entries_checked == 5
    assert [e.event_id for e in await audit.page(other, after=0, limit=10)] == ["memory:7"]
    assert (await audit.verify(other)).valid


async def test_app_role_cannot_update_delete_or_truncate(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await fill(gov, t, 2)
    app = await asyncpg.connect(gov.urls.app)
    try:
        for statement in (
            "UPDATE audit_entries SET actor = 'users/mallory'",
            "DELETE FROM audit_entries",
            "TRUNCATE audit_entries",
            "INSERT INTO audit_checkpoints (tenant_id, sequence, hash) "
            f"VALUES ('{t}', 9, '{'0' * 64}')",
            "DELETE FROM audit_checkpoints",
        ):
            async with app.transaction():
                await app.execute("SELECT aeterna_bind_tenant($1)", t)
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                    await app.execute(statement)
        # The trigger refuses even when a grant is given by mistake (granted and rolled back
        # in one transaction of the superuser, acting as the app role).
        su = await superuser(gov)
        try:
            for statement in (
                "UPDATE audit_entries SET actor = 'users/mallory'",
                "DELETE FROM audit_entries",
                "TRUNCATE audit_entries",
                "DELETE FROM audit_checkpoints",
            ):
                async with su.transaction():
                    await su.execute(
                        "GRANT UPDATE, DELETE, TRUNCATE ON audit_entries, audit_checkpoints "
                        "TO aeterna_app"
                    )
                    await su.execute("SET LOCAL ROLE aeterna_app")
                    await su.execute("SELECT aeterna_bind_tenant($1)", t)
                    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                        await su.execute(statement)
        finally:
            await su.close()
    finally:
        await app.close()
    assert (await AuditLog(gov.app.deps.db).verify(t)).valid


async def test_tampering_names_the_first_broken_entry(gov: GovernanceEnv) -> None:
    audit = AuditLog(gov.app.deps.db)
    altered, deleted, truncated, rewritten = (new_tenant() for _ in range(4))
    for t in (altered, deleted, truncated, rewritten):
        await fill(gov, t, 6)
    assert await checkpoint(gov) >= 4  # heads at 6
    su = await superuser(gov)
    try:
        await su.execute(
            'UPDATE audit_entries SET payload = \'{"layer":"TEAM"}\' '
            "WHERE tenant_id = $1 AND sequence = 3",
            altered,
        )
        await su.execute("DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence = 4", deleted)
        await su.execute(
            "DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence > 4", truncated
        )
        # Rewrite entries 5 and 6 consistently: recomputed hashes, links intact.
        await su.execute(
            "DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence > 4", rewritten
        )
    finally:
        await su.close()
    for n in (5, 6):
        forged = parse_envelope(envelope(rewritten, 100 + n))
        record, appended = await audit.append(forged)
        assert appended and record.sequence == n

    outcome = await audit.verify(altered)
    assert (outcome.broken_sequence, outcome.reason and outcome.reason.name) == (3, "HASH_MISMATCH")
    assert outcome.entries_checked == 3
    outcome = await audit.verify(deleted)
    assert (outcome.broken_sequence, outcome.reason and outcome.reason.name) == (4, "SEQUENCE_GAP")
    outcome = await audit.verify(truncated)
    assert (outcome.broken_sequence, outcome.reason and outcome.reason.name) == (
        5,
        "CHECKPOINT_MISMATCH",
    )
    outcome = await audit.verify(rewritten)
    # The chain alone is consistent; only the checkpoint of the old head (6) catches it.
    assert (outcome.broken_sequence, outcome.reason and outcome.reason.name) == (
        6,
        "CHECKPOINT_MISMATCH",
    )
    assert outcome.checkpoint is not None and outcome.checkpoint.sequence == 6


async def test_link_mismatch_when_an_entry_is_replaced(gov: GovernanceEnv) -> None:
    audit = AuditLog(gov.app.deps.db)
    t = new_tenant()
    await fill(gov, t, 3)
    su = await superuser(gov)
    try:
        # Replace entry 2 with a self-consistent one whose predecessor is not entry 1.
        row = await su.fetchrow(
            "SELECT * FROM audit_entries WHERE tenant_id = $1 AND sequence = 2", t
        )
        assert row is not None
        await su.execute("DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence = 2", t)
        event = Event(
            t,
            row["event_id"],
            row["event_type"],
            row["service"],
            row["resource"],
            row["actor"],
            row["event_time"],
            row["payload"],
        )
        fake_previous = "f" * 64
        await su.execute(
            "INSERT INTO audit_entries (tenant_id, sequence, event_id, event_type, service, "
            "resource, actor, event_time, append_time, payload, previous_hash, hash) "
            "VALUES ($1, 2, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            t,
            row["event_id"],
            row["event_type"],
            row["service"],
            row["resource"],
            row["actor"],
            row["event_time"],
            row["append_time"],
            row["payload"],
            fake_previous,
            entry_hash(event, 2, row["append_time"], fake_previous),
        )
    finally:
        await su.close()
    outcome = await audit.verify(t)
    assert (outcome.broken_sequence, outcome.reason and outcome.reason.name) == (2, "LINK_MISMATCH")


async def test_audit_service_lists_and_verifies_for_tenant_admins_only(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await fill(gov, t, 3)
    await AuditLog(gov.app.deps.db).append(
        parse_envelope(envelope(t, 4, actor="users/bob", resource=f"tenants/{t}/memories/x"))
    )
    stub = svc_grpc.AuditServiceStub(gov.channel)
    parent = f"tenants/{t}"
    page = await stub.ListAuditEntries(
        svc.ListAuditEntriesRequest(parent=parent, page_size=2), metadata=admin(t)
    )
    assert [e.sequence for e in page.audit_entries] == [1, 2] and page.next_page_token
    assert page.audit_entries[0].name == f"{parent}/auditEntries/1"
    assert page.audit_entries[0].payload["layer"] == "USER"
    rest = await stub.ListAuditEntries(
        svc.ListAuditEntriesRequest(parent=parent, page_size=2, page_token=page.next_page_token),
        metadata=admin(t),
    )
    assert [e.sequence for e in rest.audit_entries] == [3, 4] and not rest.next_page_token
    by_actor = await stub.ListAuditEntries(
        svc.ListAuditEntriesRequest(parent=parent, actor="users/bob"), metadata=admin(t)
    )
    assert [e.event_id for e in by_actor.audit_entries] == ["memory:4"]
    verified = await stub.VerifyAuditLog(
        svc.VerifyAuditLogRequest(parent=parent), metadata=admin(t)
    )
    assert verified.valid and verified.entries_checked == 4
    assert verified.head_hash == rest.audit_entries[-1].hash
    assert verified.break_reason == svc.AUDIT_BREAK_UNSPECIFIED

    su = await superuser(gov)
    try:
        await su.execute("DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence = 2", t)
    finally:
        await su.close()
    broken = await stub.VerifyAuditLog(svc.VerifyAuditLogRequest(parent=parent), metadata=admin(t))
    assert not broken.valid
    assert broken.first_broken_entry == f"{parent}/auditEntries/2"
    assert broken.break_reason == svc.AUDIT_BREAK_SEQUENCE_GAP

    # A member without a tenant-wide role, and another tenant's admin, are refused.
    reason, _, meta = await expect(
        stub.VerifyAuditLog(svc.VerifyAuditLogRequest(parent=parent), metadata=md(t, "bob")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (
        reason == "ACTION_NOT_ALLOWED"
        and meta["action"] == "aeterna.governance.v1.AuditService/VerifyAuditLog"
    )
    await expect(
        stub.ListAuditEntries(svc.ListAuditEntriesRequest(parent=parent), metadata=md(t, "bob")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    reason, _, _ = await expect(
        stub.ListAuditEntries(
            svc.ListAuditEntriesRequest(parent=parent), metadata=admin(new_tenant())
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason == "TENANT_MISMATCH"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"payload": "[1, 2]"}, "not a JSON object"),
        ({"payload": '{"n": 9007199254740993}'}, "not I-JSON"),
        ({"payload": '{"s": "\\u0000"}'}, "NUL"),
        ({"resource": "a\x00b"}, "NUL"),
        ({"event_id": "memory:" + "9" * 200}, "longer than"),
        ({"time": "2026-11-30T16:00:00"}, "no zone"),
        ({"time": "yesterday"}, "malformed"),
        ({"service": ""}, "lacks service"),
    ],
)
def test_envelopes_that_can_never_be_appended(change: dict[str, str], why: str) -> None:
    with pytest.raises(InvalidEventError, match=why):
        parse_envelope({**envelope("t", 1), **change})


async def test_the_server_checkpoints_heads_under_its_lease(
    make_database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database of its own: the session's server holds the checkpoint lease of its own.
    monkeypatch.setenv("AETERNA_GOVERNANCE_AUDIT_CHECKPOINT_INTERVAL_S", "0.1")
    server, app = await start_governance(await make_database())
    try:
        audit = AuditLog(app.deps.db)
        t = new_tenant()
        for n in (1, 2, 3):
            await audit.append(parse_envelope(envelope(t, n)))

        async def recorded() -> bool:
            mark = (await audit.verify(t)).checkpoint
            return mark is not None and mark.sequence == 3

        await until(recorded, 30, "a checkpoint of the tenant's head")
        outcome = await audit.verify(t)
        assert outcome.valid and outcome.checkpoint is not None
        assert outcome.checkpoint.hash == outcome.head_hash
    finally:
        await server.stop()
