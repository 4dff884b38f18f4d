"""Use cases of ``PolicyService`` over PostgreSQL: policies, suppressions, checks and drift.

Called after the servicer's tenant check and access check. Every write is one tenant
transaction with its outbox event (``store.run_write``), idempotent by ``request_id`` where
the request has one. Checks read the unit's chain, the policies on it and the suppressions
in one read-only transaction and evaluate with :mod:`.engine` (no SQL there); times come
from PostgreSQL's clock.

Tables (migration ``0002_policies.sql``): ``policies`` (rules as one JSONB array),
``suppressions``, ``drift_reports`` (a unit's last violations; suppressions are applied
when it is read).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common.context import Principal
from aeterna_common.db import Database
from aeterna_common.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    NotFound,
    PreconditionViolated,
)
from aeterna_common.names import unit_name
from google.protobuf import json_format

from aeterna_governance import store
from aeterna_governance.organization import etag, timestamp
from aeterna_governance.policy import engine
from aeterna_governance.policy.model import (
    CheckResult,
    MergeStrategy,
    Policy,
    PolicyContext,
    PolicyMode,
    Rule,
    RuleOperator,
    RuleTarget,
    RuleType,
    Severity,
    Suppression,
    Violation,
)

_POLICY_COLUMNS = (
    "id, org_unit_id, display_name, mode, merge_strategy, rules, revision, created_at, updated_at"
)
_SUPPRESSION_COLUMNS = "id, policy_id, rule_id, org_unit_id, reason, expire_at, creator, created_at"

CHAIN_SQL = """
WITH RECURSIVE up(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM org_units WHERE tenant_id = $1 AND id = $2
    UNION ALL
    SELECT o.id, o.parent_id, up.depth + 1
    FROM org_units o JOIN up ON o.tenant_id = $1 AND o.id = up.parent_id
)
SELECT id FROM up ORDER BY depth DESC
"""
"""The unit's ancestors and itself, root first (at most four rows: the tree's depth)."""


def policy_name(tenant_id: str, policy_id: str) -> str:
    """``tenants/{tenant}/policies/{policy}``."""
    return f"tenants/{tenant_id}/policies/{policy_id}"


def rules_json(rules: Sequence[Rule]) -> str:
    """The JSONB text of a policy's rules (enums as proto numbers)."""
    return json.dumps(
        [
            {
                "id": r.id,
                "type": int(r.type),
                "target": int(r.target),
                "operator": int(r.operator),
                "value": r.value,
                "severity": int(r.severity),
                "message": r.message,
            }
            for r in rules
        ]
    )


def _rules(raw: str) -> tuple[Rule, ...]:
    return tuple(
        Rule(
            r["id"],
            RuleType(r["type"]),
            RuleTarget(r["target"]),
            RuleOperator(r["operator"]),
            r["value"],
            Severity(r["severity"]),
            r["message"],
        )
        for r in json.loads(raw)
    )


def policy_pb(tenant_id: str, row: asyncpg.Record) -> res.Policy:
    """A ``Policy`` of a ``policies`` row."""
    return res.Policy(
        name=policy_name(tenant_id, row["id"]),
        display_name=row["display_name"],
        org_unit=unit_name(tenant_id, row["org_unit_id"]),
        mode=row["mode"],
        merge_strategy=row["merge_strategy"],
        rules=[res.PolicyRule(**r) for r in json.loads(row["rules"])],
        create_time=timestamp(row["created_at"]),
        update_time=timestamp(row["updated_at"]),
        etag=etag(row["revision"]),
    )


def _policy(tenant_id: str, row: asyncpg.Record) -> Policy:
    return Policy(
        policy_name(tenant_id, row["id"]),
        row["org_unit_id"],
        PolicyMode(row["mode"]),
        MergeStrategy(row["merge_strategy"]),
        _rules(row["rules"]),
    )


