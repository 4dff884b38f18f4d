"""Device sync (issue 9, item 5): devices that work offline push their changed memories and
pull what changed on the server, in update order.

Every read and write goes through memory's gRPC API with the caller's own bearer token
forwarded, so memory's authorization applies unchanged; this module never touches memory's
tables. Its own tables (migration ``0005_devices.sql``) hold each device's push sequence and,
per pushed (device, entry, revision), where the entry went and whether it lost, so a retried
push is answered from there and never applied twice.

Conflicts resolve last-writer-wins on the time of the edit on the device (the server's
version counts with the device time it was pushed with, or its ``update_time`` when it was
written by another client). A newer push updates the memory, whose previous version memory
keeps as a revision. A push older than the server's version loses: it is reported back, and
kept as a revision too by writing it and at once writing the winner back (two updates; the
first carries the :data:`KEEP` marker, so a push or pull that meets a memory left between
the two by a crash finishes the restore from memory's revision history). Pushes that touch
the same memory are serialized across replicas by a transaction-scoped advisory lock.

Cursors are opaque: a pull cursor holds the last pulled memory's (update time, id); a push
cursor holds the device and its push sequence number.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.type.v1 import layer_pb2
from aeterna_common.db import Database
from aeterna_common.errors import (
    AeternaError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from aeterna_common.telemetry import client_interceptors
from google.protobuf import field_mask_pb2, json_format, struct_pb2

MARKER = "device_sync"
"""Metadata key of a memory last written by a device push: ``{"device", "entry",
"revision", "update_time"}`` (the edit's time on the device, RFC 3339)."""

KEEP = "device_sync_keep"
"""Metadata key of the transitional write that keeps a losing version as a revision; the
next write restores the winner (see the module docstring)."""

DEVICE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
ENTRY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MEMORY_NAME = re.compile(r"tenants/([^/]+)/memories/([0-9a-fA-F-]{36})")

CALL_TIMEOUT_S = 30.0
"""Deadline in seconds of each call to memory."""

LIST_PAGE = 500
"""Memories asked of memory's ListMemories per page while pulling."""


@dataclass(frozen=True)
class DeviceLimits:
    """Bounds of device requests (issue 9: oversized pushes and clock-skewed timestamps are
    refused).

    Attributes:
        max_entries: Most entries in one push (the proto's 500).
        max_push_bytes: Most bytes of content and tags in one push.
        max_content_bytes: Most bytes of one entry's content (memory's 32 KiB).
        max_skew_s: Seconds a device's ``update_time`` may lie in the future (24 h).
        settle_s: Seconds a change may take from its ``update_time`` to its commit; a pull
            cursor never passes changes younger than this, so a slow writer's change that
            commits late is still pulled (re-sent entries are told apart by revision).
    """

    max_entries: int = 500
    max_push_bytes: int = 4 * 1024 * 1024
    max_content_bytes: int = 32 * 1024
    max_skew_s: float = 86_400.0
    settle_s: float = 5.0


# ---- cursors --------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _unb64(text: str) -> dict[str, Any]:
    data = json.loads(base64.urlsafe_b64decode(text.encode()))
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def encode_pull_cursor(update_time: datetime, memory_id: str) -> str:
    """The pull cursor after the memory ``memory_id`` changed at ``update_time``."""
    return _b64({"t": update_time.isoformat(), "m": memory_id})


def decode_pull_cursor(cursor: str, field: str = "since_cursor") -> tuple[datetime, str]:
    """``(update_time, memory_id)`` of a pull cursor.

    Raises:
        InvalidArgument: The cursor is malformed (field violation on ``field``).
    """
    try:
        data = _unb64(cursor)
        at = datetime.fromisoformat(data["t"])
        mid = str(uuid.UUID(data["m"]))
        if at.tzinfo is None:
            raise ValueError("naive time")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            [FieldViolation(field, "malformed cursor: pass one PullMemories returned")],
            reason="MALFORMED_CURSOR",
        ) from exc
    return at, mid


def encode_push_cursor(device_id: str, seq: int) -> str:
    """The push cursor of the device's ``seq``-th push."""
    return _b64({"d": device_id, "s": seq})


