"""``aeterna policy check|list|create`` and ``aeterna audit verify|list``: policies and the
audit log through the SDK.

Rules are given as a JSON file: a list of ``PolicyRule`` objects whose enums may be written
short (``{"id": "no-moment", "type": "DENY", "target": "DEPENDENCY", "operator":
"MUST_USE", "value": "moment", "severity": "BLOCK"}``). ``policy check`` exits with status
:data:`BLOCKED_EXIT` when an unsuppressed BLOCK rule is violated, so scripts and CI can
reject the change.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from aeterna.governance.v1 import audit_service_pb2 as auditsvc
from aeterna.governance.v1 import policy_service_pb2 as psvc
from aeterna.governance.v1 import resources_pb2 as res
from google.protobuf import json_format

from aeterna_cli import client
from aeterna_cli.governance import (
    RequestId,
    Stubs,
    caller,
    done,
    every_page,
    run,
    show,
    write,
)
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console

policy_app = typer.Typer(help="Policies: check a project or a file, list, create.")
audit_app = typer.Typer(help="The audit log: verify the chain, list entries.")

BLOCKED_EXIT = 2
"""Exit status of ``policy check`` when a BLOCK rule is violated (1 is an error)."""

ENUM_PREFIXES = {
    "type": "RULE_TYPE_",
    "target": "RULE_TARGET_",
    "operator": "RULE_OPERATOR_",
    "severity": "SEVERITY_",
}
"""Short enum names accepted in rule files, and the proto prefix they take."""

OrgUnit = Annotated[str, typer.Option("--org-unit", help="The unit's id (or resource name).")]


def register(app: typer.Typer) -> None:
    """Add the ``policy`` and ``audit`` groups to ``app``."""
    app.add_typer(policy_app, name="policy")
    app.add_typer(audit_app, name="audit")


def load_rules(path: Path) -> list[res.PolicyRule]:
    """The rules of a JSON rule file (a list of rule objects, enums short or full).

    Raises:
        typer.BadParameter: Not a JSON list of rule objects.
    """
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, list):
            raise ValueError("expected a JSON list of rules")
        rules = []
        for item in raw:
            fields = dict(item)
            for key, prefix in ENUM_PREFIXES.items():
                value = fields.get(key)
                if isinstance(value, str) and not value.upper().startswith(prefix):
                    fields[key] = prefix + value.upper()
            rules.append(json_format.ParseDict(fields, res.PolicyRule()))
    except (OSError, ValueError, TypeError, json_format.ParseError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--rules") from exc
    return rules


def _short(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


POLICY_COLUMNS: dict[str, Callable[[Any], str]] = {
    "id": lambda p: p.name.rsplit("/", 1)[-1],
    "unit": lambda p: p.org_unit.rsplit("/", 1)[-1],
    "mode": lambda p: _short(res.PolicyMode, p.mode, "POLICY_MODE_"),
    "merge": lambda p: _short(res.MergeStrategy, p.merge_strategy, "MERGE_STRATEGY_"),
    "rules": lambda p: str(len(p.rules)),
    "display name": lambda p: p.display_name,
}

VIOLATION_COLUMNS: dict[str, Callable[[Any], str]] = {
    "policy": lambda v: v.policy.rsplit("/", 1)[-1],
    "rule": lambda v: v.rule_id,
    "severity": lambda v: _short(res.Severity, v.severity, "SEVERITY_"),
    "suppressed": lambda v: "yes" if v.suppressed else "",
    "message": lambda v: v.message,
}

ENTRY_COLUMNS: dict[str, Callable[[Any], str]] = {
    "seq": lambda e: str(e.sequence),
    "event": lambda e: e.event_id,
    "type": lambda e: e.event_type,
    "resource": lambda e: e.resource,
    "actor": lambda e: e.actor,
    "time": lambda e: e.event_time.ToJsonString(),
    "hash": lambda e: e.hash[:16],
}


# ------------------------------------------------------------------------------------ policy


@policy_app.command("create")
def policy_create(
    policy_id: str,
    org_unit: OrgUnit,
    rules: Annotated[Path, typer.Option(help="JSON file: the list of rules.")],
    display_name: Annotated[str, typer.Option(help="Human-readable name.")] = "",
    mandatory: Annotated[
        bool, typer.Option("--mandatory", help="Units below cannot weaken it.")
    ] = False,
    merge: Annotated[str, typer.Option(help="override|merge|intersect")] = "merge",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Create a policy at a unit (ADMIN at the unit or above, or TENANT_ADMIN)."""
    strategy = f"MERGE_STRATEGY_{merge.upper()}"
    if strategy not in res.MergeStrategy.keys():
        raise typer.BadParameter("override, merge or intersect", param_hint="--merge")
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    policy = res.Policy(
        display_name=display_name or policy_id,
        org_unit=c.unit(org_unit),
        mode=res.POLICY_MODE_MANDATORY if mandatory else res.POLICY_MODE_OPTIONAL,
        merge_strategy=res.MergeStrategy.Value(strategy),
        rules=load_rules(rules),
    )

    async def call(s: Stubs) -> tuple[res.Policy, str | None]:
        request = psvc.CreatePolicyRequest(
            parent=c.parent, policy=policy, policy_id=policy_id, request_id=rid
        )
        created: tuple[res.Policy, str | None] = await client.call_with_token(
            s.policies.CreatePolicy(request, metadata=md)
        )
        return created

    created, ctoken = run(call)
    done(created, ctoken, as_json, f"created {created.name} ({len(created.rules)} rules)")


