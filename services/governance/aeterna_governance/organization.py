"""The org tree, role bindings, delegations and authorization snapshots in PostgreSQL.

Every write is one tenant transaction with its outbox events (``store.run_write``), and
every method is called after the servicer's tenant check and the access check. Methods
whose authorization depends on a stored row (deleting a binding, revoking or extending a
delegation) load it in the write's transaction and refuse a caller without rights with the
same ``PERMISSION_DENIED`` whether or not the row exists (permission before existence).

Rules (DOMAIN.md, Governance; the contracts in ``aeterna/governance/v1``):

* Units: COMPANY ⊃ ORGANIZATION ⊃ TEAM ⊃ PROJECT; a unit's parent is of the kind just above
  it, a COMPANY has none. A move keeps that rule and refuses a cycle; a unit is deleted only
  when no unit, binding or approval request refers to it. The etag is the unit's revision
  (https://google.aip.dev/154); a stale etag is ``ABORTED``.
* Bindings: subject ``users/{u}`` or ``agents/{a}``, a known role, a unit of the same tenant;
  no unit only for TENANT_ADMIN and PLATFORM_ADMIN (tenant-wide).
* Delegations: capabilities ``{domain}:{action}``; an onward delegation's capabilities are a
  subset of its parent's, its depth the parent's + 1, at most 3, and it ends no later than
  its parent. A revocation revokes every delegation made from it, in one transaction.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import cast

import asyncpg
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common.context import Principal, is_identifier
from aeterna_common.db import Database
from aeterna_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolated,
)
from aeterna_common.names import TENANT_PATTERN, UNIT_ID, unit_name
from google.protobuf.timestamp_pb2 import Timestamp

from aeterna_governance import store
from aeterna_governance.access import ORGANIZATION, Access, denied, method

MAX_DEPTH = 3
"""Longest delegation chain (DOMAIN.md: delegation depth ≤ 3)."""

MAX_CAPABILITIES = 32
"""Most capabilities in one delegation (the contract's 1-32)."""

CAPABILITY = re.compile(r"^[a-z][a-z0-9_]{0,30}:[a-z*][a-z0-9_]{0,30}$")
"""A capability: an action group of the permission model, ``{domain}:{action}`` such as
``memory:read``, ``memory:write`` or ``memory:*``."""

DISPLAY_NAME_MAX = 200
"""Longest display name (the contract's 1-200 characters)."""

KIND_NAMES: dict[int, str] = {
    res.ORG_UNIT_KIND_COMPANY: "COMPANY",
    res.ORG_UNIT_KIND_ORGANIZATION: "ORGANIZATION",
    res.ORG_UNIT_KIND_TEAM: "TEAM",
    res.ORG_UNIT_KIND_PROJECT: "PROJECT",
}
TENANT_WIDE_ROLES = (res.ROLE_TENANT_ADMIN, res.ROLE_PLATFORM_ADMIN)
ROLES = frozenset(v for v in res.Role.values() if v != res.ROLE_UNSPECIFIED)
SUBJECT = re.compile(r"^(users|agents)/(.+)$")

_UNIT_COLUMNS = "id, kind, display_name, parent_id, revision, created_at, updated_at"
_BINDING_COLUMNS = "id, subject, role, org_unit_id, creator, created_at"
_DELEGATION_COLUMNS = (
    "id, user_id, agent_id, capabilities, parent_id, depth, state, expire_at, created_at, "
    "revoked_at"
)


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf timestamp of ``value`` (None stays None)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def etag(revision: int) -> str:
    """The etag of a revision (opaque to clients)."""
    return f'"{revision}"'


def role_name(role: int) -> str:
    """``DEVELOPER`` for ``ROLE_DEVELOPER``."""
    return res.Role.Name(role).removeprefix("ROLE_")  # type: ignore[arg-type]


def unit_pb(tenant_id: str, row: asyncpg.Record | None) -> res.OrgUnit:
    """An ``OrgUnit`` of an ``org_units`` row."""
    assert row is not None
    return res.OrgUnit(
        name=unit_name(tenant_id, row["id"]),
        kind=row["kind"],
        display_name=row["display_name"],
        parent=unit_name(tenant_id, row["parent_id"]) if row["parent_id"] else "",
        create_time=timestamp(row["created_at"]),
        update_time=timestamp(row["updated_at"]),
        etag=etag(row["revision"]),
    )


def binding_pb(tenant_id: str, row: asyncpg.Record) -> res.RoleBinding:
    """A ``RoleBinding`` of a ``role_bindings`` row."""
    return res.RoleBinding(
        name=f"tenants/{tenant_id}/roleBindings/{row['id']}",
        subject=row["subject"],
        role=row["role"],
        org_unit=unit_name(tenant_id, row["org_unit_id"]) if row["org_unit_id"] else "",
        creator=row["creator"],
        create_time=timestamp(row["created_at"]),
    )


def delegation_pb(tenant_id: str, row: asyncpg.Record | None) -> res.Delegation:
    """A ``Delegation`` of a ``delegations`` row."""
    assert row is not None
    return res.Delegation(
        name=f"tenants/{tenant_id}/delegations/{row['id']}",
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        capabilities=list(row["capabilities"]),
        parent_delegation=(
            f"tenants/{tenant_id}/delegations/{row['parent_id']}" if row["parent_id"] else ""
        ),
        depth=row["depth"],
        state=row["state"],
        expire_time=timestamp(row["expire_at"]),
        create_time=timestamp(row["created_at"]),
        revoke_time=timestamp(row["revoked_at"]),
    )


def _reference(tenant_id: str, value: str, field: str, collection: str = "orgUnits") -> str:
    """The id of a resource a request body refers to, which must be of the same tenant.

    Raises:
        InvalidArgument: Malformed (reason ``INVALID_NAME``) or of another tenant (reason
            ``CROSS_TENANT_REFERENCE``).
    """
    m = re.fullmatch(r"tenants/([A-Za-z0-9_-]{1,100})/" + collection + r"/([^/]+)", value)
    if not m:
        raise InvalidArgument(
            [
                FieldViolation(
                    field, f"must be tenants/{{tenant}}/{collection}/{{id}}", "INVALID_NAME"
                )
            ]
        )
    if m.group(1) != tenant_id:
        raise InvalidArgument(
            [
                FieldViolation(
                    field, "must be a resource of the same tenant", "CROSS_TENANT_REFERENCE"
                )
            ]
        )
    raw = m.group(2)
    if collection == "orgUnits":
        if not UNIT_ID.match(raw):
            raise InvalidArgument(
                [FieldViolation(field, "unit ids are 1-63 characters of [a-z0-9-]", "INVALID_NAME")]
            )
        return raw
    try:
        return str(uuid.UUID(raw))
    except ValueError as exc:
        raise InvalidArgument(
            [FieldViolation(field, "the id must be a UUID", "INVALID_NAME")]
        ) from exc


def unit_reference(tenant_id: str, value: str, field: str) -> str:
    """The unit id of a body's unit name (see :func:`_reference`)."""
    return _reference(tenant_id, value, field)


def delegation_reference(tenant_id: str, value: str, field: str) -> str:
    """The delegation id of a body's delegation name (see :func:`_reference`)."""
    return _reference(tenant_id, value, field, "delegations")


def check_display_name(value: str, field: str) -> list[FieldViolation]:
    """Violations of a display name (1-200 characters, not blank) in ``field``."""
    if not 1 <= len(value) <= DISPLAY_NAME_MAX or not value.strip():
        return [
            FieldViolation(field, f"1-{DISPLAY_NAME_MAX} characters, not blank", "INVALID_LENGTH")
        ]
    return []


def validate_new_unit(tenant_id: str, unit_id: str, unit: res.OrgUnit) -> str | None:
    """Validate CreateOrgUnit's body; returns the parent's unit id (None for a COMPANY).

    Raises:
        InvalidArgument: One violation per bad field.
    """
    violations: list[FieldViolation] = []
    if not UNIT_ID.match(unit_id):
        violations.append(
            FieldViolation("org_unit_id", "1-63 characters of [a-z0-9-]", "INVALID_UNIT_ID")
        )
    if unit.kind not in KIND_NAMES:
        violations.append(
            FieldViolation(
                "org_unit.kind", "COMPANY, ORGANIZATION, TEAM or PROJECT", "INVALID_KIND"
            )
        )
    violations += check_display_name(unit.display_name, "org_unit.display_name")
    if unit.kind == res.ORG_UNIT_KIND_COMPANY and unit.parent:
        violations.append(
            FieldViolation("org_unit.parent", "a COMPANY has no parent", "INVALID_PARENT")
        )
    if unit.kind in KIND_NAMES and unit.kind != res.ORG_UNIT_KIND_COMPANY and not unit.parent:
        violations.append(
            FieldViolation(
                "org_unit.parent", "required: the unit of the kind just above", "INVALID_PARENT"
            )
        )
    if violations:
        raise InvalidArgument(violations)
    return unit_reference(tenant_id, unit.parent, "org_unit.parent") if unit.parent else None


def validate_binding(tenant_id: str, binding: res.RoleBinding) -> str | None:
    """Validate CreateRoleBinding's body; returns the unit id (None: tenant-wide).

    Raises:
        InvalidArgument: One violation per bad field (unknown role: reason
            ``UNKNOWN_ROLE``).
    """
    violations: list[FieldViolation] = []
    m = SUBJECT.match(binding.subject)
    if not m or not is_identifier(m.group(2)):
        violations.append(
            FieldViolation(
                "role_binding.subject",
                "users/{user} or agents/{agent}, the id 1-255 printable characters without "
                "spaces or '/'",
                "INVALID_SUBJECT",
            )
        )
    if binding.role not in ROLES:
        violations.append(
            FieldViolation(
                "role_binding.role",
                "one of " + ", ".join(role_name(r) for r in sorted(ROLES)),
                "UNKNOWN_ROLE",
            )
        )
    elif binding.role in TENANT_WIDE_ROLES and binding.org_unit:
        violations.append(
            FieldViolation(
                "role_binding.org_unit",
                f"{role_name(binding.role)} holds for the whole tenant: leave the unit empty",
                "TENANT_WIDE_ROLE",
            )
        )
    elif binding.role not in TENANT_WIDE_ROLES and not binding.org_unit:
        violations.append(
            FieldViolation(
                "role_binding.org_unit",
                "required for every role but TENANT_ADMIN and PLATFORM_ADMIN",
                "MISSING_UNIT",
            )
        )
    if violations:
        raise InvalidArgument(violations)
    return (
        unit_reference(tenant_id, binding.org_unit, "role_binding.org_unit")
        if binding.org_unit
        else None
    )


def validate_delegation(tenant_id: str, d: res.Delegation, now: datetime) -> str | None:
    """Validate CreateDelegation's body; returns the parent delegation's id, if any.

    Raises:
        InvalidArgument: One violation per bad field.
    """
    violations: list[FieldViolation] = []
    for field, value in (("delegation.user_id", d.user_id), ("delegation.agent_id", d.agent_id)):
        if not is_identifier(value):
            violations.append(
                FieldViolation(
                    field, "1-255 printable characters without spaces or '/'", "INVALID_ID"
                )
            )
    caps = list(d.capabilities)
    if not 1 <= len(caps) <= MAX_CAPABILITIES:
        violations.append(
            FieldViolation(
                "delegation.capabilities", f"1-{MAX_CAPABILITIES} capabilities", "INVALID_LENGTH"
            )
        )
    for i, cap in enumerate(caps):
        if not CAPABILITY.match(cap):
            violations.append(
                FieldViolation(
                    f"delegation.capabilities[{i}]",
                    "{domain}:{action}, e.g. memory:read",
                    "INVALID_CAPABILITY",
                )
            )
    if len(set(caps)) != len(caps):
        violations.append(
            FieldViolation("delegation.capabilities", "repeated capability", "DUPLICATE")
        )
    if d.HasField("expire_time") and d.expire_time.ToDatetime(tzinfo=UTC) <= now:
        violations.append(
            FieldViolation("delegation.expire_time", "must be in the future", "IN_THE_PAST")
        )
    if violations:
        raise InvalidArgument(violations)
    if not d.parent_delegation:
        return None
    return delegation_reference(tenant_id, d.parent_delegation, "delegation.parent_delegation")


def _check_etag(given: str, revision: int, name: str) -> None:
    if given and given != etag(revision):
        raise Aborted(
            f"{name} changed since the etag was read; get it again",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )


def _unit_not_found(tenant_id: str, unit_id: str) -> NotFound:
    name = unit_name(tenant_id, unit_id)
    return NotFound(
        f"org unit {name} not found", reason="ORG_UNIT_NOT_FOUND", metadata={"name": name}
    )


class Organization:
    """Use cases of ``OrganizationService`` (after the tenant and access checks).

    Args:
        db: The application role's pool.
        access: The access check (for row-dependent rights).
        idempotency_ttl_s: Seconds a ``request_id`` is remembered.
    """

    def __init__(self, db: Database, access: Access, *, idempotency_ttl_s: float) -> None:
        self.db = db
        self.access = access
        self.idempotency_ttl_s = idempotency_ttl_s

    def key(
        self, tenant_id: str, principal: Principal, method: str, request_id: str, digest: str
    ) -> store.WriteKey:
        """The idempotency key of a write."""
        return store.WriteKey(
            tenant_id, principal.actor, method, request_id, digest, self.idempotency_ttl_s
        )

    async def _write(
        self, key: store.WriteKey, kind: type[store.M], work: store.Work[store.M]
    ) -> tuple[store.M, int]:
        # Every write here changes what the tenant's bindings snapshot holds: this replica
        # drops its cached copy once committed (other replicas: the events, or the TTL).
        await self.access.prefetch(key.tenant_id)  # row-dependent checks decide inside
        try:
            return await store.run_write(self.db, key, kind, work)
        finally:
            self.access.written(key.tenant_id)

    async def _row(self, tenant_id: str, sql: str, *args: object) -> asyncpg.Record | None:
        """One row of a read-only query whose ``$1`` is the tenant."""

        async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(sql, tenant_id, *args)

        return await self.db.run(tenant_id, work, readonly=True)

    async def _rows(self, tenant_id: str, sql: str, *args: object) -> list[asyncpg.Record]:
        """The rows of a read-only query whose ``$1`` is the tenant."""

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(await conn.fetch(sql, tenant_id, *args))

        return await self.db.run(tenant_id, work, readonly=True)

    # ----- org units -----

    async def create_unit(
        self,
        key: store.WriteKey,
        unit_id: str,
        unit: res.OrgUnit,
        parent_id: str | None,
    ) -> tuple[res.OrgUnit, int]:
        """Create a unit under ``parent_id``.

        Raises:
            InvalidArgument: The parent is not of the kind just above (field
                ``org_unit.parent``, reason ``PARENT_KIND_MISMATCH``).
            PreconditionViolated: The parent does not exist (reason ``PARENT_NOT_FOUND``).
            AlreadyExists: The id is taken.
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.OrgUnit, int]:
            if parent_id is not None:
                kind = await conn.fetchval(
                    "SELECT kind FROM org_units WHERE tenant_id = $1 AND id = $2",
                    tenant_id,
                    parent_id,
                )
                if kind is None:
                    raise PreconditionViolated(
                        [FieldViolation("org_unit.parent", "no such unit", "PARENT_NOT_FOUND")]
                    )
                if kind != unit.kind - 1:
                    raise InvalidArgument(
                        [
                            FieldViolation(
                                "org_unit.parent",
                                f"a {KIND_NAMES[unit.kind]} belongs to a "
                                f"{KIND_NAMES[unit.kind - 1]}, not a {KIND_NAMES[kind]}",
                                "PARENT_KIND_MISMATCH",
                            )
                        ]
                    )
            row = await conn.fetchrow(
                "INSERT INTO org_units (tenant_id, id, kind, display_name, parent_id, parent_kind)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
                f" RETURNING {_UNIT_COLUMNS}",
                tenant_id,
                unit_id,
                unit.kind,
                unit.display_name,
                parent_id,
                unit.kind - 1 if parent_id else None,
            )
            if row is None:
                name = unit_name(tenant_id, unit_id)
                raise AlreadyExists(
                    f"org unit {name} exists already",
                    reason="ORG_UNIT_EXISTS",
                    metadata={"name": name},
                )
            created = unit_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.org_unit.created",
                created.name,
                key.principal,
                {"kind": KIND_NAMES[unit.kind], "parent": created.parent},
            )
            return created, position

        return await self._write(key, res.OrgUnit, work)

    async def get_unit(self, tenant_id: str, unit_id: str) -> res.OrgUnit:
        """The unit.

        Raises:
            NotFound: Reason ``ORG_UNIT_NOT_FOUND``.
        """
        row = await self._row(
            tenant_id,
            f"SELECT {_UNIT_COLUMNS} FROM org_units WHERE tenant_id = $1 AND id = $2",
            unit_id,
        )
        if row is None:
            raise _unit_not_found(tenant_id, unit_id)
        return unit_pb(tenant_id, row)

    async def list_units(
        self, tenant_id: str, parent_id: str | None, after: str | None, limit: int
    ) -> list[res.OrgUnit]:
        """Units ordered by id, after ``after``; children of ``parent_id`` when given."""
        rows = await self._rows(
            tenant_id,
            f"SELECT {_UNIT_COLUMNS} FROM org_units WHERE tenant_id = $1 "
            "AND ($2::text IS NULL OR parent_id = $2) AND ($3::text IS NULL OR id > $3) "
            "ORDER BY id LIMIT $4",
            parent_id,
            after,
            limit,
        )
        return [unit_pb(tenant_id, r) for r in rows]

    async def update_unit(
        self, key: store.WriteKey, unit_id: str, display_name: str, given_etag: str
    ) -> tuple[res.OrgUnit, int]:
        """Change the display name.

        Raises:
            NotFound: No such unit.
            Aborted: Stale etag (reason ``ETAG_MISMATCH``).
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.OrgUnit, int]:
            revision = await self._lock_unit(conn, tenant_id, unit_id, given_etag)
            row = await conn.fetchrow(
                "UPDATE org_units SET display_name = $3, revision = $4 + 1, "
                "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_UNIT_COLUMNS}",
                tenant_id,
                unit_id,
                display_name,
                revision,
            )
            updated = unit_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.org_unit.updated",
                updated.name,
                key.principal,
                {"fields": ["display_name"]},
            )
            return updated, position

        return await self._write(key, res.OrgUnit, work)

    async def _lock_unit(
        self, conn: asyncpg.Connection, tenant_id: str, unit_id: str, given_etag: str
    ) -> int:
        revision = await conn.fetchval(
            "SELECT revision FROM org_units WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            tenant_id,
            unit_id,
        )
        if revision is None:
            raise _unit_not_found(tenant_id, unit_id)
        _check_etag(given_etag, revision, unit_name(tenant_id, unit_id))
        return int(revision)

    async def move_unit(
        self, key: store.WriteKey, unit_id: str, new_parent_id: str, given_etag: str
    ) -> tuple[res.OrgUnit, int]:
        """Move a unit under another parent of the kind just above it.

        Raises:
            NotFound: No such unit.
            Aborted: Stale etag.
            InvalidArgument: The move would make a cycle (field ``new_parent``, reason
                ``CYCLE``) or the new parent is not of the kind just above (reason
                ``PARENT_KIND_MISMATCH``).
            PreconditionViolated: The new parent does not exist (``PARENT_NOT_FOUND``).
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.OrgUnit, int]:
            revision = await self._lock_unit(conn, tenant_id, unit_id, given_etag)
            # The new parent's ancestors, itself first: the unit among them is a cycle.
            ancestors = await conn.fetch(
                "WITH RECURSIVE up(id, parent_id, kind, depth) AS ("
                " SELECT id, parent_id, kind, 0 FROM org_units WHERE tenant_id = $1 AND id = $2"
                " UNION ALL SELECT o.id, o.parent_id, o.kind, up.depth + 1 FROM org_units o"
                " JOIN up ON o.tenant_id = $1 AND o.id = up.parent_id WHERE up.depth < 8)"
                " SELECT id, kind FROM up ORDER BY depth",
                tenant_id,
                new_parent_id,
            )
            if not ancestors:
                raise PreconditionViolated(
                    [FieldViolation("new_parent", "no such unit", "PARENT_NOT_FOUND")]
                )
            if any(a["id"] == unit_id for a in ancestors):
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "new_parent",
                            "is the unit itself or below it: the tree would have a cycle",
                            "CYCLE",
                        )
                    ]
                )
            kind = await conn.fetchval(
                "SELECT kind FROM org_units WHERE tenant_id = $1 AND id = $2", tenant_id, unit_id
            )
            parent_kind = ancestors[0]["kind"]
            if parent_kind != kind - 1:
                wanted = KIND_NAMES.get(kind - 1, "nothing (a COMPANY has no parent)")
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "new_parent",
                            f"a {KIND_NAMES[kind]} belongs to a {wanted}, not a "
                            f"{KIND_NAMES[parent_kind]}",
                            "PARENT_KIND_MISMATCH",
                        )
                    ]
                )
            row = await conn.fetchrow(
                "UPDATE org_units SET parent_id = $3, revision = $4 + 1, "
                "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_UNIT_COLUMNS}",
                tenant_id,
                unit_id,
                new_parent_id,
                revision,
            )
            moved = unit_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.org_unit.moved",
                moved.name,
                key.principal,
                {"parent": moved.parent},
            )
            return moved, position

        return await self._write(key, res.OrgUnit, work)

    async def delete_unit(
        self, key: store.WriteKey, unit_id: str, given_etag: str
    ) -> tuple[res.OrgUnit, int]:
        """Delete a unit nothing refers to.

        Raises:
            NotFound: No such unit.
            Aborted: Stale etag.
            FailedPrecondition: Units, bindings, approval requests, policies or suppressions
                refer to it (reason ``ORG_UNIT_NOT_EMPTY``, ``metadata`` counts them).
        """
        tenant_id = key.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.OrgUnit, int]:
            await self._lock_unit(conn, tenant_id, unit_id, given_etag)
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM org_units WHERE tenant_id = $1 AND parent_id = $2)"
                " AS units, (SELECT count(*) FROM role_bindings WHERE tenant_id = $1"
                " AND org_unit_id = $2) AS bindings, (SELECT count(*) FROM approval_requests"
                " WHERE tenant_id = $1 AND org_unit_id = $2) AS approvals, (SELECT count(*)"
                " FROM policies WHERE tenant_id = $1 AND org_unit_id = $2) AS policies,"
                " (SELECT count(*) FROM suppressions WHERE tenant_id = $1"
                " AND org_unit_id = $2) AS suppressions",
                tenant_id,
                unit_id,
            )
            assert counts is not None
            if any(counts.values()):
                raise FailedPrecondition(
                    f"org unit {unit_name(tenant_id, unit_id)} is not empty: "
                    f"{counts['units']} units, {counts['bindings']} role bindings and "
                    f"{counts['approvals']} approval requests, {counts['policies']} policies "
                    f"and {counts['suppressions']} suppressions refer to it",
                    reason="ORG_UNIT_NOT_EMPTY",
                    metadata={k: str(v) for k, v in counts.items()},
                )
            row = await conn.fetchrow(
                f"DELETE FROM org_units WHERE tenant_id = $1 AND id = $2 RETURNING {_UNIT_COLUMNS}",
                tenant_id,
                unit_id,
            )
            deleted = unit_pb(tenant_id, row)
            position = await store.append_event(
                conn, tenant_id, "governance.org_unit.deleted", deleted.name, key.principal
            )
            return deleted, position

        return await self._write(key, res.OrgUnit, work)

    # ----- role bindings -----

    async def create_binding(
        self, key: store.WriteKey, binding: res.RoleBinding, unit_id: str | None
    ) -> tuple[res.RoleBinding, int]:
        """Bind a role.

        Raises:
            PreconditionViolated: The unit does not exist (reason ``ORG_UNIT_NOT_FOUND``).
            AlreadyExists: The same subject holds the same role at the same unit.
        """
        tenant_id = key.tenant_id
        binding_id = uuid.uuid4()

        async def work(conn: asyncpg.Connection) -> tuple[res.RoleBinding, int]:
            if unit_id is not None and not await conn.fetchval(
                "SELECT 1 FROM org_units WHERE tenant_id = $1 AND id = $2 FOR SHARE",
                tenant_id,
                unit_id,
            ):
                raise PreconditionViolated(
                    [FieldViolation("role_binding.org_unit", "no such unit", "ORG_UNIT_NOT_FOUND")]
                )
            row = await conn.fetchrow(
                "INSERT INTO role_bindings (tenant_id, id, subject, role, org_unit_id, creator) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING "
                f"RETURNING {_BINDING_COLUMNS}",
                tenant_id,
                binding_id,
                binding.subject,
                binding.role,
                unit_id,
                key.principal,
            )
            if row is None:
                raise AlreadyExists(
                    f"{binding.subject} holds {role_name(binding.role)} there already",
                    reason="ROLE_BINDING_EXISTS",
                )
            created = binding_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.role_binding.created",
                created.name,
                key.principal,
                {
                    "subject": created.subject,
                    "role": role_name(created.role),
                    "org_unit": created.org_unit,
                },
            )
            return created, position

        return await self._write(key, res.RoleBinding, work)

    async def get_binding(self, tenant_id: str, binding_id: str) -> res.RoleBinding:
        """The binding.

        Raises:
            NotFound: Reason ``ROLE_BINDING_NOT_FOUND``.
        """
        row = await self._row(
            tenant_id,
            f"SELECT {_BINDING_COLUMNS} FROM role_bindings WHERE tenant_id = $1 AND id = $2",
            uuid.UUID(binding_id),
        )
        if row is None:
            raise _binding_not_found(tenant_id, binding_id)
        return binding_pb(tenant_id, row)

    async def list_bindings(
        self,
        tenant_id: str,
        subject: str | None,
        unit_id: str | None,
        after: str | None,
        limit: int,
    ) -> list[res.RoleBinding]:
        """Bindings ordered by id, after ``after``, optionally of one subject or unit."""
        rows = await self._rows(
            tenant_id,
            f"SELECT {_BINDING_COLUMNS} FROM role_bindings WHERE tenant_id = $1 "
            "AND ($2::text IS NULL OR subject = $2) AND ($3::text IS NULL OR org_unit_id = $3) "
            "AND ($4::uuid IS NULL OR id > $4) ORDER BY id LIMIT $5",
            subject,
            unit_id,
            uuid.UUID(after) if after else None,
            limit,
        )
        return [binding_pb(tenant_id, r) for r in rows]

    async def delete_binding(
        self, key: store.WriteKey, principal: Principal, binding_id: str
    ) -> tuple[res.RoleBinding, int]:
        """Delete a binding; the caller must be admin at its unit (tenant admin for a
        tenant-wide binding).

        Raises:
            PermissionDenied: The caller may not (also when the binding does not exist and
                the caller is not a tenant admin: permission before existence).
            NotFound: No such binding (tenant admins only).
        """
        tenant_id = key.tenant_id
        action = method(ORGANIZATION, "DeleteRoleBinding")

        async def work(conn: asyncpg.Connection) -> tuple[res.RoleBinding, int]:
            row = await conn.fetchrow(
                f"SELECT {_BINDING_COLUMNS} FROM role_bindings WHERE tenant_id = $1 AND id = $2 "
                "FOR UPDATE",
                tenant_id,
                uuid.UUID(binding_id),
            )
            unit = row["org_unit_id"] if row is not None else None
            if not await self.access.allowed_at(principal, tenant_id, action, unit):
                raise denied(action)
            if row is None:
                raise _binding_not_found(tenant_id, binding_id)
            await conn.execute(
                "DELETE FROM role_bindings WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(binding_id),
            )
            deleted = binding_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.role_binding.deleted",
                deleted.name,
                key.principal,
                {
                    "subject": deleted.subject,
                    "role": role_name(deleted.role),
                    "org_unit": deleted.org_unit,
                },
            )
            return deleted, position

        return await self._write(key, res.RoleBinding, work)

    # ----- delegations -----

    async def create_delegation(
        self,
        key: store.WriteKey,
        principal: Principal,
        d: res.Delegation,
        parent_id: str | None,
    ) -> tuple[res.Delegation, int]:
        """Delegate capabilities to an agent.

        A user delegates directly (``parent_id`` None) only for themselves; an agent
        delegates onward only from a delegation it holds for the same user. A tenant admin
        may do both for anyone.

        Raises:
            PermissionDenied: The caller may not (also for a parent delegation that does
                not exist, unless the caller is a tenant admin).
            PreconditionViolated: The parent is revoked or expired (``PARENT_INACTIVE``), of
                another user (``USER_MISMATCH``), the chain would exceed depth 3
                (``DELEGATION_TOO_DEEP``), or capabilities exceed the parent's
                (``CAPABILITY_NOT_DELEGATED``).
        """
        tenant_id = key.tenant_id
        action = method(ORGANIZATION, "CreateDelegation")
        delegation_id = uuid.uuid4()
        expire_at = d.expire_time.ToDatetime(tzinfo=UTC) if d.HasField("expire_time") else None

        async def work(conn: asyncpg.Connection) -> tuple[res.Delegation, int]:
            is_admin = await self.access.tenant_admin(principal, tenant_id, action)
            depth = 1
            until = expire_at
            if parent_id is None:
                if not is_admin and (principal.agent_id or principal.user_id != d.user_id):
                    raise denied(action)
            else:
                parent = await conn.fetchrow(
                    "SELECT user_id, agent_id, capabilities, depth, state, expire_at, "
                    "expire_at IS NOT NULL AND expire_at <= clock_timestamp() AS expired "
                    "FROM delegations WHERE tenant_id = $1 AND id = $2 FOR SHARE",
                    tenant_id,
                    uuid.UUID(parent_id),
                )
                holder = (
                    parent is not None
                    and principal.agent_id == parent["agent_id"]
                    and principal.user_id == parent["user_id"]
                )
                if not (is_admin or holder):
                    raise denied(action)
                if parent is None:
                    raise PreconditionViolated(
                        [
                            FieldViolation(
                                "delegation.parent_delegation",
                                "no such delegation",
                                "PARENT_NOT_FOUND",
                            )
                        ]
                    )
                violations = _onward_violations(d, parent)
                if violations:
                    raise PreconditionViolated(violations)
                depth = parent["depth"] + 1
                if parent["expire_at"] is not None and (
                    until is None or until > parent["expire_at"]
                ):
                    until = parent["expire_at"]  # never outlives what it was made from
            row = await conn.fetchrow(
                "INSERT INTO delegations (tenant_id, id, user_id, agent_id, capabilities, "
                "parent_id, depth, creator, expire_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                f"$9) RETURNING {_DELEGATION_COLUMNS}",
                tenant_id,
                delegation_id,
                d.user_id,
                d.agent_id,
                list(d.capabilities),
                uuid.UUID(parent_id) if parent_id else None,
                depth,
                key.principal,
                until,
            )
            created = delegation_pb(tenant_id, row)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.delegation.created",
                created.name,
                key.principal,
                {
                    "user_id": created.user_id,
                    "agent_id": created.agent_id,
                    "capabilities": list(created.capabilities),
                    "depth": created.depth,
                    "parent_delegation": created.parent_delegation,
                },
            )
            return created, position

        return await self._write(key, res.Delegation, work)

    async def get_delegation(self, tenant_id: str, delegation_id: str) -> res.Delegation:
        """The delegation.

        Raises:
            NotFound: Reason ``DELEGATION_NOT_FOUND``.
        """
        row = await self._row(
            tenant_id,
            f"SELECT {_DELEGATION_COLUMNS} FROM delegations WHERE tenant_id = $1 AND id = $2",
            uuid.UUID(delegation_id),
        )
        if row is None:
            raise _delegation_not_found(tenant_id, delegation_id)
        return delegation_pb(tenant_id, row)

    async def list_delegations(
        self,
        tenant_id: str,
        user_id: str | None,
        agent_id: str | None,
        show_revoked: bool,
        after: str | None,
        limit: int,
    ) -> list[res.Delegation]:
        """Delegations ordered by id, after ``after``; active ones unless ``show_revoked``."""
        rows = await self._rows(
            tenant_id,
            f"SELECT {_DELEGATION_COLUMNS} FROM delegations WHERE tenant_id = $1 "
            "AND ($2::text IS NULL OR user_id = $2) AND ($3::text IS NULL OR agent_id = $3)"
            " AND ($4 OR state = 1) AND ($5::uuid IS NULL OR id > $5) ORDER BY id LIMIT $6",
            user_id,
            agent_id,
            show_revoked,
            uuid.UUID(after) if after else None,
            limit,
        )
        return [delegation_pb(tenant_id, r) for r in rows]

    async def revoke_delegation(
        self, key: store.WriteKey, principal: Principal, delegation_id: str
    ) -> tuple[res.Delegation, int]:
        """Revoke a delegation and, in the same transaction, every delegation made from it.

        The delegating user, the agent that delegated onward, or a tenant admin may revoke.
        Revoking a revoked delegation returns it unchanged.

        Raises:
            PermissionDenied: The caller may not (also when it does not exist, unless the
                caller is a tenant admin).
            NotFound: No such delegation (tenant admins only).
        """
        tenant_id = key.tenant_id
        action = method(ORGANIZATION, "RevokeDelegation")

        async def work(conn: asyncpg.Connection) -> tuple[res.Delegation, int]:
            row = await conn.fetchrow(
                f"SELECT {_DELEGATION_COLUMNS}, creator FROM delegations "
                "WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                uuid.UUID(delegation_id),
            )
            owner = row is not None and (
                (principal.agent_id is None and principal.user_id == row["user_id"])
                or principal.actor == row["creator"]
            )
            if not owner and not await self.access.tenant_admin(principal, tenant_id, action):
                raise denied(action)
            if row is None:
                raise _delegation_not_found(tenant_id, delegation_id)
            if row["state"] != res.DELEGATION_STATE_ACTIVE:
                return delegation_pb(tenant_id, row), await store.latest_position(conn, tenant_id)
            revoked = await conn.fetch(
                "WITH RECURSIVE chain(id) AS (SELECT $2::uuid UNION ALL "
                " SELECT d.id FROM delegations d JOIN chain ON d.tenant_id = $1"
                " AND d.parent_id = chain.id) "
                "UPDATE delegations SET state = 2, revoked_at = clock_timestamp() "
                "WHERE tenant_id = $1 AND id IN (SELECT id FROM chain) AND state = 1 "
                f"RETURNING {_DELEGATION_COLUMNS}",
                tenant_id,
                uuid.UUID(delegation_id),
            )
            position = 0
            result = None
            for r in sorted(revoked, key=lambda r: (r["depth"], r["id"])):
                pb = delegation_pb(tenant_id, r)
                if str(r["id"]) == delegation_id:
                    result = pb
                position = await store.append_event(
                    conn,
                    tenant_id,
                    "governance.delegation.revoked",
                    pb.name,
                    key.principal,
                    {
                        "user_id": pb.user_id,
                        "agent_id": pb.agent_id,
                        "cascade_from": str(delegation_id),
                    },
                )
            assert result is not None
            return result, position

        return await self._write(key, res.Delegation, work)

    # ----- snapshot -----

    async def snapshot(self, tenant_id: str) -> res.AuthorizationSnapshot:
        """The tenant's snapshot (:func:`read_snapshot`)."""
        return await read_snapshot(self.db, tenant_id)


