"""``aeterna knowledge promote`` and ``aeterna knowledge promotion get|approve|reject|
retarget|apply``: promotion of an ACCEPTED item to a higher layer through a governance
approval, through the SDK.

``promote`` requests it (PENDING_REVIEW) and prints the request and its governance approval;
``--preview`` only shows what applying would do and why it cannot. A reviewer of the target
unit (TECH_LEAD of a team, ARCHITECT of an organization, ADMIN of the company) approves or
rejects it, never its requester; then ``apply`` creates the promoted item. Requests are named
by their id or full resource name.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import resources_pb2 as res
from google.protobuf import json_format

from aeterna_cli import client
from aeterna_cli.governance import RequestId, Stubs, caller, done, run, write
from aeterna_cli.knowledge import LAYERS, _enum, knowledge_app
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console

promotion_app = typer.Typer(
    help="Promotion requests of knowledge items: get, approve, reject, retarget, apply."
)
knowledge_app.add_typer(promotion_app, name="promotion")

MODES = ("full", "partial")
RESIDUAL_ROLES = ("specialization", "applicability", "exception", "clarification")

Etag = Annotated[str, typer.Option(help="Etag read before: refuse if the request changed since.")]
RequestName = Annotated[str, typer.Argument(help="The promotion request's id or resource name.")]


def _short(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


def describe(p: res.PromotionRequest) -> str:
    """One line about a request: its name, state, target and approval."""
    state = _short(res.PromotionState, p.state, "PROMOTION_STATE_")
    layer = _short(res.KnowledgeLayer, p.target_layer, "KNOWLEDGE_LAYER_")
    text = (
        f"{p.name} is {state}: {p.source} → {layer} {p.target_org_unit.rsplit('/', 1)[-1]} "
        f"({_short(res.PromotionMode, p.mode, 'PROMOTION_MODE_')}); approval {p.approval_request}"
    )
    if p.promoted_item:
        text += f"; promoted item {p.promoted_item}"
    return text


@knowledge_app.command("promote")
def knowledge_promote(
    item: Annotated[str, typer.Argument(help="The ACCEPTED item's id or resource name.")],
    to_layer: Annotated[str, typer.Option("--to-layer", help="team|org|company")],
    to_unit: Annotated[str, typer.Option("--to-unit", help="The target org unit's id.")],
    mode: Annotated[
        str, typer.Option(help="full: supersede the source; partial: keep it as a residual.")
    ] = "full",
    residual_role: Annotated[
        str, typer.Option(help="partial: the source's role, " + "|".join(RESIDUAL_ROLES))
    ] = "",
    preview: Annotated[
        bool, typer.Option("--preview", help="Only show what applying would do.")
    ] = False,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Request the promotion of an ACCEPTED item to a higher layer (PENDING_REVIEW until a
    reviewer of the target unit approves it)."""
    c = caller(tenant, user, token, roles)
    layer = _enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", to_layer, LAYERS, "--to-layer")
    chosen = _enum(res.PromotionMode, "PROMOTION_MODE_", mode, MODES, "--mode")
    role = _enum(res.VariantRole, "VARIANT_ROLE_", residual_role, RESIDUAL_ROLES, "--residual-role")
    source = c.named("knowledgeItems", item)
    if preview:

        async def look(s: Stubs) -> ksvc.PreviewPromotionResponse:
            seen: ksvc.PreviewPromotionResponse = await s.knowledge.PreviewPromotion(
                ksvc.PreviewPromotionRequest(
                    name=source, target_layer=layer, target_org_unit=c.unit(to_unit), mode=chosen
                ),
                metadata=client.metadata(c.token),
            )
            return seen

        seen = run(look)
        if as_json:
            print(json.dumps(json_format.MessageToDict(seen)))
            return
        console.print(f"would create {seen.promoted.path} at {to_layer.upper()} {to_unit}")
        for blocker in seen.blockers:
            console.print(f"blocked: {blocker}", style="red")
        if not seen.blockers:
            console.print("no blockers")
        return
    rid, md = write(c, request_id)
    request = ksvc.CreatePromotionRequestRequest(
        parent=c.parent,
        promotion_request=res.PromotionRequest(
            source=source,
            target_layer=layer,
            target_org_unit=c.unit(to_unit),
            mode=chosen,
            residual_role=role,
        ),
        request_id=rid,
    )

    async def call(s: Stubs) -> tuple[res.PromotionRequest, str | None]:
        created: tuple[res.PromotionRequest, str | None] = await client.call_with_token(
            s.knowledge.CreatePromotionRequest(request, metadata=md)
        )
        return created

    created, ctoken = run(call)
    done(created, ctoken, as_json, describe(created))


