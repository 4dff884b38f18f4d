"""``aeterna org``, ``aeterna role`` and ``aeterna approval``: governance through the SDK.

Units and bindings are named by their ids on the command line (``acme``, a binding's UUID)
and by resource names on the wire (``tenants/{tenant}/orgUnits/acme``). Writes carry a
``request_id`` (``--request-id`` or a fresh one) in the body and in metadata, so the edge
may retry them; they print the write's consistency token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar

import grpc
import typer
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import audit_service_pb2_grpc as audit_grpc
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import policy_service_pb2_grpc as psvc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.table import Table

from aeterna_cli import client
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console, fail

T = TypeVar("T")

if TYPE_CHECKING:
    # Only the generated .pyi knows the async stub types; at run time they are the same.
    OrgStub: TypeAlias = osvc_grpc.OrganizationServiceAsyncStub
    ApprovalStub: TypeAlias = asvc_grpc.ApprovalServiceAsyncStub
    PolicyStub: TypeAlias = psvc_grpc.PolicyServiceAsyncStub
    AuditStub: TypeAlias = audit_grpc.AuditServiceAsyncStub
    KnowledgeStub: TypeAlias = ksvc_grpc.KnowledgeServiceAsyncStub
else:
    OrgStub = osvc_grpc.OrganizationServiceStub
    ApprovalStub = asvc_grpc.ApprovalServiceStub
    PolicyStub = psvc_grpc.PolicyServiceStub
    AuditStub = audit_grpc.AuditServiceStub
    KnowledgeStub = ksvc_grpc.KnowledgeServiceStub

org_app = typer.Typer(help="The org tree: create, get, list, move, delete units.")
role_app = typer.Typer(help="Role bindings: grant, revoke, list.")
approval_app = typer.Typer(help="Approval requests: list, approve, reject.")

RequestId = Annotated[
    str | None,
    typer.Option(help="Idempotency key: repeating the command with it changes nothing more."),
]
Etag = Annotated[str, typer.Option(help="Etag read before: refuse if the unit changed since.")]
KINDS = ("company", "organization", "team", "project")


def register(app: typer.Typer) -> None:
    """Add the ``org``, ``role`` and ``approval`` groups to ``app``."""
    app.add_typer(org_app, name="org")
    app.add_typer(role_app, name="role")
    app.add_typer(approval_app, name="approval")


@dataclass(frozen=True)
class Stubs:
    """Governance's and knowledge's stubs on one channel."""

    orgs: OrgStub
    approvals: ApprovalStub
    policies: PolicyStub
    audit: AuditStub
    knowledge: KnowledgeStub


@dataclass(frozen=True)
class Caller:
    """Who calls: the tenant and the bearer token."""

    tenant: str
    token: str

    @property
    def parent(self) -> str:
        """``tenants/{tenant}``."""
        return f"tenants/{self.tenant}"

    def unit(self, unit_id: str) -> str:
        """``tenants/{tenant}/orgUnits/{unit}`` (a full name is kept as it is)."""
        return unit_id if unit_id.startswith("tenants/") else f"{self.parent}/orgUnits/{unit_id}"

    def named(self, collection: str, rid: str) -> str:
        """``tenants/{tenant}/{collection}/{id}`` (a full name is kept as it is)."""
        return rid if rid.startswith("tenants/") else f"{self.parent}/{collection}/{rid}"


def caller(tenant: str, user: str, token: str | None, roles: str) -> Caller:
    """The caller: ``token`` or a development token of ``user`` with ``roles``."""
    role_list = [r.strip().upper() for r in roles.split(",") if r.strip()]
    return Caller(tenant, token or client.dev_token(tenant, user, roles=role_list))


def run(call: Callable[[Stubs], Awaitable[T]]) -> T:
    """Open a channel to the endpoint, make the calls, close; print errors and exit 1."""

    async def once() -> T:
        async with client.channel() as channel:
            stubs = Stubs(
                OrgStub(channel),
                ApprovalStub(channel),
                PolicyStub(channel),
                AuditStub(channel),
                KnowledgeStub(channel),
            )
            return await call(stubs)

    try:
        return asyncio.run(once())
    except grpc.aio.AioRpcError as exc:
        fail(exc)


async def every_page(fetch: Callable[[str], Awaitable[Any]], field: str) -> list[Any]:
    """Every item of a List method: ``fetch(page_token)`` until the last page.

    Args:
        fetch: Calls the method for one page token.
        field: The response's repeated field, e.g. ``org_units``.
    """
    items: list[Any] = []
    token = ""
    while True:
        reply = await fetch(token)
        items += getattr(reply, field)
        token = reply.next_page_token
        if not token:
            return items


def write(c: Caller, request_id: str | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A write's ``request_id`` and its metadata (token and ``x-aeterna-request-id``)."""
    rid = request_id or client.new_request_id()
    return rid, client.write_metadata(c.token, rid)