def suppression_pb(tenant_id: str, row: asyncpg.Record) -> res.Suppression:
    """A ``Suppression`` of a ``suppressions`` row."""
    return res.Suppression(
        name=f"tenants/{tenant_id}/suppressions/{row['id']}",
        policy=policy_name(tenant_id, row["policy_id"]),
        rule_id=row["rule_id"],
        org_unit=unit_name(tenant_id, row["org_unit_id"]),
        reason=row["reason"],
        expire_time=timestamp(row["expire_at"]),
        creator=row["creator"],
        create_time=timestamp(row["created_at"]),
    )


def violation_pb(v: Violation) -> res.Violation:
    """A ``Violation`` message."""
    return res.Violation(
        policy=v.policy,
        rule_id=v.rule_id,
        severity=res.Severity.Value(f"SEVERITY_{v.severity.name}"),
        message=v.message,
        suppressed=v.suppressed,
    )


def context_of(message: res.PolicyContext) -> PolicyContext:
    """The engine's context of a request's ``PolicyContext``."""
    return PolicyContext(
        path=message.path,
        content=message.content,
        dependencies=tuple(message.dependencies),
        imports=tuple(message.imports),
        config=json_format.MessageToDict(message.config) if message.HasField("config") else {},
    )


def _policy_not_found(tenant_id: str, policy_id: str) -> NotFound:
    name = policy_name(tenant_id, policy_id)
    return NotFound(f"policy {name} not found", reason="POLICY_NOT_FOUND", metadata={"name": name})


def _unit_not_found(tenant_id: str, unit_id: str) -> NotFound:
    name = unit_name(tenant_id, unit_id)
    return NotFound(
        f"org unit {name} not found", reason="ORG_UNIT_NOT_FOUND", metadata={"name": name}
    )


async def _lock_policy(
    conn: asyncpg.Connection, tenant_id: str, policy_id: str, given_etag: str
) -> asyncpg.Record:
    """Lock a policy's row for a write (``FOR UPDATE``) and check the caller's etag.

    Raises:
        NotFound: No such policy.
        Aborted: Stale etag (reason ``ETAG_MISMATCH``).
    """
    row = await conn.fetchrow(
        f"SELECT {_POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_id,
        policy_id,
    )
    if row is None:
        raise _policy_not_found(tenant_id, policy_id)
    if given_etag and given_etag != etag(row["revision"]):
        name = policy_name(tenant_id, policy_id)
        raise Aborted(
            f"{name} changed since the etag was read; get it again",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )
    return row


@dataclass(frozen=True, slots=True)
class Checked:
    """A check's outcome and when it was made (PostgreSQL's clock)."""

    result: CheckResult
    time: datetime