@promotion_app.command("get")
def promotion_get(
    name: RequestName,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Show a promotion request (with governance's decision, if made)."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> res.PromotionRequest:
        got: res.PromotionRequest = await s.knowledge.GetPromotionRequest(
            ksvc.GetPromotionRequestRequest(name=c.named("promotionRequests", name)),
            metadata=client.metadata(c.token),
        )
        return got

    got = run(call)
    done(got, None, as_json, describe(got))


def _step(
    verb: str,
    make: Callable[[str, str], Any],
    name: str,
    tenant: str,
    user: str,
    token: str | None,
    roles: str,
    request_id: str | None,
    as_json: bool,
) -> None:
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    request = make(c.named("promotionRequests", name), rid)

    async def call(s: Stubs) -> tuple[res.PromotionRequest, str | None]:
        method: Callable[..., Awaitable[Any]] = getattr(s.knowledge, f"{verb}PromotionRequest")
        replied: tuple[res.PromotionRequest, str | None] = await client.call_with_token(
            method(request, metadata=md)
        )
        return replied

    moved, ctoken = run(call)
    done(moved, ctoken, as_json, describe(moved))


@promotion_app.command("approve")
def promotion_approve(
    name: RequestName,
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Approve it, as a reviewer of the target unit (recorded in governance)."""
    _step(
        "Approve",
        lambda n, rid: ksvc.ApprovePromotionRequestRequest(name=n, etag=etag, request_id=rid),
        name,
        tenant,
        user,
        token,
        roles,
        request_id,
        as_json,
    )


@promotion_app.command("reject")
def promotion_reject(
    name: RequestName,
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Reject it, as a reviewer of the target unit (recorded in governance)."""
    _step(
        "Reject",
        lambda n, rid: ksvc.RejectPromotionRequestRequest(name=n, etag=etag, request_id=rid),
        name,
        tenant,
        user,
        token,
        roles,
        request_id,
        as_json,
    )


@promotion_app.command("retarget")
def promotion_retarget(
    name: RequestName,
    to_unit: Annotated[str, typer.Option("--to-unit", help="The new target unit's id.")],
    to_layer: Annotated[str, typer.Option("--to-layer", help="team|org|company")] = "",
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Move a pending request to another target unit (and layer)."""
    c = caller(tenant, user, token, roles)
    layer = _enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", to_layer, LAYERS, "--to-layer")
    _step(
        "Retarget",
        lambda n, rid: ksvc.RetargetPromotionRequestRequest(
            name=n, etag=etag, request_id=rid, target_layer=layer, target_org_unit=c.unit(to_unit)
        ),
        name,
        tenant,
        user,
        token,
        roles,
        request_id,
        as_json,
    )


@promotion_app.command("apply")
def promotion_apply(
    name: RequestName,
    etag: Etag = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Apply an approved request: create the promoted item at the target layer."""
    _step(
        "Apply",
        lambda n, rid: ksvc.ApplyPromotionRequestRequest(name=n, etag=etag, request_id=rid),
        name,
        tenant,
        user,
        token,
        roles,
        request_id,
        as_json,
    )
