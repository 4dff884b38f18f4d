"""``aeterna knowledge add|get|list|search|history|propose|accept|supersede``: knowledge items
through the SDK (``import`` and ``export`` are in :mod:`aeterna_cli.knowledge_files`,
``promote`` and ``promotion …`` in :mod:`aeterna_cli.knowledge_promotion`).

Items are named by their id (the UUID) or full resource name; units by their id. Writes carry
a ``request_id`` (``--request-id`` or a fresh one) in the body and in metadata, so the edge
may retry them, and print the write's consistency token. ``list --json`` writes one JSON
object per line (``name``, ``title``, ``path``, ``score``, ``status``, ``layer``; ``score``
is null outside a search; ``search --json`` adds ``section`` and ``snippet``), for scripts and
agents.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY
from rich.table import Table

from aeterna_cli import client
from aeterna_cli.governance import RequestId, Stubs, caller, done, every_page, run, show, write
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console

knowledge_app = typer.Typer(
    help="Knowledge items (ADRs, policies, patterns, specs): add, get, list, history, and the "
    "lifecycle: propose, accept, supersede; import and export folders of decision records."
)

TYPES = ("adr", "policy", "pattern", "spec", "hindsight")
LAYERS = ("project", "team", "org", "company")

Etag = Annotated[str, typer.Option(help="Etag read before: refuse if the item changed since.")]
Reason = Annotated[str, typer.Option(help="Why, recorded in the item's history.")]
Content = Annotated[
    Path, typer.Option("--file", help="Markdown file with the content.", exists=True)
]
Tags = Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeat).")]


def register(app: typer.Typer) -> None:
    """Add the ``knowledge`` group to ``app``."""
    # import/export and promotion live in their own modules, which add their commands to
    # knowledge_app.
    from aeterna_cli import knowledge_files, knowledge_promotion  # noqa: F401

    app.add_typer(knowledge_app, name="knowledge")


def _enum(enum: Any, prefix: str, value: str, allowed: tuple[str, ...], hint: str) -> Any:
    """The enum value named ``value`` (short and case-insensitive, e.g. ``team``); 0 (not
    set) for an empty one.

    Raises:
        typer.BadParameter: Not one of ``allowed``.
    """
    if not value:
        return 0
    if value.lower() not in allowed:
        raise typer.BadParameter(f"one of {', '.join(allowed)}", param_hint=hint)
    return enum.Value(prefix + value.upper())


def _short(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else ""


def status_of(item: res.KnowledgeItem) -> str:
    """``ACCEPTED`` for an accepted item."""
    return _short(res.KnowledgeStatus, item.status, "KNOWLEDGE_STATUS_")


def layer_of(item: res.KnowledgeItem) -> str:
    """``TEAM`` for a team's item."""
    return _short(res.KnowledgeLayer, item.layer, "KNOWLEDGE_LAYER_")


ITEM_COLUMNS: dict[str, Callable[[Any], str]] = {
    "id": lambda i: i.name.rsplit("/", 1)[-1],
    "path": lambda i: i.path,
    "type": lambda i: _short(res.KnowledgeType, i.type, "KNOWLEDGE_TYPE_"),
    "layer": layer_of,
    "unit": lambda i: i.org_unit.rsplit("/", 1)[-1],
    "status": status_of,
    "v": lambda i: str(i.version),
    "title": lambda i: i.title,
}

REVISION_COLUMNS: dict[str, Callable[[Any], str]] = {
    "version": lambda r: str(r.version),
    "status": lambda r: _short(res.KnowledgeStatus, r.status, "KNOWLEDGE_STATUS_"),
    "reason": lambda r: r.reason,
    "author": lambda r: r.author,
    "time": lambda r: r.create_time.ToJsonString(),
    "hash": lambda r: r.content_hash[:16],
}


def _residuals(item: res.KnowledgeItem) -> str:
    return ", ".join(r.rsplit("/", 1)[-1] for r in item.residuals)