@policy_app.command("list")
def policy_list(
    org_unit: Annotated[
        str, typer.Option("--org-unit", help="Only this unit's policies (members may list).")
    ] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """List policies (every page); without --org-unit, tenant admins only."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.Policy]:
        request = psvc.ListPoliciesRequest(
            parent=c.parent, org_unit=c.unit(org_unit) if org_unit else "", page_size=500
        )

        def fetch(page: str) -> Awaitable[psvc.ListPoliciesResponse]:
            request.page_token = page
            return s.policies.ListPolicies(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "policies")

    show(run(call), as_json, POLICY_COLUMNS)


@policy_app.command("check")
def policy_check(
    org_unit: OrgUnit,
    file: Annotated[
        Path | None, typer.Option(help="A file: its path and text (FILE and CODE rules).")
    ] = None,
    dependency: Annotated[
        list[str] | None, typer.Option("--dependency", help="A declared dependency (repeat).")
    ] = None,
    imports: Annotated[
        list[str] | None, typer.Option("--import", help="An imported module (repeat).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A JSON file of configuration (CONFIG rules).")
    ] = None,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Check a file or a project's state against the rules in force at a unit.

    Exits with status 2 when an unsuppressed BLOCK rule is violated.
    """
    c = caller(tenant, user, token, roles)
    context = res.PolicyContext(
        path=str(file) if file else "",
        content=file.read_text() if file else "",
        dependencies=dependency or [],
        imports=imports or [],
    )
    if config is not None:
        json_format.ParseDict(json.loads(config.read_text()), context.config)

    async def call(s: Stubs) -> psvc.CheckPolicyResponse:
        return await s.policies.CheckPolicy(
            psvc.CheckPolicyRequest(org_unit=c.unit(org_unit), context=context),
            metadata=client.metadata(c.token),
        )

    result = run(call)
    if as_json:
        console.print_json(json_format.MessageToJson(result))
    else:
        show(list(result.violations), False, VIOLATION_COLUMNS)
        verdict = "BLOCKED" if result.blocked else "ok"
        console.print(f"{verdict}: drift score {result.drift_score:.2f}")
    if result.blocked:
        raise typer.Exit(BLOCKED_EXIT)


# ------------------------------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Verify the tenant's audit chain against its checkpoints (tenant admins only).

    Names the first broken entry and exits with status 1 when the chain is broken.
    """
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> auditsvc.VerifyAuditLogResponse:
        return await s.audit.VerifyAuditLog(
            auditsvc.VerifyAuditLogRequest(parent=c.parent), metadata=client.metadata(c.token)
        )

    result = run(call)
    if as_json:
        console.print_json(json_format.MessageToJson(result))
    elif result.valid:
        console.print(
            f"valid: {result.entries_checked} entries, head {result.head_hash}, "
            f"checkpoint at {result.checkpoint_sequence}"
        )
    else:
        reason = auditsvc.AuditBreak.Name(result.break_reason).removeprefix("AUDIT_BREAK_")
        console.print(f"[red]broken[/red] at {result.first_broken_entry}: {reason}")
    if not result.valid:
        raise typer.Exit(1)


@audit_app.command("list")
def audit_list(
    resource: Annotated[str, typer.Option(help="Only entries about this resource.")] = "",
    actor: Annotated[str, typer.Option(help="Only entries caused by this actor.")] = "",
    limit: Annotated[int, typer.Option(help="Most entries shown, oldest first.")] = 100,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """List audit entries in chain order (tenant admins only)."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.AuditEntry]:
        found: list[res.AuditEntry] = []
        page = ""
        while len(found) < limit:
            reply = await s.audit.ListAuditEntries(
                auditsvc.ListAuditEntriesRequest(
                    parent=c.parent,
                    resource=resource,
                    actor=actor,
                    page_token=page,
                    page_size=min(limit - len(found), 1000),
                ),
                metadata=client.metadata(c.token),
            )
            found += reply.audit_entries
            page = reply.next_page_token
            if not page:
                break
        return found

    show(run(call), as_json, ENTRY_COLUMNS)
