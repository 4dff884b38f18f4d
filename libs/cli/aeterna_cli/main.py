"""``aeterna``: the command line over gRPC, through Envoy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from google.protobuf import json_format
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from aeterna_cli import client, governance, knowledge, locomo, policy, sync, usage
from aeterna_cli.options import AsJson, ConsistencyToken, Tenant, Token, User, console, fail

T = TypeVar("T")

app = typer.Typer(help="Aeterna: governed memory for AI agents.", no_args_is_help=True)
memory_app = typer.Typer(help="Memories: add, get, list, search, delete, history.")
import_app = typer.Typer(help="Import data sets.")
app.add_typer(memory_app, name="memory")
app.add_typer(import_app, name="import")
governance.register(app)
policy.register(app)
knowledge.register(app)
usage.register(app)
sync.register(app)

UserId = Annotated[str | None, typer.Option(help="Scope: the user the memories are about.")]
SessionId = Annotated[
    str | None, typer.Option(help="Scope: a session (conversation) of that user.")
]
AgentId = Annotated[str | None, typer.Option(help="Scope: an agent acting for that user.")]
ProjectId = Annotated[str | None, typer.Option(help="Scope: a project.")]
TeamId = Annotated[str | None, typer.Option(help="Scope: a team.")]
OrgId = Annotated[str | None, typer.Option(help="Scope: an organisation.")]
CompanyId = Annotated[str | None, typer.Option(help="Scope: the company.")]


def _layer(name: str) -> layer_pb2.MemoryLayer.ValueType:
    if not name:
        return layer_pb2.MEMORY_LAYER_UNSPECIFIED
    return layer_pb2.MemoryLayer.Value(f"MEMORY_LAYER_{name.upper()}")


def _token(token: str | None, tenant: str, user: str) -> str:
    return token or client.dev_token(tenant, user)


def _run(call: Callable[[client.Stub], Awaitable[T]]) -> T:
    """Open a channel to the endpoint, make one call, close, and print errors nicely."""

    async def once() -> T:
        channel, stub = client.memory_stub()
        async with channel:
            return await call(stub)

    try:
        return asyncio.run(once())
    except grpc.aio.AioRpcError as exc:
        fail(exc)
        raise  # unreachable


def _scope(**ids: str | None) -> layer_pb2.Scope:
    return layer_pb2.Scope(**{k: v for k, v in ids.items() if v})


TITLE_CHARS = 80
"""Length of the content excerpt a memory's JSON line carries as its ``title``."""


def memory_json_line(memory: res.Memory, score: float | None = None) -> str:
    """One memory as the machine-readable line of ``list --json`` and ``search --json``:
    the keys every list and search shares (``name``, ``title``: an excerpt of the content,
    ``path`` and ``status``: null, memories have neither, ``score``: null outside a search,
    ``layer``: ``TEAM``, ...), then the memory's own fields (``content``, ``metadata``, ...).
    """
    first = memory.content.strip().splitlines()[0] if memory.content.strip() else ""
    title = first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1] + "…"
    fields: dict[str, Any] = json_format.MessageToDict(memory)
    fields.pop("name", None)
    fields.pop("layer", None)
    line: dict[str, Any] = {
        "name": memory.name,
        "title": title,
        "path": None,
        "score": score,
        "status": None,
        "layer": layer_pb2.MemoryLayer.Name(memory.layer).removeprefix("MEMORY_LAYER_"),
    }
    return json.dumps(line | fields, ensure_ascii=False)


def _print_memories(
    memories: list[res.Memory], as_json: bool, scores: list[float] | None = None
) -> None:
    if as_json:
        for i, m in enumerate(memories):
            print(memory_json_line(m, scores[i] if scores is not None else None))
        return
    table = Table(show_lines=False)
    if scores is not None:
        table.add_column("score", justify="right")
    table.add_column("layer")
    table.add_column("content", overflow="fold")
    table.add_column("name", overflow="fold", style="dim")
    for i, m in enumerate(memories):
        row = [
            layer_pb2.MemoryLayer.Name(m.layer).removeprefix("MEMORY_LAYER_"),
            m.content,
            m.name,
        ]
        if scores is not None:
            row.insert(0, f"{scores[i]:.3f}")
        table.add_row(*row)
    console.print(table)