def _onward_violations(d: res.Delegation, parent: asyncpg.Record) -> list[FieldViolation]:
    field = "delegation.parent_delegation"
    if parent["state"] != res.DELEGATION_STATE_ACTIVE or parent["expired"]:
        return [FieldViolation(field, "is revoked or expired", "PARENT_INACTIVE")]
    violations = []
    if parent["user_id"] != d.user_id:
        violations.append(
            FieldViolation("delegation.user_id", "must be the parent's user", "USER_MISMATCH")
        )
    if parent["depth"] + 1 > MAX_DEPTH:
        violations.append(
            FieldViolation(
                field,
                f"the chain would be {parent['depth'] + 1} long; at most {MAX_DEPTH}",
                "DELEGATION_TOO_DEEP",
            )
        )
    extra = sorted(set(d.capabilities) - set(parent["capabilities"]))
    if extra:
        violations.append(
            FieldViolation(
                "delegation.capabilities",
                f"{', '.join(extra)} not held by the parent delegation",
                "CAPABILITY_NOT_DELEGATED",
            )
        )
    return violations


def _binding_not_found(tenant_id: str, binding_id: str) -> NotFound:
    name = f"tenants/{tenant_id}/roleBindings/{binding_id}"
    return NotFound(
        f"role binding {name} not found", reason="ROLE_BINDING_NOT_FOUND", metadata={"name": name}
    )