def show(items: Sequence[Message], as_json: bool, columns: dict[str, Callable[[Any], str]]) -> None:
    """Print messages as JSON or as a table of ``columns``."""
    if as_json:
        console.print_json(json.dumps([json_format.MessageToDict(m) for m in items]))
        return
    table = Table()
    for title in columns:
        table.add_column(title, overflow="fold")
    for m in items:
        table.add_row(*(render(m) for render in columns.values()))
    console.print(table)


def done(message: Message, ctoken: str | None, as_json: bool, text: str) -> None:
    """Print a write's result and its consistency token (in JSON, as ``consistencyToken``)."""
    if as_json:
        out = json_format.MessageToDict(message)
        if ctoken:
            out["consistencyToken"] = ctoken
        console.print_json(json.dumps(out))
        return
    console.print(text)
    if ctoken:
        console.print(f"consistency token: {ctoken}", style="dim")


def _tail(name: str) -> str:
    return name.rsplit("/", 1)[-1]


UNIT_COLUMNS: dict[str, Callable[[Any], str]] = {
    "id": lambda u: _tail(u.name),
    "kind": lambda u: res.OrgUnitKind.Name(u.kind).removeprefix("ORG_UNIT_KIND_"),
    "display name": lambda u: u.display_name,
    "parent": lambda u: _tail(u.parent) if u.parent else "",
    "etag": lambda u: u.etag,
}


# ------------------------------------------------------------------------------------- org


