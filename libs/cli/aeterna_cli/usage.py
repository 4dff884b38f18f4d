"""``aeterna usage``: a tenant's billable usage and cost (governance's ``GetTenantUsage``)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, TypeAlias

import grpc
import typer
from aeterna.governance.v1 import usage_service_pb2 as usvc
from aeterna.governance.v1 import usage_service_pb2_grpc as usvc_grpc
from google.protobuf import json_format
from rich.table import Table

from aeterna_cli import client
from aeterna_cli.governance import caller
from aeterna_cli.options import AsJson, Roles, Tenant, Token, User, console, fail

if TYPE_CHECKING:
    UsageStub: TypeAlias = usvc_grpc.UsageServiceAsyncStub
else:
    UsageStub = usvc_grpc.UsageServiceStub

_RELATIVE = re.compile(r"(\d+)([hd])")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 date or time (UTC when it names no zone), or a span back from
    now such as ``24h`` or ``7d``.

    Raises:
        typer.BadParameter: Neither form.
    """
    now = now or datetime.now(UTC)
    m = _RELATIVE.fullmatch(value.strip())
    if m:
        amount = int(m.group(1))
        return now - (timedelta(hours=amount) if m.group(2) == "h" else timedelta(days=amount))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter("an ISO 8601 date or time, or a span like 24h or 7d") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def register(app: typer.Typer) -> None:
    """Add the ``usage`` command to ``app``."""
    app.command("usage")(usage)


def usage(
    since: Annotated[
        str | None,
        typer.Option(help="Start: ISO date/time or a span back (24h, 7d); default: month start."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="End: ISO date/time; default: now.")] = None,
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: AsJson = False,
) -> None:
    """Show the tenant's usage per service and metric, its cost and its budget (tenant
    admins only)."""
    c = caller(tenant, user, token, roles)
    request = usvc.GetTenantUsageRequest(name=f"tenants/{tenant}/usage")
    if since:
        request.start_time.FromDatetime(parse_since(since))
    if until:
        request.end_time.FromDatetime(parse_since(until))

    async def call() -> usvc.TenantUsage:
        async with client.channel() as channel:
            reply: usvc.TenantUsage = await UsageStub(channel).GetTenantUsage(
                request, metadata=client.metadata(c.token)
            )
            return reply

    try:
        result = asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        fail(exc)
    if as_json:
        console.print_json(json_format.MessageToJson(result))
        return
    start = result.start_time.ToDatetime(UTC).isoformat(timespec="minutes")
    end = result.end_time.ToDatetime(UTC).isoformat(timespec="minutes")
    table = Table(title=f"usage of {tenant} from {start} to {end}")
    for column in ("service", "metric", "quantity", "unit price", f"cost ({result.currency})"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for line in result.lines:
        table.add_row(
            line.service,
            line.metric,
            f"{line.quantity:,}",
            f"{line.unit_price:.3g}",
            f"{line.cost:.6f}",
        )
    console.print(table)
    console.print(f"total: {result.total_cost:.6f} {result.currency}")
    if result.monthly_budget:
        console.print(
            f"month to date: {result.month_to_date_cost:.6f} of {result.monthly_budget:g} "
            f"{result.currency} ({100 * result.budget_used_ratio:.1f} %)"
            + (" - new embeddings refused" if result.embeddings_capped else "")
        )