def json_line(item: res.KnowledgeItem, score: float | None = None) -> str:
    """One item as the machine-readable line of ``list --json`` (and search); ``residuals``
    only in the enriched view."""
    line: dict[str, Any] = {
        "name": item.name,
        "title": item.title,
        "path": item.path,
        "score": score,
        "status": status_of(item),
        "layer": layer_of(item),
    }
    if item.residuals:
        line["residuals"] = list(item.residuals)
    return json.dumps(line)


@knowledge_app.command("add")
def knowledge_add(
    path: Annotated[str, typer.Argument(help="Path-like id, e.g. adr/0010-luxon-dates.")],
    content: Content,
    unit: Annotated[str, typer.Option("--unit", help="The org unit's id.")],
    title: Annotated[str, typer.Option(help="The title.")],
    kind: Annotated[str, typer.Option("--type", help="|".join(TYPES))] = "adr",
    layer: Annotated[str, typer.Option(help="|".join(LAYERS))] = "team",
    summary: Annotated[str, typer.Option(help="One paragraph.")] = "",
    tag: Tags = None,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Add a DRAFT item at a unit's layer from a Markdown file."""
    item = res.KnowledgeItem(
        type=_enum(res.KnowledgeType, "KNOWLEDGE_TYPE_", kind, TYPES, "--type"),
        layer=_enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", layer, LAYERS, "--layer"),
        path=path,
        title=title,
        summary=summary,
        content=content.read_text(),
        tags=tag or [],
    )
    c = caller(tenant, user, token, roles)
    item.org_unit = c.unit(unit)
    rid, md = write(c, request_id)

    async def call(s: Stubs) -> tuple[res.KnowledgeItem, str | None]:
        request = ksvc.CreateKnowledgeItemRequest(
            parent=c.parent, knowledge_item=item, request_id=rid
        )
        created: tuple[res.KnowledgeItem, str | None] = await client.call_with_token(
            s.knowledge.CreateKnowledgeItem(request, metadata=md)
        )
        return created

    created, ctoken = run(call)
    done(created, ctoken, as_json, f"created {created.name} ({created.path}, DRAFT)")


@knowledge_app.command("get")
def knowledge_get(
    item: Annotated[str, typer.Argument(help="The item's id or resource name.")],
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Show one item with its content."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> res.KnowledgeItem:
        request = ksvc.GetKnowledgeItemRequest(name=c.named("knowledgeItems", item))
        found: res.KnowledgeItem = await s.knowledge.GetKnowledgeItem(
            request, metadata=client.metadata(c.token)
        )
        return found

    found = run(call)
    if as_json:
        done(found, None, True, "")
        return
    show([found], False, ITEM_COLUMNS)
    console.print(f"etag {found.etag}  sha256 {found.content_hash}", style="dim")
    console.print(found.content, markup=False)


@knowledge_app.command("list")
def knowledge_list(
    kind: Annotated[str, typer.Option("--type", help="Only this type.")] = "",
    layer: Annotated[str, typer.Option(help="Only this layer.")] = "",
    status: Annotated[str, typer.Option(help="Only this status, e.g. accepted.")] = "",
    unit: Annotated[str, typer.Option("--unit", help="Only this unit's items.")] = "",
    path: Annotated[str, typer.Option(help="Only items with this path.")] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (name, title, path, ...).")
    ] = False,
    enriched: Annotated[
        bool,
        typer.Option(
            "--enriched", help="Each item with its residuals (what a partial promotion kept)."
        ),
    ] = False,
) -> None:
    """List the items the caller may read (every page), by path."""
    c = caller(tenant, user, token, roles)
    statuses = tuple(
        n.removeprefix("KNOWLEDGE_STATUS_").lower() for n in res.KnowledgeStatus.keys()
    )
    request = ksvc.ListKnowledgeItemsRequest(
        parent=c.parent,
        page_size=500,
        type=_enum(res.KnowledgeType, "KNOWLEDGE_TYPE_", kind, TYPES, "--type"),
        layer=_enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", layer, LAYERS, "--layer"),
        status=_enum(res.KnowledgeStatus, "KNOWLEDGE_STATUS_", status, statuses[1:], "--status"),
        org_unit=c.unit(unit) if unit else "",
        path=path,
        view=res.KNOWLEDGE_ITEM_VIEW_ENRICHED if enriched else res.KNOWLEDGE_ITEM_VIEW_BASIC,
    )

    async def call(s: Stubs) -> list[res.KnowledgeItem]:
        def fetch(page: str) -> Awaitable[ksvc.ListKnowledgeItemsResponse]:
            request.page_token = page
            return s.knowledge.ListKnowledgeItems(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "knowledge_items")

    items = run(call)
    if as_json:
        for item in items:
            print(json_line(item))
        return
    show(items, False, ITEM_COLUMNS | ({"residuals": _residuals} if enriched else {}))


@knowledge_app.command("search")
def knowledge_search(
    query: Annotated[str, typer.Argument(help="What to look for, in plain words.")],
    kind: Annotated[
        list[str] | None, typer.Option("--type", help="Only this type (repeat).")
    ] = None,
    layer: Annotated[list[str] | None, typer.Option(help="Only this layer (repeat).")] = None,
    status: Annotated[
        list[str] | None, typer.Option(help="Only this status (repeat), e.g. accepted.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Carrying this tag (repeat).")
    ] = None,
    include_superseded: Annotated[
        bool,
        typer.Option(
            "--include-superseded", help="Also superseded and deprecated items (default: not)."
        ),
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many results (1-100).")] = 10,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    consistency_token: Annotated[
        str | None,
        typer.Option(help="A write's consistency token: the search sees that write."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per line (name, title, path, score, ...)."),
    ] = False,
) -> None:
    """Search the items the caller may read: relevance first, precedence (company first,
    canonical first, newest first) among near-equals; each with its best section."""
    c = caller(tenant, user, token, roles)
    statuses = tuple(
        n.removeprefix("KNOWLEDGE_STATUS_").lower() for n in res.KnowledgeStatus.keys()
    )[1:]
    wanted = [
        _enum(res.KnowledgeStatus, "KNOWLEDGE_STATUS_", s, statuses, "--status")
        for s in status or []
    ]
    if include_superseded and not wanted:
        wanted = [
            res.KNOWLEDGE_STATUS_DRAFT,
            res.KNOWLEDGE_STATUS_PROPOSED,
            res.KNOWLEDGE_STATUS_ACCEPTED,
            res.KNOWLEDGE_STATUS_DEPRECATED,
            res.KNOWLEDGE_STATUS_SUPERSEDED,
        ]
    request = ksvc.SearchKnowledgeRequest(
        parent=c.parent,
        query=query,
        page_size=limit,
        types=[_enum(res.KnowledgeType, "KNOWLEDGE_TYPE_", k, TYPES, "--type") for k in kind or []],
        layers=[
            _enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", v, LAYERS, "--layer") for v in layer or []
        ],
        statuses=wanted,
        tags=tag or [],
    )
    md = client.metadata(c.token)
    if consistency_token:
        md = (*md, (CONSISTENCY_TOKEN_KEY, consistency_token))

    async def call(s: Stubs) -> ksvc.SearchKnowledgeResponse:
        found: ksvc.SearchKnowledgeResponse = await s.knowledge.SearchKnowledge(
            request, metadata=md
        )
        return found

    results = run(call).results
    if as_json:
        for r in results:
            line = json.loads(json_line(r.knowledge_item, round(r.score, 4)))
            print(json.dumps({**line, "section": r.section, "snippet": r.snippet}))
        return
    table = Table()
    for title in ("score", "path", "layer", "status", "title", "section"):
        table.add_column(title, overflow="fold")
    for r in results:
        i = r.knowledge_item
        table.add_row(
            f"{r.score:.3f}", i.path, layer_of(i), status_of(i), i.title, r.section or "-"
        )
    console.print(table)


@knowledge_app.command("history")
def knowledge_history(
    item: Annotated[str, typer.Argument(help="The item's id or resource name.")],
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Show an item's revisions, newest first."""
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[res.KnowledgeRevision]:
        request = ksvc.ListKnowledgeRevisionsRequest(
            parent=c.named("knowledgeItems", item), page_size=500
        )

        def fetch(page: str) -> Awaitable[ksvc.ListKnowledgeRevisionsResponse]:
            request.page_token = page
            return s.knowledge.ListKnowledgeRevisions(request, metadata=client.metadata(c.token))

        return await every_page(fetch, "revisions")

    show(run(call), as_json, REVISION_COLUMNS)


def _transition(
    verb: str,
    item: str,
    tenant: str,
    user: str,
    token: str | None,
    roles: str,
    etag: str,
    reason: str,
    request_id: str | None,
    as_json: bool,
) -> None:
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    request = getattr(ksvc, f"{verb}KnowledgeItemRequest")(
        name=c.named("knowledgeItems", item), etag=etag, reason=reason, request_id=rid
    )

    async def call(s: Stubs) -> tuple[res.KnowledgeItem, str | None]:
        method = getattr(s.knowledge, f"{verb}KnowledgeItem")
        moved: tuple[res.KnowledgeItem, str | None] = await client.call_with_token(
            method(request, metadata=md)
        )
        return moved

    moved, ctoken = run(call)
    done(moved, ctoken, as_json, f"{moved.name} is {status_of(moved)} (version {moved.version})")


@knowledge_app.command("propose")
def knowledge_propose(
    item: Annotated[str, typer.Argument(help="The item's id or resource name.")],
    etag: Etag = "",
    reason: Reason = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """DRAFT → PROPOSED; the type's required sections must be present."""
    _transition("Propose", item, tenant, user, token, roles, etag, reason, request_id, as_json)


@knowledge_app.command("accept")
def knowledge_accept(
    item: Annotated[str, typer.Argument(help="The item's id or resource name.")],
    etag: Etag = "",
    reason: Reason = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """PROPOSED → ACCEPTED, by a reviewer of the item's layer."""
    _transition("Accept", item, tenant, user, token, roles, etag, reason, request_id, as_json)


@knowledge_app.command("supersede")
def knowledge_supersede(
    item: Annotated[str, typer.Argument(help="The ACCEPTED item to supersede.")],
    content: Content,
    title: Annotated[str, typer.Option(help="The successor's title.")],
    path: Annotated[str, typer.Option(help="The successor's path (default: the same).")] = "",
    summary: Annotated[str, typer.Option(help="The successor's summary.")] = "",
    etag: Etag = "",
    reason: Reason = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    request_id: RequestId = None,
    as_json: AsJson = False,
) -> None:
    """Replace an ACCEPTED item by a new ACCEPTED one (SUPERSEDES both ways, one transaction)."""
    c = caller(tenant, user, token, roles)
    rid, md = write(c, request_id)
    name = c.named("knowledgeItems", item)

    async def call(s: Stubs) -> tuple[ksvc.SupersedeKnowledgeItemResponse, str | None]:
        successor_path = path
        if not successor_path:
            old = await s.knowledge.GetKnowledgeItem(
                ksvc.GetKnowledgeItemRequest(name=name), metadata=client.metadata(c.token)
            )
            successor_path = old.path
        request = ksvc.SupersedeKnowledgeItemRequest(
            name=name,
            etag=etag,
            reason=reason,
            request_id=rid,
            successor=res.KnowledgeItem(
                path=successor_path, title=title, summary=summary, content=content.read_text()
            ),
        )
        replied: tuple[
            ksvc.SupersedeKnowledgeItemResponse, str | None
        ] = await client.call_with_token(s.knowledge.SupersedeKnowledgeItem(request, metadata=md))
        return replied

    reply, ctoken = run(call)
    done(
        reply,
        ctoken,
        as_json,
        f"{reply.successor.name} supersedes {reply.superseded.name} (now SUPERSEDED)",
    )