def decode_push_cursor(cursor: str, device_id: str) -> int:
    """The push sequence number of ``device_id``'s push cursor.

    Raises:
        InvalidArgument: Malformed, or another device's (``last_push_cursor``).
    """
    try:
        data = _unb64(cursor)
        device, seq = str(data["d"]), int(data["s"])
        if seq < 1:
            raise ValueError("sequence below 1")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            [FieldViolation("last_push_cursor", "malformed cursor: pass one a push returned")],
            reason="MALFORMED_CURSOR",
        ) from exc
    if device != device_id:
        raise InvalidArgument(
            [FieldViolation("last_push_cursor", "the cursor of another device")],
            reason="MALFORMED_CURSOR",
        )
    return seq


# ---- validation -----------------------------------------------------------------------


def check_push(
    request: svc.PushMemoriesRequest, tenant_id: str, limits: DeviceLimits, now: datetime
) -> None:
    """Refuse a malformed, oversized or clock-skewed push before anything is written.

    Args:
        request: The push.
        tenant_id: The caller's tenant (already checked against ``parent``).
        limits: The bounds.
        now: The server's time (aware).

    Raises:
        InvalidArgument: With a field violation per problem, e.g. ``entries[3].update_time``
            more than ``limits.max_skew_s`` in the future (reason ``CLOCK_SKEW``), or the push
            over ``limits.max_entries`` entries or ``limits.max_push_bytes`` bytes (reason
            ``PUSH_TOO_LARGE``).
    """
    v: list[FieldViolation] = []
    if not DEVICE_ID.fullmatch(request.device_id):
        v.append(FieldViolation("device_id", "1-100 of [A-Za-z0-9_.:-]"))
    n = len(request.entries)
    if n > limits.max_entries:
        v.append(
            FieldViolation(
                "entries", f"at most {limits.max_entries} entries, got {n}", "PUSH_TOO_LARGE"
            )
        )
        raise InvalidArgument(v, reason="PUSH_TOO_LARGE")
    size = sum(
        len(e.content.encode()) + sum(len(t.encode()) for t in e.tags) for e in request.entries
    )
    if size > limits.max_push_bytes:
        v.append(
            FieldViolation(
                "entries",
                f"at most {limits.max_push_bytes} bytes of content, got {size}",
                "PUSH_TOO_LARGE",
            )
        )
        raise InvalidArgument(v, reason="PUSH_TOO_LARGE")
    latest = now + timedelta(seconds=limits.max_skew_s)
    seen: set[str] = set()
    for i, e in enumerate(request.entries):
        at = f"entries[{i}]"
        if not ENTRY_ID.fullmatch(e.entry_id):
            v.append(FieldViolation(f"{at}.entry_id", "1-128 of [A-Za-z0-9_.:-]"))
        elif e.entry_id in seen:
            v.append(FieldViolation(f"{at}.entry_id", "the same entry twice in one push"))
        seen.add(e.entry_id)
        if e.revision < 1:
            v.append(FieldViolation(f"{at}.revision", "must be at least 1"))
        if (
            e.layer == layer_pb2.MEMORY_LAYER_UNSPECIFIED
            or e.layer not in layer_pb2.MemoryLayer.values()
        ):
            v.append(FieldViolation(f"{at}.layer", "a memory layer is required"))
        if e.memory:
            m = MEMORY_NAME.fullmatch(e.memory)
            if m is None or m.group(1) != tenant_id:
                v.append(
                    FieldViolation(
                        f"{at}.memory", f"must be tenants/{tenant_id}/memories/{{uuid}} or empty"
                    )
                )
        if not e.HasField("update_time"):
            v.append(FieldViolation(f"{at}.update_time", "required (the edit's time)"))
        elif e.update_time.ToDatetime(tzinfo=UTC) > latest:
            v.append(
                FieldViolation(
                    f"{at}.update_time",
                    f"more than {limits.max_skew_s / 3600:g} h in the future: fix the device clock",
                    "CLOCK_SKEW",
                )
            )
        if len(e.content.encode()) > limits.max_content_bytes:
            v.append(
                FieldViolation(
                    f"{at}.content",
                    f"at most {limits.max_content_bytes} bytes",
                    "CONTENT_TOO_LARGE",
                )
            )
        elif not e.deleted and not e.content:
            v.append(FieldViolation(f"{at}.content", "required unless deleted"))
    if v:
        raise InvalidArgument(v)