def _delegation_not_found(tenant_id: str, delegation_id: str) -> NotFound:
    name = f"tenants/{tenant_id}/delegations/{delegation_id}"
    return NotFound(
        f"delegation {name} not found", reason="DELEGATION_NOT_FOUND", metadata={"name": name}
    )


async def read_snapshot(db: Database, tenant_id: str) -> res.AuthorizationSnapshot:
    """The tenant's units, bindings and active unexpired delegations, and the outbox
    position they reflect, read in one REPEATABLE READ snapshot: what
    ``GetAuthorizationSnapshot`` serves to other services, and governance's own
    authorization directory reads in process.

    Args:
        db: The application role's pool.
        tenant_id: The tenant.
    """
    # REPEATABLE READ: every table and the outbox position as of one moment (positions
    # are drawn in commit order, so the revision counts exactly the changes seen).
    async with (
        db.pool.acquire() as pooled,
        pooled.transaction(readonly=True, isolation="repeatable_read"),
    ):
        conn = cast(asyncpg.Connection, pooled)
        await conn.execute("SELECT aeterna_bind_tenant($1)", tenant_id)
        units = await conn.fetch(
            f"SELECT {_UNIT_COLUMNS} FROM org_units WHERE tenant_id = $1 ORDER BY id",
            tenant_id,
        )
        bindings = await conn.fetch(
            f"SELECT {_BINDING_COLUMNS} FROM role_bindings WHERE tenant_id = $1 ORDER BY id",
            tenant_id,
        )
        delegations = await conn.fetch(
            f"SELECT {_DELEGATION_COLUMNS} FROM delegations WHERE tenant_id = $1 AND state = 1"
            " AND (expire_at IS NULL OR expire_at > clock_timestamp()) ORDER BY id",
            tenant_id,
        )
        return res.AuthorizationSnapshot(
            name=f"tenants/{tenant_id}/authorizationSnapshot",
            org_units=[unit_pb(tenant_id, r) for r in units],
            role_bindings=[binding_pb(tenant_id, r) for r in bindings],
            delegations=[delegation_pb(tenant_id, r) for r in delegations],
            revision=await store.latest_position(conn, tenant_id),
        )