@app.command()
def token(
    tenant: Tenant = "demo",
    user: User = "cli",
    agent: Annotated[str | None, typer.Option(help="Agent id")] = None,
    roles: Annotated[str, typer.Option(help="Comma-separated roles")] = "",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 3600,
) -> None:
    """Print a development token for the local stack (signed with the key in .var/auth)."""
    from aeterna_cli.client import dev_token

    role_list = [r.strip() for r in roles.split(",") if r.strip()]
    print(dev_token(tenant, user, agent, role_list, ttl_s=ttl))


@memory_app.command("add")
def memory_add(
    content: str,
    layer: Annotated[
        str, typer.Option(help="agent|user|session|project|team|org|company")
    ] = "user",
    user_id: UserId = None,
    session_id: SessionId = None,
    agent_id: AgentId = None,
    project_id: ProjectId = None,
    team_id: TeamId = None,
    org_id: OrgId = None,
    company_id: CompanyId = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag (repeatable)")] = None,
    metadata: Annotated[str, typer.Option(help="JSON object")] = "{}",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    request_id: Annotated[
        str | None,
        typer.Option(help="Idempotency key: repeating the command with it creates nothing new"),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Create a memory (the user layer of the calling user by default).

    Prints the write's consistency token: pass it to `memory search --consistency-token`
    to read this memory on any replica at once."""
    memory = res.Memory(
        layer=_layer(layer),
        scope=_scope(
            user_id=user_id or (user if layer in ("user", "session", "agent") else None),
            session_id=session_id,
            agent_id=agent_id,
            project_id=project_id,
            team_id=team_id,
            org_id=org_id,
            company_id=company_id,
        ),
        content=content,
        tags=tag or [],
    )
    memory.metadata.update(json.loads(metadata))

    rid = request_id or client.new_request_id()

    async def call(stub: client.Stub) -> tuple[res.Memory, str | None]:
        created, ctoken = await client.call_with_token(
            stub.CreateMemory(
                svc.CreateMemoryRequest(parent=f"tenants/{tenant}", memory=memory, request_id=rid),
                metadata=client.write_metadata(_token(token, tenant, user), rid),
            )
        )
        return created, ctoken

    created, ctoken = _run(call)
    if as_json:
        item = json_format.MessageToDict(created)
        item["consistencyToken"] = ctoken or ""
        console.print_json(json.dumps([item]))
        return
    _print_memories([created], False)
    console.print(f"consistency token: {ctoken}")


@memory_app.command("get")
def memory_get(
    name: str,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    consistency_token: ConsistencyToken = None,
    as_json: AsJson = False,
) -> None:
    """Show one memory by name (tenants/T/memories/ID)."""

    async def call(stub: client.Stub) -> res.Memory:
        return await stub.GetMemory(
            svc.GetMemoryRequest(name=name),
            metadata=client.read_metadata(_token(token, tenant, user), consistency_token),
        )

    m = _run(call)
    if as_json:
        _print_memories([m], True)
    else:
        console.print_json(json_format.MessageToJson(m))


@memory_app.command("list")
def memory_list(
    layer: Annotated[str, typer.Option()] = "",
    user_id: UserId = None,
    session_id: SessionId = None,
    tag: Annotated[list[str] | None, typer.Option()] = None,
    page_size: Annotated[int, typer.Option()] = 20,
    page_token: Annotated[str, typer.Option()] = "",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    consistency_token: ConsistencyToken = None,
    as_json: AsJson = False,
) -> None:
    """List memories, newest first."""

    async def call(stub: client.Stub) -> svc.ListMemoriesResponse:
        return await stub.ListMemories(
            svc.ListMemoriesRequest(
                parent=f"tenants/{tenant}",
                layer=_layer(layer),
                scope=_scope(user_id=user_id, session_id=session_id),
                tags=tag or [],
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=client.read_metadata(_token(token, tenant, user), consistency_token),
        )

    reply = _run(call)
    _print_memories(list(reply.memories), as_json)
    if reply.next_page_token and not as_json:
        console.print(f"next page: --page-token {reply.next_page_token}")


@memory_app.command("search")
def memory_search(
    query: str,
    user_id: UserId = None,
    session_id: SessionId = None,
    agent_id: AgentId = None,
    project_id: ProjectId = None,
    team_id: TeamId = None,
    org_id: OrgId = None,
    company_id: CompanyId = None,
    layer: Annotated[list[str] | None, typer.Option(help="Layer (repeatable)")] = None,
    tag: Annotated[list[str] | None, typer.Option()] = None,
    top_k: Annotated[int, typer.Option()] = 10,
    min_score: Annotated[float, typer.Option()] = 0.0,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    consistency_token: ConsistencyToken = None,
    as_json: AsJson = False,
) -> None:
    """Hybrid search over the layers the given identifiers reach."""

    async def call(stub: client.Stub) -> svc.SearchMemoriesResponse:
        return await stub.SearchMemories(
            svc.SearchMemoriesRequest(
                parent=f"tenants/{tenant}",
                query=query,
                scope=_scope(
                    user_id=user_id,
                    session_id=session_id,
                    agent_id=agent_id,
                    project_id=project_id,
                    team_id=team_id,
                    org_id=org_id,
                    company_id=company_id,
                ),
                layers=[_layer(x) for x in layer or []],
                tags=tag or [],
                top_k=top_k,
                min_score=min_score,
            ),
            metadata=client.read_metadata(_token(token, tenant, user), consistency_token),
        )

    reply = _run(call)
    _print_memories([r.memory for r in reply.results], as_json, [r.score for r in reply.results])


@memory_app.command("delete")
def memory_delete(
    name: str, tenant: Tenant = "demo", user: User = "cli", token: Token = None
) -> None:
    """Soft-delete a memory (idempotent)."""

    async def call(stub: client.Stub) -> tuple[res.Memory, str | None]:
        deleted, ctoken = await client.call_with_token(
            stub.DeleteMemory(
                svc.DeleteMemoryRequest(name=name),
                metadata=client.metadata(_token(token, tenant, user)),
            )
        )
        return deleted, ctoken

    m, ctoken = _run(call)
    console.print(f"deleted {m.name} at {m.delete_time.ToJsonString()}")
    console.print(f"consistency token: {ctoken}")


@memory_app.command("reembed")
def memory_reembed(
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    target_model: Annotated[
        str,
        typer.Option(help="Expected model id of the replica, e.g. all-MiniLM-L6-v2-int8/384."),
    ] = "",
    chunk: Annotated[
        int, typer.Option(min=1, help="Memories per call; progress is printed after each.")
    ] = 500,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="Address of the replica to run it (one that refuses to serve because of a "
            "model change is out of the edge's rotation); default $AETERNA_ENDPOINT."
        ),
    ] = None,
) -> None:
    """Re-embed the tenant's memories made by another embedding model (admin).

    Calls ReembedMemories until none remain. Safe to interrupt and run again: it continues
    with the memories not yet re-embedded. Without --token, a local dev token with the role
    TENANT_ADMIN is used.
    """
    bearer = token or client.dev_token(tenant, user, roles=["TENANT_ADMIN"])

    async def run() -> tuple[int, str]:
        channel, stub = client.memory_stub(endpoint)
        total = 0
        async with channel:
            while True:
                reply = await stub.ReembedMemories(
                    svc.ReembedMemoriesRequest(
                        parent=f"tenants/{tenant}", target_model=target_model, max_memories=chunk
                    ),
                    metadata=client.metadata(bearer),
                )
                total += reply.reembedded_count
                console.print(
                    f"re-embedded {total} with {reply.model}; {reply.remaining_count} remaining"
                )
                if reply.remaining_count == 0 or reply.reembedded_count == 0:
                    return total, reply.model

    try:
        total, model = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        fail(exc)
        raise  # unreachable
    console.print(f"done: {total} memories of tenant {tenant} now embedded with {model}")


@memory_app.command("history")
def memory_history(
    name: str,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show the revisions of a memory."""

    async def call(stub: client.Stub) -> svc.ListMemoryRevisionsResponse:
        return await stub.ListMemoryRevisions(
            svc.ListMemoryRevisionsRequest(name=name, page_size=1000),
            metadata=client.metadata(_token(token, tenant, user)),
        )

    reply = _run(call)
    if as_json:
        console.print_json(json_format.MessageToJson(reply))
        return
    table = Table()
    for col in ("rev", "action", "actor", "time", "content"):
        table.add_column(col, overflow="fold")
    for r in reply.revisions:
        table.add_row(
            str(r.revision),
            res.RevisionAction.Name(r.action).removeprefix("REVISION_ACTION_"),
            r.actor,
            r.create_time.ToJsonString(),
            r.new_content or r.old_content,
        )
    console.print(table)


def locomo_requests(sample: dict[str, Any]) -> list[svc.BatchCreateMemoriesRequest]:
    """One BatchCreateMemories per session of a LoCoMo sample (parent left empty)."""
    out = []
    for session_id, when, items in locomo.sessions(sample):
        reqs = []
        for t in items:
            m = res.Memory(
                layer=layer_pb2.MEMORY_LAYER_SESSION,
                scope=layer_pb2.Scope(user_id=str(sample["sample_id"]), session_id=session_id),
                content=locomo.turn_content(t),
            )
            m.metadata.update(
                {"dia_id": str(t["dia_id"]), "speaker": str(t["speaker"]), "session_time": when}
            )
            reqs.append(svc.CreateMemoryRequest(memory=m))
        out.append(
            svc.BatchCreateMemoriesRequest(
                requests=reqs, request_id=f"locomo:{sample['sample_id']}:{session_id}"
            )
        )
    return out


async def import_locomo_async(
    stub: client.Stub,
    path: Path,
    tenant: str,
    token: str,
    *,
    concurrency: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Import a LoCoMo file through the batch API; returns the number of memories written.

    Re-running is idempotent: each session's batch has a stable ``request_id``.
    """
    batches = [b for s in locomo.load(path) for b in locomo_requests(s)]
    sem = asyncio.Semaphore(concurrency)
    written = 0

    async def send(batch: svc.BatchCreateMemoriesRequest) -> None:
        nonlocal written
        batch.parent = f"tenants/{tenant}"
        md = client.write_metadata(token, batch.request_id)
        async with sem:
            # A tenant over its bulk write rate is told when to come back (RetryInfo).
            reply = await client.honour_retry_info(
                lambda: stub.BatchCreateMemories(batch, metadata=md, timeout=300)
            )
        written += len(reply.memories)
        if on_progress:
            on_progress(len(reply.memories))

    await asyncio.gather(*(send(b) for b in batches))
    return written


@import_app.command("locomo")
def import_locomo(
    path: Path,
    tenant: Tenant = "demo",
    user: User = "importer",
    token: Token = None,
    concurrency: Annotated[int, typer.Option(help="Batches in flight")] = 4,
) -> None:
    """Import LoCoMo conversations: one user per conversation, one session id per session,
    one SESSION-layer memory per turn."""
    samples = locomo.load(path)
    total = sum(1 for s in samples for _ in locomo.turns(s))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"importing {len(samples)} conversations", total=total)
        written = _run(
            lambda stub: import_locomo_async(
                stub,
                path,
                tenant,
                _token(token, tenant, user),
                concurrency=concurrency,
                on_progress=lambda n: progress.advance(task, n),
            )
        )
    console.print(
        f"imported {written} memories into tenant {tenant!r} "
        f"(users: {', '.join(str(s['sample_id']) for s in samples)})"
    )


if __name__ == "__main__":
    app()
