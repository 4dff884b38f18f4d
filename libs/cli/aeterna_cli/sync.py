"""``aeterna events tail`` and ``aeterna sync status|trigger|conflicts [resolve]`` through the
SDK.

``events tail --room R`` follows rooms live through the gateway and prints one line per
event. The last cursor is written after each event to a file under the user's state
directory (``$XDG_STATE_HOME/aeterna/cursors``, default ``~/.local/state``), one per tenant,
user and set of rooms, so the next ``tail`` resumes where the last one stopped, with no gap
and no duplicate. A dropped stream is resumed the same way; a cursor older than the bus's
retention resumes from the oldest event still kept (and says that events were missed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.sync.v1 import sync_service_pb2_grpc as svc_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from aeterna_cli import client
from aeterna_cli.governance import caller
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console, fail

events_app = typer.Typer(help="Live events: tail rooms, resuming where the last tail stopped.")
sync_app = typer.Typer(help="Knowledge ⇄ memory sync: status, trigger, conflicts.")

RESUMABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.INTERNAL,
)
"""Codes after which ``tail`` reconnects (a replica died, the client was too slow, the cursor
expired)."""


def register(app: typer.Typer) -> None:
    """Add the ``events`` and ``sync`` groups to ``app``."""
    app.add_typer(events_app, name="events")
    app.add_typer(sync_app, name="sync")


def state_dir() -> Path:
    """``$XDG_STATE_HOME/aeterna`` (default ``~/.local/state/aeterna``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aeterna"


def cursor_file(tenant: str, user: str, rooms: list[str]) -> Path:
    """Where ``tail`` keeps the cursor of these rooms for this caller."""
    key = hashlib.sha256(json.dumps([tenant, user, sorted(rooms)]).encode()).hexdigest()[:16]
    return state_dir() / "cursors" / f"{tenant}-{key}"


def _error_metadata(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


def _line(event: res.LiveEvent, as_json: bool) -> str:
    if as_json:
        return json.dumps(json_format.MessageToDict(event), sort_keys=True)
    kind = res.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    rooms = ",".join(event.rooms)
    when = event.commit_time.ToJsonString()
    return f"{when}  {kind:<17} {rooms:<20} {event.resource}  {event.actor}"


async def _tail(
    tenant: str, token: str, rooms: list[str], path: Path, count: int, as_json: bool
) -> None:
    # A few bytes per event on a local file: not worth a thread.
    cursor = path.read_text().strip() if path.exists() else ""  # noqa: ASYNC240
    seen = 0
    backoff = 0.2
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            async with client.channel() as channel:
                stub = svc_grpc.SyncServiceStub(channel)
                call = stub.Subscribe(
                    svc.SubscribeRequest(
                        parent=f"tenants/{tenant}", rooms=rooms, after_cursor=cursor
                    ),
                    metadata=client.metadata(token),
                )
                async for message in call:
                    backoff = 0.2
                    if message.HasField("event"):
                        print(_line(message.event, as_json), flush=True)
                        seen += 1
                    if message.cursor and message.cursor != cursor:
                        cursor = message.cursor
                        path.write_text(cursor)  # noqa: ASYNC240
                    if count and seen >= count:
                        return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RESUMABLE:
                raise
            found = _error_metadata(exc)
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "oldest_cursor" in found:
                console.print("[yellow]events were missed: the cursor expired[/yellow]")
                cursor = found["oldest_cursor"]
            elif "resume_cursor" in found:
                cursor = found["resume_cursor"]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


@events_app.command("tail")
def events_tail(
    room: Annotated[
        list[str],
        typer.Option("--room", help="tenant, user:ID, project:ID, team:ID, org:ID (repeat)."),
    ],
    tenant: Tenant = "default",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    count: Annotated[int, typer.Option(help="Stop after this many events (0: never).")] = 0,
    from_now: Annotated[
        bool, typer.Option("--from-now", help="Forget the kept cursor: only new events.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Print the rooms' events live; Ctrl-C stops, the next tail resumes."""
    c = caller(tenant, user, token, roles)
    path = cursor_file(tenant, user, room)
    if from_now:
        path.unlink(missing_ok=True)
    try:
        asyncio.run(_tail(tenant, c.token, room, path, count, as_json))
    except grpc.aio.AioRpcError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


def _sync_call(tenant: str, user: str, token: str | None, roles: str, make: Any) -> Any:
    c = caller(tenant, user, token, roles)

    async def once() -> Any:
        async with client.channel() as channel:
            return await make(svc_grpc.SyncServiceStub(channel), c)

    try:
        return asyncio.run(once())
    except grpc.aio.AioRpcError as exc:
        fail(exc)


@sync_app.command("status")
def sync_status(
    tenant: Tenant = "default", user: User = "cli", token: Token = None, roles: Roles = ""
) -> None:
    """The tenant's sync state."""
    got = _sync_call(
        tenant,
        user,
        token,
        roles,
        lambda stub, c: stub.GetSyncStatus(
            svc.GetSyncStatusRequest(name=f"{c.parent}/syncStatus"),
            metadata=client.metadata(c.token),
        ),
    )
    console.print_json(json.dumps(json_format.MessageToDict(got)))


TRIGGER_WAIT_S = 60.0
"""Seconds ``sync trigger`` waits out a cycle that another replica runs for the tenant."""


def _aborted(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.ABORTED


@sync_app.command("trigger")
def sync_trigger(
    tenant: Tenant = "default", user: User = "cli", token: Token = None, roles: Roles = ""
) -> None:
    """Run a full reconcile and show the finished cycle; while another replica runs the
    tenant's cycle (``ABORTED``, reason ``SYNC_CYCLE_RUNNING``), wait for it and try again, up
    to TRIGGER_WAIT_S seconds."""
    rid = client.new_request_id()

    async def trigger(stub: Any, c: Any) -> res.SyncCycle:
        # AIP-194: ABORTED is retried at the level of the whole call; a cycle is idempotent.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_aborted),
            wait=wait_exponential_jitter(initial=0.2, max=2.0),
            stop=stop_after_delay(TRIGGER_WAIT_S),
            reraise=True,
        ):
            with attempt:
                got: res.SyncCycle = await stub.TriggerSync(
                    svc.TriggerSyncRequest(parent=c.parent, request_id=rid),
                    metadata=client.write_metadata(c.token, rid),
                )
        return got

    got = _sync_call(tenant, user, token, roles, trigger)
    console.print_json(json.dumps(json_format.MessageToDict(got)))


conflicts_app = typer.Typer(
    help="Conflicts between knowledge items and their pointer memories: list, resolve.",
    invoke_without_command=True,
)
sync_app.add_typer(conflicts_app, name="conflicts")

RESOLUTIONS = {
    name.removeprefix("CONFLICT_RESOLUTION_").lower().replace("_", "-"): value
    for name, value in res.ConflictResolution.items()
    if value
}
"""``--resolution`` choices: rewrite-pointer, delete-pointer, ignore."""


@conflicts_app.callback()
def sync_conflicts(
    ctx: typer.Context,
    tenant: Tenant = "default",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    resolved: Annotated[bool, typer.Option(help="Include resolved conflicts.")] = False,
) -> None:
    """List conflicts between knowledge items and their pointer memories (open ones unless
    --resolved)."""
    if ctx.invoked_subcommand is not None:
        return
    got = _sync_call(
        tenant,
        user,
        token,
        roles,
        lambda stub, c: stub.ListSyncConflicts(
            svc.ListSyncConflictsRequest(parent=c.parent, show_resolved=resolved),
            metadata=client.metadata(c.token),
        ),
    )
    console.print_json(json.dumps(json_format.MessageToDict(got)))


@conflicts_app.command("resolve")
def sync_conflicts_resolve(
    name: Annotated[str, typer.Argument(help="tenants/T/syncConflicts/ID, or the ID alone.")],
    resolution: Annotated[str, typer.Option(help="rewrite-pointer, delete-pointer or ignore.")],
    tenant: Tenant = "default",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
) -> None:
    """Resolve an open conflict (the same resolution again is a no-op)."""
    choice = RESOLUTIONS.get(resolution.strip().lower().replace("_", "-"))
    if choice is None:
        raise typer.BadParameter(f"one of {', '.join(RESOLUTIONS)}", param_hint="--resolution")
    rid = client.new_request_id()
    got = _sync_call(
        tenant,
        user,
        token,
        roles,
        lambda stub, c: stub.ResolveSyncConflict(
            svc.ResolveSyncConflictRequest(
                name=name if "/" in name else f"{c.parent}/syncConflicts/{name}",
                resolution=choice,
                request_id=rid,
            ),
            metadata=client.write_metadata(c.token, rid),
        ),
    )
    console.print_json(json.dumps(json_format.MessageToDict(got)))
