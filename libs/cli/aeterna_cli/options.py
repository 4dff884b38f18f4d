"""Options and error output shared by the CLI's command groups."""

from __future__ import annotations

from typing import Annotated, NoReturn

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console

console = Console()

Tenant = Annotated[str, typer.Option(envvar="AETERNA_TENANT", help="Tenant of the caller.")]
User = Annotated[str, typer.Option(envvar="AETERNA_USER", help="User id of the caller.")]
Token = Annotated[
    str | None,
    typer.Option(envvar="AETERNA_TOKEN", help="Bearer token; default: a local dev token."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ConsistencyToken = Annotated[
    str | None,
    typer.Option(
        envvar="AETERNA_CONSISTENCY_TOKEN",
        help="Consistency token printed by a write: read that write on any replica.",
    ),
]
Roles = Annotated[
    str,
    typer.Option(
        envvar="AETERNA_ROLES",
        help="Comma-separated roles of the development token (e.g. TENANT_ADMIN); ignored "
        "with --token.",
    ),
]


def refusal(exc: grpc.aio.AioRpcError) -> list[str]:
    """What a failed call's status details say: ``reason: X`` for its ErrorInfo, then
    ``field: description`` per field violation."""
    lines: list[str] = []
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            lines.append(f"reason: {info.reason}")
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            lines += [f"{v.field}: {v.description}" for v in bad.field_violations]
    return lines


def fail(exc: grpc.aio.AioRpcError) -> NoReturn:
    """Print a failed call (code, message, ErrorInfo reason, field violations) and exit 1."""
    console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
    for line in refusal(exc):
        console.print(f"  {line}", markup=False)
    raise typer.Exit(1)