@org_app.command("create")
def org_create(
    unit_id: str,
    kind: Annotated[str, typer.Option(help="company|organization|team|project")],
    parent: Annotated[str, typer.Option(help="Parent unit id (none for a company).")] = "",
    display_name: Annotated[str, typer.Option(help="Human-readable name.")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Create an org unit under PARENT (a COMPANY has none)."""
    if kind.lower() not in KINDS:
        raise typer.BadParameter(f"one of {', '.join(KINDS)}", param_hint="--kind")
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    unit = res.OrgUnit(
        kind=res.OrgUnitKind.Value(f"ORG_UNIT_KIND_{kind.upper()}"),
        display_name=display_name or unit_id,
        parent=c.unit(parent) if parent else "",
    )

    async def call(s: Stubs) -> tuple[res.OrgUnit, str | None]:
        request = osvc.CreateOrgUnitRequest(
            parent=c.parent, org_unit=unit, org_unit_id=unit_id, request_id=rid
        )
        created: tuple[res.OrgUnit, str | None] = await client.call_with_token(
            s.orgs.CreateOrgUnit(request, metadata=md)
        )
        return created

    created, ctoken = run(call)
    done(created, ctoken, as_json, f"created {created.name}")


@org_app.command("get")
def org_get(
    unit_id: str,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Show one org unit."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> res.OrgUnit:
        return await s.orgs.GetOrgUnit(
            osvc.GetOrgUnitRequest(name=c.unit(unit_id)), metadata=client.metadata(c.token)
        )

    show([run(call)], as_json, UNIT_COLUMNS)


@org_app.command("list")
def org_list(
    parent: Annotated[str, typer.Option(help="Only the children of this unit.")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """List the tenant's org units (every page)."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.OrgUnit]:
        request = osvc.ListOrgUnitsRequest(
            parent=c.parent, parent_org_unit=c.unit(parent) if parent else "", page_size=500
        )

        def fetch(page: str) -> Awaitable[osvc.ListOrgUnitsResponse]:
            request.page_token = page
            return s.orgs.ListOrgUnits(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "org_units")

    show(run(call), as_json, UNIT_COLUMNS)


@org_app.command("move")
def org_move(
    unit_id: str,
    to: Annotated[str, typer.Option("--to", help="The new parent unit's id.")],
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Move an org unit under another parent of the kind just above it."""
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)

    async def call(s: Stubs) -> tuple[res.OrgUnit, str | None]:
        request = osvc.MoveOrgUnitRequest(
            name=c.unit(unit_id), new_parent=c.unit(to), etag=etag, request_id=rid
        )
        moved: tuple[res.OrgUnit, str | None] = await client.call_with_token(
            s.orgs.MoveOrgUnit(request, metadata=md)
        )
        return moved

    moved, ctoken = run(call)
    done(moved, ctoken, as_json, f"moved {moved.name} under {moved.parent}")


@org_app.command("delete")
def org_delete(
    unit_id: str,
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
) -> None:
    """Delete an org unit nothing refers to."""
    c = caller(tenant, user, token, roles)
    name = c.unit(unit_id)

    async def call(s: Stubs) -> tuple[Any, str | None]:
        deleted: tuple[Any, str | None] = await client.call_with_token(
            s.orgs.DeleteOrgUnit(
                osvc.DeleteOrgUnitRequest(name=name, etag=etag),
                metadata=client.metadata(c.token),
            )
        )
        return deleted

    _, ctoken = run(call)
    console.print(f"deleted {name}")
    if ctoken:
        console.print(f"consistency token: {ctoken}", style="dim")


# ------------------------------------------------------------------------------------ role

BINDING_COLUMNS: dict[str, Callable[[Any], str]] = {
    "id": lambda b: _tail(b.name),
    "subject": lambda b: b.subject,
    "role": lambda b: res.Role.Name(b.role).removeprefix("ROLE_"),
    "unit": lambda b: _tail(b.org_unit) if b.org_unit else "(tenant)",
    "creator": lambda b: b.creator,
}


def _subject(value: str) -> str:
    """``users/alice`` or ``agents/bot`` as given; a bare id is a user."""
    return value if value.startswith(("users/", "agents/")) else f"users/{value}"


@role_app.command("grant")
def role_grant(
    subject: Annotated[str, typer.Argument(help="users/{user}, agents/{agent} or a user id.")],
    role: Annotated[
        str,
        typer.Argument(
            help="VIEWER|DEVELOPER|TECH_LEAD|ARCHITECT|ADMIN|TENANT_ADMIN|PLATFORM_ADMIN|AGENT"
        ),
    ],
    unit: Annotated[str, typer.Option(help="Unit id (none: TENANT_ADMIN, PLATFORM_ADMIN).")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Bind ROLE to SUBJECT at a unit (inherited by every unit below it)."""
    name = f"ROLE_{role.upper()}"
    if name not in res.Role.keys() or name == "ROLE_UNSPECIFIED":
        raise typer.BadParameter(f"unknown role {role!r}", param_hint="ROLE")
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    binding = res.RoleBinding(
        subject=_subject(subject),
        role=res.Role.Value(name),
        org_unit=c.unit(unit) if unit else "",
    )

    async def call(s: Stubs) -> tuple[res.RoleBinding, str | None]:
        request = osvc.CreateRoleBindingRequest(
            parent=c.parent, role_binding=binding, request_id=rid
        )
        created: tuple[res.RoleBinding, str | None] = await client.call_with_token(
            s.orgs.CreateRoleBinding(request, metadata=md)
        )
        return created

    created, ctoken = run(call)
    done(created, ctoken, as_json, f"granted {role.upper()} to {created.subject}: {created.name}")


@role_app.command("revoke")
def role_revoke(
    binding: Annotated[str, typer.Argument(help="The binding's id or name.")],
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
) -> None:
    """Delete a role binding."""
    c = caller(tenant, user, token, roles)
    name = c.named("roleBindings", binding)

    async def call(s: Stubs) -> tuple[Any, str | None]:
        deleted: tuple[Any, str | None] = await client.call_with_token(
            s.orgs.DeleteRoleBinding(
                osvc.DeleteRoleBindingRequest(name=name), metadata=client.metadata(c.token)
            )
        )
        return deleted

    _, ctoken = run(call)
    console.print(f"revoked {name}")
    if ctoken:
        console.print(f"consistency token: {ctoken}", style="dim")


@role_app.command("list")
def role_list(
    subject: Annotated[str, typer.Option(help="Only this subject's bindings.")] = "",
    unit: Annotated[str, typer.Option(help="Only bindings at this unit.")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """List role bindings (every page)."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.RoleBinding]:
        request = osvc.ListRoleBindingsRequest(
            parent=c.parent,
            subject=_subject(subject) if subject else "",
            org_unit=c.unit(unit) if unit else "",
            page_size=500,
        )

        def fetch(page: str) -> Awaitable[osvc.ListRoleBindingsResponse]:
            request.page_token = page
            return s.orgs.ListRoleBindings(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "role_bindings")

    show(run(call), as_json, BINDING_COLUMNS)


# -------------------------------------------------------------------------------- approval

APPROVAL_COLUMNS: dict[str, Callable[[Any], str]] = {
    "id": lambda a: _tail(a.name),
    "type": lambda a: res.ApprovalType.Name(a.type).removeprefix("APPROVAL_TYPE_"),
    "state": lambda a: res.ApprovalState.Name(a.state).removeprefix("APPROVAL_STATE_"),
    "approvals": lambda a: f"{sum(d.approve for d in a.decisions)}/{a.required_approvals}",
    "title": lambda a: a.title,
    "requester": lambda a: a.requester,
}


@approval_app.command("list")
def approval_list(
    state: Annotated[
        str, typer.Option(help="pending|approved|rejected|expired|cancelled (default: all)")
    ] = "",
    awaiting_me: Annotated[
        bool, typer.Option("--awaiting-me", help="Only what I may still decide.")
    ] = False,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """List approval requests, newest first (every page)."""
    wanted = res.APPROVAL_STATE_UNSPECIFIED
    if state:
        key = f"APPROVAL_STATE_{state.upper()}"
        if key not in res.ApprovalState.keys():
            raise typer.BadParameter(f"unknown state {state!r}", param_hint="--state")
        wanted = res.ApprovalState.Value(key)
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.ApprovalRequest]:
        request = asvc.ListApprovalRequestsRequest(
            parent=c.parent, state=wanted, awaiting_me=awaiting_me, page_size=500
        )

        def fetch(page: str) -> Awaitable[asvc.ListApprovalRequestsResponse]:
            request.page_token = page
            return s.approvals.ListApprovalRequests(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "approval_requests")

    show(run(call), as_json, APPROVAL_COLUMNS)


def _decide(request: str, approve: bool, comment: str, c: Caller, as_json: bool) -> None:
    name = c.named("approvalRequests", request)

    async def call(s: Stubs) -> tuple[res.ApprovalRequest, str | None]:
        md = client.metadata(c.token)
        pending = (
            s.approvals.ApproveApprovalRequest(
                asvc.ApproveApprovalRequestRequest(name=name, comment=comment), metadata=md
            )
            if approve
            else s.approvals.RejectApprovalRequest(
                asvc.RejectApprovalRequestRequest(name=name, comment=comment), metadata=md
            )
        )
        decided: tuple[res.ApprovalRequest, str | None] = await client.call_with_token(pending)
        return decided

    decided, ctoken = run(call)
    state = res.ApprovalState.Name(decided.state).removeprefix("APPROVAL_STATE_")
    done(decided, ctoken, as_json, f"{name}: {state}")


@approval_app.command("approve")
def approval_approve(
    request: Annotated[str, typer.Argument(help="The request's id or name.")],
    comment: Annotated[str, typer.Option(help="Optional comment.")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Approve a request (repeating it changes nothing)."""
    _decide(request, True, comment, caller(tenant, user, token, roles), as_json)


@approval_app.command("reject")
def approval_reject(
    request: Annotated[str, typer.Argument(help="The request's id or name.")],
    comment: Annotated[str, typer.Option(help="Why (required).")],
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Reject a request: one rejection closes it."""
    _decide(request, False, comment, caller(tenant, user, token, roles), as_json)