def check_pull(request: svc.PullMemoriesRequest) -> tuple[tuple[datetime, str] | None, int]:
    """The pull's position and limit (0: 100).

    Raises:
        InvalidArgument: A malformed cursor, unknown layer or a limit outside 0-1000.
    """
    v: list[FieldViolation] = []
    if not 0 <= request.limit <= 1000:
        v.append(FieldViolation("limit", "must be 0 (100) to 1000"))
    for i, layer in enumerate(request.layers):
        if (
            layer == layer_pb2.MEMORY_LAYER_UNSPECIFIED
            or layer not in layer_pb2.MemoryLayer.values()
        ):
            v.append(FieldViolation(f"layers[{i}]", "not a memory layer"))
    if v:
        raise InvalidArgument(v)
    since = decode_pull_cursor(request.since_cursor) if request.since_cursor else None
    return since, request.limit or 100


# ---- conversion -----------------------------------------------------------------------


def _marker(memory: mres.Memory) -> dict[str, Any] | None:
    value = json_format.MessageToDict(memory.metadata).get(MARKER)
    return value if isinstance(value, dict) else None


def edit_time(memory: mres.Memory) -> datetime:
    """When the memory's version in force was edited: the device time it was pushed with,
    else its ``update_time``."""
    mark = _marker(memory)
    if mark is not None:
        try:
            return datetime.fromisoformat(str(mark["update_time"]))
        except (KeyError, ValueError):
            pass
    return memory.update_time.ToDatetime(tzinfo=UTC)


def device_memory(memory: mres.Memory, now: datetime) -> res.DeviceMemory:
    """A memory as a device receives it: ``entry_id`` is the memory's id (a device matches
    pulled entries on ``memory``), memory's revision, the edit time, ``deleted`` for a
    deleted or expired memory."""
    out = res.DeviceMemory(
        entry_id=memory.name.rsplit("/", 1)[-1],
        memory=memory.name,
        revision=memory.revision,
        layer=memory.layer,
        scope=memory.scope,
        content=memory.content,
        tags=memory.tags,
        deleted=bool(memory.HasField("delete_time"))
        or (memory.HasField("expire_time") and memory.expire_time.ToDatetime(tzinfo=UTC) <= now),
    )
    out.update_time.FromDatetime(edit_time(memory))
    return out


def create_request_id(user_id: str, device_id: str, entry_id: str, revision: int) -> str:
    """Memory's ``request_id`` for creating an entry's memory: one per (user, device, entry,
    revision), so a retried create returns the first memory (at most 128 ASCII)."""
    digest = hashlib.sha256(f"{user_id}\n{device_id}\n{entry_id}\n{revision}".encode())
    return "device:" + digest.hexdigest()[:48]


def _metadata(base: struct_pb2.Struct, **set_keys: Any) -> struct_pb2.Struct:
    """``base`` without :data:`KEEP`, with ``set_keys`` set (None: removed)."""
    data = json_format.MessageToDict(base)
    data.pop(KEEP, None)
    for key, value in set_keys.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    out = struct_pb2.Struct()
    json_format.ParseDict(data, out)
    return out


def _refusal(exc: grpc.aio.AioRpcError) -> AeternaError:
    """Memory's error on a pull as this service's (its message kept)."""
    code, text = exc.code(), exc.details() or exc.code().name
    meta = {"memory_code": code.name}
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"memory refused: {text}", reason="MEMORY_REFUSED", metadata=meta)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument([FieldViolation("layers", text)])
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"memory: {text}", metadata=meta)
    return Unavailable(
        f"memory could not be reached: {text}", reason="MEMORY_UNAVAILABLE", metadata=meta
    )


# ---- the service ----------------------------------------------------------------------


@dataclass
class _Outcome:
    memory: str
    outcome: str  # '' applied, 'LOST', or memory's refusal
    conflict: res.PushConflict | None = None