class Policies:
    """Use cases of ``PolicyService`` (after the tenant and access checks).

    Args:
        db: The application role's pool.
        idempotency_ttl_s: Seconds a ``request_id`` is remembered.
    """

    def __init__(self, db: Database, *, idempotency_ttl_s: float) -> None:
        self.db = db
        self.idempotency_ttl_s = idempotency_ttl_s

    def key(
        self, tenant_id: str, principal: Principal, method: str, request_id: str, digest: str
    ) -> store.WriteKey:
        """The idempotency key of a write."""
        return store.WriteKey(
            tenant_id, principal.actor, method, request_id, digest, self.idempotency_ttl_s
        )

    # ----- lookups for authorization -----

    async def unit_of_policy(self, tenant_id: str, policy_id: str) -> str | None:
        """The unit a policy is attached to, or None when there is no such policy (the
        servicer authorizes against it before answering anything about the policy)."""

        async def work(conn: asyncpg.Connection) -> str | None:
            value = await conn.fetchval(
                "SELECT org_unit_id FROM policies WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                policy_id,
            )
            return str(value) if value is not None else None

        return await self.db.run(tenant_id, work, readonly=True)

    async def unit_of_suppression(self, tenant_id: str, suppression_id: str) -> str | None:
        """The unit of a suppression, or None when there is no such suppression."""

        async def work(conn: asyncpg.Connection) -> str | None:
            value = await conn.fetchval(
                "SELECT org_unit_id FROM suppressions WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(suppression_id),
            )
            return str(value) if value is not None else None

        return await self.db.run(tenant_id, work, readonly=True)

    # ----- policies -----

    async def create(
        self,
        key: store.WriteKey,
        policy_id: str,
        policy: res.Policy,
        unit_id: str,
        rules: Sequence[Rule],
    ) -> tuple[res.Policy, int]:
        """Create a validated policy at ``unit_id``.

        Raises:
            PreconditionViolated: The unit does not exist (field ``policy.org_unit``, reason
                ``ORG_UNIT_NOT_FOUND``).
            AlreadyExists: The id is taken (reason ``POLICY_EXISTS``).
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.Policy, int]:
            if not await conn.fetchval(
                "SELECT true FROM org_units WHERE tenant_id = $1 AND id = $2", tenant_id, unit_id
            ):
                raise PreconditionViolated(
                    [FieldViolation("policy.org_unit", "no such unit", "ORG_UNIT_NOT_FOUND")]
                )
            row = await conn.fetchrow(
                "INSERT INTO policies (tenant_id, id, org_unit_id, display_name, mode, "
                "merge_strategy, rules) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) "
                f"ON CONFLICT DO NOTHING RETURNING {_POLICY_COLUMNS}",
                tenant_id,
                policy_id,
                unit_id,
                policy.display_name,
                policy.mode or PolicyMode.OPTIONAL,
                policy.merge_strategy or MergeStrategy.MERGE,
                rules_json(rules),
            )
            if row is None:
                name = policy_name(tenant_id, policy_id)
                raise AlreadyExists(
                    f"policy {name} exists already", reason="POLICY_EXISTS", metadata={"name": name}
                )
            created = policy_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.policy.created",
                created.name,
                key.principal,
                {
                    "org_unit": created.org_unit,
                    "mode": res.PolicyMode.Name(created.mode),
                    "rules": len(rules),
                },
            )
            return created, position

        return await store.run_write(self.db, key, res.Policy, work)

    async def get(self, tenant_id: str, policy_id: str) -> res.Policy:
        """The policy.

        Raises:
            NotFound: Reason ``POLICY_NOT_FOUND``.
        """

        async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                f"SELECT {_POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                policy_id,
            )

        row = await self.db.run(tenant_id, work, readonly=True)
        if row is None:
            raise _policy_not_found(tenant_id, policy_id)
        return policy_pb(tenant_id, row)

    async def list_policies(
        self, tenant_id: str, unit_id: str | None, after: str | None, limit: int
    ) -> list[res.Policy]:
        """Policies ordered by id after ``after``; those attached to ``unit_id`` when given."""

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f"SELECT {_POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 "
                    "AND ($2::text IS NULL OR org_unit_id = $2) "
                    "AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4",
                    tenant_id,
                    unit_id,
                    after,
                    limit,
                )
            )

        return [policy_pb(tenant_id, r) for r in await self.db.run(tenant_id, work, readonly=True)]

    async def update(
        self,
        key: store.WriteKey,
        policy_id: str,
        changes: dict[str, Any],
        given_etag: str,
    ) -> tuple[res.Policy, int]:
        """Change some of ``display_name``, ``mode``, ``merge_strategy``, ``rules``.

        Args:
            key: The idempotency key (no ``request_id``: updates are naturally idempotent).
            policy_id: The policy.
            changes: Column → validated new value (``rules`` as a sequence of rules).
            given_etag: The etag the caller read, or empty.

        Raises:
            NotFound: No such policy.
            Aborted: Stale etag (reason ``ETAG_MISMATCH``).
        """
        tenant_id = key.tenant_id
        name = policy_name(tenant_id, policy_id)

        async def work(conn: asyncpg.Connection) -> tuple[res.Policy, int]:
            current = await _lock_policy(conn, tenant_id, policy_id, given_etag)
            row = await conn.fetchrow(
                "UPDATE policies SET display_name = $3, mode = $4, merge_strategy = $5, "
                "rules = $6::jsonb, revision = revision + 1, updated_at = clock_timestamp() "
                f"WHERE tenant_id = $1 AND id = $2 RETURNING {_POLICY_COLUMNS}",
                tenant_id,
                policy_id,
                changes.get("display_name", current["display_name"]),
                changes.get("mode", current["mode"]),
                changes.get("merge_strategy", current["merge_strategy"]),
                rules_json(changes["rules"]) if "rules" in changes else current["rules"],
            )
            assert row is not None
            updated = policy_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.policy.updated",
                name,
                key.principal,
                {"fields": sorted(changes)},
            )
            return updated, position

        return await store.run_write(self.db, key, res.Policy, work)

    async def delete(
        self, key: store.WriteKey, policy_id: str, given_etag: str
    ) -> tuple[res.Policy, int]:
        """Delete a policy and its suppressions.

        Raises:
            NotFound: No such policy.
            Aborted: Stale etag (reason ``ETAG_MISMATCH``).
        """
        tenant_id = key.tenant_id
        name = policy_name(tenant_id, policy_id)

        async def work(conn: asyncpg.Connection) -> tuple[res.Policy, int]:
            row = await _lock_policy(conn, tenant_id, policy_id, given_etag)
            suppressions = await conn.fetchval(
                "WITH gone AS (DELETE FROM suppressions WHERE tenant_id = $1 AND policy_id = $2 "
                "RETURNING 1) SELECT count(*) FROM gone",
                tenant_id,
                policy_id,
            )
            await conn.execute(
                "DELETE FROM policies WHERE tenant_id = $1 AND id = $2", tenant_id, policy_id
            )
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.policy.deleted",
                name,
                key.principal,
                {"suppressions_deleted": int(suppressions)},
            )
            return policy_pb(tenant_id, row), position

        return await store.run_write(self.db, key, res.Policy, work)

    # ----- checks and drift -----

    async def _chain(self, conn: asyncpg.Connection, tenant_id: str, unit_id: str) -> list[str]:
        chain = [r["id"] for r in await conn.fetch(CHAIN_SQL, tenant_id, unit_id)]
        if not chain:
            raise _unit_not_found(tenant_id, unit_id)
        return chain

    async def _evaluate(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        unit_id: str,
        context: PolicyContext,
        targets: frozenset[RuleTarget],
    ) -> Checked:
        chain = await self._chain(conn, tenant_id, unit_id)
        policies = [
            _policy(tenant_id, r)
            for r in await conn.fetch(
                f"SELECT {_POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 "
                "AND org_unit_id = ANY($2::text[])",
                tenant_id,
                chain,
            )
        ]
        now, suppressions = await self._suppressions(conn, tenant_id, chain)
        in_force = engine.resolve(chain, policies)
        result = engine.check(
            in_force, context, chain=chain, suppressions=suppressions, now=now, targets=targets
        )
        return Checked(result, now)

    async def _suppressions(
        self, conn: asyncpg.Connection, tenant_id: str, chain: list[str]
    ) -> tuple[datetime, list[Suppression]]:
        rows = await conn.fetch(
            "SELECT policy_id, rule_id, org_unit_id, expire_at, clock_timestamp() AS now "
            "FROM suppressions WHERE tenant_id = $1 AND org_unit_id = ANY($2::text[]) "
            "AND expire_at > clock_timestamp()",
            tenant_id,
            chain,
        )
        now = rows[0]["now"] if rows else await conn.fetchval("SELECT clock_timestamp()")
        return now, [
            Suppression(
                policy_name(tenant_id, r["policy_id"]),
                r["rule_id"],
                r["org_unit_id"],
                r["expire_at"],
            )
            for r in rows
        ]

    async def check(
        self,
        tenant_id: str,
        unit_id: str,
        context: PolicyContext,
        targets: frozenset[RuleTarget] = engine.ALL_TARGETS,
    ) -> Checked:
        """Check ``context`` against the rules in force at the unit.

        Raises:
            NotFound: No such unit (reason ``ORG_UNIT_NOT_FOUND``).
        """

        async def work(conn: asyncpg.Connection) -> Checked:
            return await self._evaluate(conn, tenant_id, unit_id, context, targets)

        return await self.db.run(tenant_id, work, readonly=True)

    async def check_drift(
        self, key: store.WriteKey, unit_id: str, context: PolicyContext
    ) -> tuple[res.DriftReport, int]:
        """Check the unit's state and record it as its drift report, with an event.

        Raises:
            NotFound: No such unit (reason ``ORG_UNIT_NOT_FOUND``).
        """
        tenant_id = key.tenant_id
        name = f"{unit_name(tenant_id, unit_id)}/driftReport"

        async def work(conn: asyncpg.Connection) -> tuple[res.DriftReport, int]:
            checked = await self._evaluate(conn, tenant_id, unit_id, context, engine.ALL_TARGETS)
            violations = [
                {
                    "policy": v.policy,
                    "rule_id": v.rule_id,
                    "severity": int(v.severity),
                    "message": v.message,
                }
                for v in checked.result.violations
            ]
            await conn.execute(
                "INSERT INTO drift_reports (tenant_id, org_unit_id, violations, check_time) "
                "VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (tenant_id, org_unit_id) DO UPDATE "
                "SET violations = EXCLUDED.violations, check_time = EXCLUDED.check_time",
                tenant_id,
                unit_id,
                json.dumps(violations),
                checked.time,
            )
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.drift.checked",
                name,
                key.principal,
                {
                    "score": checked.result.drift_score,
                    "blocked": checked.result.blocked,
                    "violations": len(violations),
                },
            )
            return _report(name, checked.result, checked.time), position

        return await store.run_write(self.db, key, res.DriftReport, work)

    async def drift_report(self, tenant_id: str, unit_id: str) -> res.DriftReport:
        """The unit's last drift report with suppressions applied as of now.

        Raises:
            NotFound: No report for the unit (reason ``DRIFT_REPORT_NOT_FOUND``).
        """
        name = f"{unit_name(tenant_id, unit_id)}/driftReport"

        async def work(conn: asyncpg.Connection) -> res.DriftReport:
            row = await conn.fetchrow(
                "SELECT violations, check_time FROM drift_reports "
                "WHERE tenant_id = $1 AND org_unit_id = $2",
                tenant_id,
                unit_id,
            )
            if row is None:
                raise NotFound(
                    f"{name} not found: the unit's drift was never checked",
                    reason="DRIFT_REPORT_NOT_FOUND",
                    metadata={"name": name},
                )
            chain = await self._chain(conn, tenant_id, unit_id)
            now, suppressions = await self._suppressions(conn, tenant_id, chain)
            violations = tuple(
                Violation(
                    v["policy"],
                    v["rule_id"],
                    Severity(v["severity"]),
                    v["message"],
                    engine.is_suppressed(v["policy"], v["rule_id"], chain, suppressions, now),
                )
                for v in json.loads(row["violations"])
            )
            result = CheckResult(
                violations,
                any(v.severity is Severity.BLOCK and not v.suppressed for v in violations),
                engine.drift_score(violations),
            )
            return _report(name, result, row["check_time"])

        return await self.db.run(tenant_id, work, readonly=True)

    # ----- suppressions -----

    async def create_suppression(
        self, key: store.WriteKey, suppression: res.Suppression, policy_id: str, unit_id: str
    ) -> tuple[res.Suppression, int]:
        """Create a validated suppression.

        Raises:
            PreconditionViolated: The policy, its rule or the unit does not exist (fields
                ``suppression.policy``, ``suppression.rule_id``, ``suppression.org_unit``).
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.Suppression, int]:
            rules = await conn.fetchval(
                "SELECT rules FROM policies WHERE tenant_id = $1 AND id = $2", tenant_id, policy_id
            )
            missing: list[FieldViolation] = []
            if rules is None:
                missing.append(
                    FieldViolation("suppression.policy", "no such policy", "POLICY_NOT_FOUND")
                )
            elif suppression.rule_id not in {r.id for r in _rules(rules)}:
                missing.append(
                    FieldViolation(
                        "suppression.rule_id", "no such rule in the policy", "RULE_NOT_FOUND"
                    )
                )
            if not await conn.fetchval(
                "SELECT true FROM org_units WHERE tenant_id = $1 AND id = $2", tenant_id, unit_id
            ):
                missing.append(
                    FieldViolation("suppression.org_unit", "no such unit", "ORG_UNIT_NOT_FOUND")
                )
            if missing:
                raise PreconditionViolated(missing)
            row = await conn.fetchrow(
                "INSERT INTO suppressions (tenant_id, id, policy_id, rule_id, org_unit_id, reason, "
                f"expire_at, creator) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                f"RETURNING {_SUPPRESSION_COLUMNS}",
                tenant_id,
                uuid.uuid4(),
                policy_id,
                suppression.rule_id,
                unit_id,
                suppression.reason,
                suppression.expire_time.ToDatetime(tzinfo=UTC),
                key.principal,
            )
            assert row is not None
            created = suppression_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.suppression.created",
                created.name,
                key.principal,
                {
                    "policy": created.policy,
                    "rule_id": created.rule_id,
                    "org_unit": created.org_unit,
                    "expire_time": created.expire_time.ToJsonString(),
                },
            )
            return created, position

        return await store.run_write(self.db, key, res.Suppression, work)

    async def list_suppressions(
        self, tenant_id: str, show_expired: bool, after: str | None, limit: int
    ) -> list[res.Suppression]:
        """Suppressions ordered by id after ``after``; unexpired ones unless asked."""

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions WHERE tenant_id = $1 "
                    "AND ($2 OR expire_at > clock_timestamp()) "
                    "AND ($3::uuid IS NULL OR id > $3) ORDER BY id LIMIT $4",
                    tenant_id,
                    show_expired,
                    uuid.UUID(after) if after else None,
                    limit,
                )
            )

        rows = await self.db.run(tenant_id, work, readonly=True)
        return [suppression_pb(tenant_id, r) for r in rows]

    async def delete_suppression(
        self, key: store.WriteKey, suppression_id: str
    ) -> tuple[res.Suppression, int]:
        """Delete a suppression.

        Raises:
            NotFound: Reason ``SUPPRESSION_NOT_FOUND``.
        """
        tenant_id = key.tenant_id
        name = f"tenants/{tenant_id}/suppressions/{suppression_id}"

        async def work(conn: asyncpg.Connection) -> tuple[res.Suppression, int]:
            row = await conn.fetchrow(
                f"DELETE FROM suppressions WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_SUPPRESSION_COLUMNS}",
                tenant_id,
                uuid.UUID(suppression_id),
            )
            if row is None:
                raise NotFound(
                    f"suppression {name} not found",
                    reason="SUPPRESSION_NOT_FOUND",
                    metadata={"name": name},
                )
            position = await store.append_event(
                conn, tenant_id, "governance.suppression.deleted", name, key.principal
            )
            return suppression_pb(tenant_id, row), position

        return await store.run_write(self.db, key, res.Suppression, work)


def _report(name: str, result: CheckResult, check_time: datetime) -> res.DriftReport:
    return res.DriftReport(
        name=name,
        score=result.drift_score,
        violations=[violation_pb(v) for v in result.violations],
        check_time=timestamp(check_time),
    )