BOOTSTRAP_ACTOR = "services/governance-bootstrap"
"""Actor (outbox, ``creator``) of bindings written by ``aeterna-governance bootstrap``; the
owner's row-level security policies of ``0004_bootstrap.sql`` admit only this actor."""


async def bootstrap_tenant_admin(owner: asyncpg.Connection, tenant_id: str, user_id: str) -> bool:
    """Bind ``users/{user_id}`` as TENANT_ADMIN of ``tenant_id`` with its outbox event, in one
    transaction of the owner role (no RPC can: nobody administers the tenant yet).

    Idempotent: a binding that exists already is left alone, with no event.

    Args:
        owner: A connection of the schema owner (``AETERNA_DATABASE_OWNER_URL``).
        tenant_id: The tenant (1-100 characters of ``[A-Za-z0-9_-]``, as token claims).
        user_id: The user to bind.

    Returns:
        True when the binding was written now, False when it existed.

    Raises:
        InvalidArgument: A malformed tenant or user (field violations).
    """
    violations = []
    if not re.fullmatch(TENANT_PATTERN, tenant_id):
        violations.append(FieldViolation("tenant", "1-100 characters of [A-Za-z0-9_-]"))
    if not is_identifier(user_id):
        violations.append(FieldViolation("admin", "users/{user} with a valid user id"))
    if violations:
        raise InvalidArgument(violations)
    async with owner.transaction():
        row = await owner.fetchrow(
            "INSERT INTO role_bindings (tenant_id, id, subject, role, org_unit_id, creator) "
            "VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT DO NOTHING "
            f"RETURNING {_BINDING_COLUMNS}",
            tenant_id,
            uuid.uuid4(),
            f"users/{user_id}",
            res.ROLE_TENANT_ADMIN,
            BOOTSTRAP_ACTOR,
        )
        if row is None:
            return False
        created = binding_pb(tenant_id, row)
        await store.append_event(
            owner,
            tenant_id,
            "governance.role_binding.created",
            created.name,
            BOOTSTRAP_ACTOR,
            {"subject": created.subject, "role": role_name(created.role), "org_unit": ""},
        )
        return True