class DeviceSync:
    """Push and pull of device memories through memory's gRPC API.

    Args:
        db: Pool of the application role (this service's tables).
        memory_target: ``host:port`` of memory (or of a sidecar or gateway routing it).
        limits: Bounds of requests.
    """

    def __init__(self, db: Database, memory_target: str, limits: DeviceLimits) -> None:
        self.db = db
        self.limits = limits
        self._channel = grpc.aio.insecure_channel(memory_target, interceptors=client_interceptors())
        self.memory = msvc_grpc.MemoryServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel to memory."""
        await self._channel.close()

    # ---- push ---------------------------------------------------------------------------

    async def push(
        self, tenant_id: str, user_id: str, authorization: str, request: svc.PushMemoriesRequest
    ) -> svc.PushMemoriesResponse:
        """Apply a validated push (:func:`check_push`) entry by entry.

        Args:
            tenant_id: The caller's tenant.
            user_id: The caller (its devices are its own).
            authorization: The caller's ``authorization`` header, forwarded to memory.
            request: The push.

        Returns:
            The push cursor, the entries that lost or were refused, and entry id → memory.

        Raises:
            InvalidArgument: ``last_push_cursor`` is malformed, another device's, or never
                issued.
            Unavailable: Memory could not be reached (entries before it are applied, and a
                retry skips them).
        """
        md = (("authorization", authorization),)
        device = request.device_id
        async with self.db.transaction(tenant_id) as conn:
            seq = await conn.fetchval(
                "INSERT INTO sync_devices (tenant_id, user_id, device_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant_id, user_id, device_id) DO UPDATE SET "
                "push_seq = sync_devices.push_seq RETURNING push_seq",
                tenant_id,
                user_id,
                device,
            )
        if request.last_push_cursor:
            last = decode_push_cursor(request.last_push_cursor, device)
            if last > seq:
                raise InvalidArgument(
                    [FieldViolation("last_push_cursor", "not a cursor of this device's pushes")],
                    reason="MALFORMED_CURSOR",
                )
        out = svc.PushMemoriesResponse()
        for entry in request.entries:
            got = await self._push_one(tenant_id, user_id, device, entry, md)
            if got.memory:
                out.server_ids[entry.entry_id] = got.memory
            if got.conflict is not None:
                out.conflicts.append(got.conflict)
        async with self.db.transaction(tenant_id) as conn:
            seq = await conn.fetchval(
                "UPDATE sync_devices SET push_seq = push_seq + 1, last_push_at = clock_timestamp()"
                " WHERE tenant_id = $1 AND user_id = $2 AND device_id = $3 RETURNING push_seq",
                tenant_id,
                user_id,
                device,
            )
        out.cursor = encode_push_cursor(device, int(seq))
        return out

    async def _push_one(
        self,
        tenant_id: str,
        user_id: str,
        device: str,
        entry: res.DeviceMemory,
        md: Sequence[tuple[str, str]],
    ) -> _Outcome:
        """One entry, under the advisory lock of its memory (or of the entry, to create)."""
        key = (user_id, device, entry.entry_id)
        async with self.db.transaction(tenant_id) as conn:
            name = entry.memory or await conn.fetchval(
                "SELECT memory FROM sync_device_entries WHERE tenant_id = $1 AND user_id = $2 "
                "AND device_id = $3 AND entry_id = $4 AND memory <> '' "
                "ORDER BY revision DESC LIMIT 1",
                tenant_id,
                *key,
            )
            lock = f"{tenant_id}\n{name or json.dumps(key)}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock)
            # Under the lock: a retry racing the first attempt waits, then replays it.
            done = await conn.fetchrow(
                "SELECT memory, outcome FROM sync_device_entries WHERE tenant_id = $1 AND "
                "user_id = $2 AND device_id = $3 AND entry_id = $4 AND revision = $5",
                tenant_id,
                *key,
                entry.revision,
            )
            if done is not None:
                return await self._replayed(done["memory"], done["outcome"], entry, md)
            got = await (
                self._apply(tenant_id, device, entry, name, md)
                if name
                else self._create(tenant_id, user_id, device, entry, md)
            )
            await conn.execute(
                "INSERT INTO sync_device_entries (tenant_id, user_id, device_id, entry_id, "
                "revision, memory, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT DO NOTHING",
                tenant_id,
                *key,
                entry.revision,
                got.memory,
                got.outcome,
            )
        return got

    async def _replayed(
        self, name: str, outcome: str, entry: res.DeviceMemory, md: Sequence[tuple[str, str]]
    ) -> _Outcome:
        """The answer to a retried (device, entry, revision): nothing is written again."""
        if not outcome:
            return _Outcome(name, "")
        winning = None
        if outcome == "LOST":
            try:
                winning = await self._get(name, md)
            except grpc.aio.AioRpcError:
                winning = None
        return self._conflict(name, outcome, entry, winning)

    def _conflict(
        self, name: str, outcome: str, entry: res.DeviceMemory, winning: mres.Memory | None
    ) -> _Outcome:
        c = res.PushConflict(entry_id=entry.entry_id, memory=name, losing=entry)
        if winning is not None:
            c.winning.CopyFrom(device_memory(winning, datetime.now(UTC)))
        return _Outcome(name, outcome, c)

    async def _create(
        self,
        tenant_id: str,
        user_id: str,
        device: str,
        entry: res.DeviceMemory,
        md: Sequence[tuple[str, str]],
    ) -> _Outcome:
        if entry.deleted:
            # Created and deleted offline: nothing reaches the server.
            return _Outcome("", "")
        memory = mres.Memory(
            layer=entry.layer,
            scope=entry.scope,
            content=entry.content,
            tags=entry.tags,
            metadata=_metadata(struct_pb2.Struct(), **{MARKER: self._mark(device, entry)}),
        )
        try:
            created = await self.memory.CreateMemory(
                msvc.CreateMemoryRequest(
                    parent=f"tenants/{tenant_id}",
                    memory=memory,
                    request_id=create_request_id(user_id, device, entry.entry_id, entry.revision),
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            return self._refused("", entry, exc)
        return _Outcome(created.name, "")

    def _refused(self, name: str, entry: res.DeviceMemory, exc: grpc.aio.AioRpcError) -> _Outcome:
        """Memory refused the entry (its own rules or bad input): reported, not retried."""
        if exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
        ):
            raise _refusal(exc) from exc
        return self._conflict(name, exc.code().name, entry, None)

    @staticmethod
    def _mark(device: str, entry: res.DeviceMemory) -> dict[str, Any]:
        return {
            "device": device,
            "entry": entry.entry_id,
            "revision": str(entry.revision),
            "update_time": entry.update_time.ToDatetime(tzinfo=UTC).isoformat(),
        }

    async def _get(self, name: str, md: Sequence[tuple[str, str]]) -> mres.Memory:
        got: mres.Memory = await self.memory.GetMemory(
            msvc.GetMemoryRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
        )
        return got

    async def _update(
        self,
        memory: mres.Memory,
        content: str,
        tags: Sequence[str],
        metadata: struct_pb2.Struct,
        md: Sequence[tuple[str, str]],
    ) -> mres.Memory:
        patch = mres.Memory(name=memory.name, content=content, tags=tags, metadata=metadata)
        got: mres.Memory = await self.memory.UpdateMemory(
            msvc.UpdateMemoryRequest(
                memory=patch,
                update_mask=field_mask_pb2.FieldMask(paths=["content", "tags", "metadata"]),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        return got

    async def restore_kept(self, memory: mres.Memory, md: Sequence[tuple[str, str]]) -> mres.Memory:
        """Finish a keep left half done: write back the content the :data:`KEEP` write
        replaced (from memory's revision history), with the metadata before it.

        Args:
            memory: The memory as read, carrying :data:`KEEP`.
            md: Call metadata with the caller's token.

        Returns:
            The memory as restored.

        Raises:
            grpc.aio.AioRpcError: Memory refused or could not be reached.
        """
        keep = json_format.MessageToDict(memory.metadata).get(KEEP) or {}
        old = None
        token = ""
        while True:
            page = await self.memory.ListMemoryRevisions(
                msvc.ListMemoryRevisionsRequest(name=memory.name, page_size=100, page_token=token),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
            for r in page.revisions:
                if r.revision == memory.revision:
                    old = r.old_content
            token = page.next_page_token
            if not token or old is not None:
                break
        restored_mark = keep.get("winner_marker") if isinstance(keep, dict) else None
        return await self._update(
            memory,
            old if old is not None else memory.content,
            memory.tags,
            _metadata(memory.metadata, **{MARKER: restored_mark}),
            md,
        )

    async def _apply(
        self,
        tenant_id: str,
        device: str,
        entry: res.DeviceMemory,
        name: str,
        md: Sequence[tuple[str, str]],
    ) -> _Outcome:
        """Last writer wins between ``entry`` and the memory ``name`` in force."""
        try:
            current = await self._get(name, md)
            if KEEP in json_format.MessageToDict(current.metadata):
                current = await self.restore_kept(current, md)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # Deleted on the server (a deletion is final in memory) or never readable.
                gone = res.DeviceMemory(memory=name, deleted=True)
                c = res.PushConflict(
                    entry_id=entry.entry_id, memory=name, losing=entry, winning=gone
                )
                return _Outcome(name, "LOST", c)
            return self._refused(name, entry, exc)
        mark = _marker(current)
        mine = self._mark(device, entry)
        if mark is not None and all(
            mark.get(k) == mine[k] for k in ("device", "entry", "revision")
        ):
            return _Outcome(name, "")  # applied before its record was written
        incoming = entry.update_time.ToDatetime(tzinfo=UTC)
        try:
            if incoming > edit_time(current):
                if entry.deleted:
                    await self.memory.DeleteMemory(
                        msvc.DeleteMemoryRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
                    )
                else:
                    await self._update(
                        current,
                        entry.content,
                        entry.tags,
                        _metadata(current.metadata, **{MARKER: mine}),
                        md,
                    )
                return _Outcome(name, "")
            if not entry.deleted:
                # The loser is kept as a revision: written, then the winner written back.
                keep = {"device": device, "entry": entry.entry_id, "winner_marker": mark}
                kept = await self._update(
                    current,
                    entry.content,
                    current.tags,
                    _metadata(current.metadata, **{MARKER: mine, KEEP: keep}),
                    md,
                )
                current = await self._update(
                    kept,
                    current.content,
                    current.tags,
                    _metadata(current.metadata, **{MARKER: mark}),
                    md,
                )
        except grpc.aio.AioRpcError as exc:
            return self._refused(name, entry, exc)
        return self._conflict(name, "LOST", entry, current)

    # ---- pull ---------------------------------------------------------------------------

    async def pull(
        self,
        authorization: str,
        tenant_id: str,
        since: tuple[datetime, str] | None,
        layers: Sequence[int],
        limit: int,
    ) -> svc.PullMemoriesResponse:
        """Memories changed after ``since`` that the caller may read, oldest change first.

        Args:
            tenant_id: The caller's tenant.
            authorization: The caller's ``authorization`` header, forwarded to memory.
            since: The position of the last pull, or None for everything.
            layers: Only these layers (empty: every layer memory lets the caller read).
            limit: At most this many entries.

        Returns:
            The entries, the next cursor (never past a change younger than
            ``limits.settle_s``, see :class:`DeviceLimits`) and whether more are waiting.

        Raises:
            PermissionDenied: Memory refused the listing.
            Unavailable: Memory could not be reached.
        """
        md = (("authorization", authorization),)
        now = datetime.now(UTC)
        horizon = now - timedelta(seconds=self.limits.settle_s)
        wanted = set(layers)
        request = msvc.ListMemoriesRequest(
            parent=f"tenants/{tenant_id}",
            page_size=min(LIST_PAGE, limit + 1),
            show_deleted=True,
            order_by="update_time",
        )
        if since is not None:
            request.min_update_time.FromDatetime(since[0])
        picked: list[mres.Memory] = []
        more = False
        while True:
            try:
                page = await self.memory.ListMemories(request, metadata=md, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise _refusal(exc) from exc
            for m in page.memories:
                at = m.update_time.ToDatetime(tzinfo=UTC)
                mid = m.name.rsplit("/", 1)[-1]
                if since is not None and (at, mid) <= since:
                    continue
                if wanted and m.layer not in wanted:
                    continue
                if KEEP in json_format.MessageToDict(m.metadata):
                    continue  # between a keep and its restore: the restore comes next
                if len(picked) == limit:
                    more = True
                    break
                picked.append(m)
            if more or not page.next_page_token:
                break
            request.page_token = page.next_page_token
        out = svc.PullMemoriesResponse(has_more=more)
        out.entries.extend(device_memory(m, now) for m in picked)
        cursor = since
        for m in picked:
            at = m.update_time.ToDatetime(tzinfo=UTC)
            if at >= horizon:
                break
            cursor = (at, m.name.rsplit("/", 1)[-1])
        out.cursor = encode_pull_cursor(*cursor) if cursor is not None else ""
        return out
