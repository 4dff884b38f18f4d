"""Helpers for the knowledge service tests: a started server on real PostgreSQL whose role
bindings come from a :class:`StaticDirectory`, and one org tree per test tenant."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.auth import TokenVerifier
from aeterna_common.authz import OrgUnit, RoleBinding, Snapshot, StaticDirectory, UnitKind
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.server import GrpcServer
from aeterna_devstack.pytest_plugin import DatabaseUrls, auth_settings
from aeterna_devstack.stack import require_model
from aeterna_knowledge.app import KnowledgeApp, build
from aeterna_knowledge.settings import KnowledgeSettings
from governance_testkit import md, new_tenant

ADR = """# Use Luxon for dates

## Context
Dates are parsed in three different ways.

## Decision
We use Luxon.

## Consequences
Moment is removed.
"""

UNITS = (
    OrgUnit("acme", UnitKind.COMPANY),
    OrgUnit("eng", UnitKind.ORGANIZATION, "acme"),
    OrgUnit("payments", UnitKind.TEAM, "eng"),
    OrgUnit("checkout", UnitKind.PROJECT, "payments"),
    OrgUnit("search", UnitKind.TEAM, "eng"),
)
"""The tree of every test tenant: company acme ⊃ org eng ⊃ teams payments and search;
project checkout under payments."""

BINDINGS = (
    RoleBinding("users/dev", "DEVELOPER", "checkout"),
    RoleBinding("users/lead", "TECH_LEAD", "payments"),
    RoleBinding("users/arch", "ARCHITECT", "eng"),
    RoleBinding("users/viewer", "VIEWER", "payments"),
    RoleBinding("users/other", "TECH_LEAD", "search"),
)
"""Who holds which role where in every test tenant."""


@dataclass
class KnowledgeEnv:
    """A started knowledge server, its directory and a stub."""

    urls: DatabaseUrls
    server: GrpcServer
    app: KnowledgeApp
    channel: grpc.aio.Channel
    stub: svc_grpc.KnowledgeServiceStub
    directory: StaticDirectory

    def tenant(self) -> str:
        """A new tenant with the tree :data:`UNITS` and the bindings :data:`BINDINGS`."""
        tenant = new_tenant()
        self.directory.put(Snapshot(tenant, 1, UNITS, BINDINGS))
        return tenant


async def start_knowledge(
    urls: DatabaseUrls, directory: StaticDirectory, approvals: Any = None, **settings: Any
) -> tuple[GrpcServer, KnowledgeApp]:
    """Build the service as ``serve`` does (migrating at start) and start it on a free port;
    token roles are trusted (tenant admins by token, as in ``make run``). Each server gets
    its own search index directory (one process per embedded index) and the model built by
    ``make model``."""
    common = CommonSettings(
        database_url=urls.app,
        database_owner_url=urls.owner,
        database_indexer_url=urls.indexer,
        auth_trust_token_roles=True,
        **auth_settings(),
    )
    settings.setdefault("index_dir", Path(tempfile.mkdtemp(prefix="knowledge-index-")))
    settings.setdefault("model_dir", require_model())
    app = await build(
        common,
        KnowledgeSettings(idempotency_gc_interval_s=0, **settings),
        SchemaSettings(migrate_on_start=True),
        directory,
        approvals=approvals,
    )
    server = GrpcServer(
        app, verifier=TokenVerifier.from_settings(common), listen="127.0.0.1:0", grace_period_s=2
    )
    await server.start(wait_ready=True)
    return server, app


def who(tenant: str, user: str) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``user`` of ``tenant`` (``root`` is a TENANT_ADMIN by token role)."""
    return md(tenant, user, roles=("TENANT_ADMIN",) if user == "root" else ())


def draft(
    tenant: str,
    path: str = "adr/0010-luxon-dates",
    *,
    unit: str = "payments",
    layer: int = res.KNOWLEDGE_LAYER_TEAM,
    type_: int = res.KNOWLEDGE_TYPE_ADR,
    content: str = ADR,
    **fields: Any,
) -> svc.CreateKnowledgeItemRequest:
    """A CreateKnowledgeItem request (a team's ADR by default)."""
    return svc.CreateKnowledgeItemRequest(
        parent=f"tenants/{tenant}",
        knowledge_item=res.KnowledgeItem(
            type=type_,
            layer=layer,
            org_unit=f"tenants/{tenant}/orgUnits/{unit}",
            path=path,
            title=fields.pop("title", "Use Luxon for dates"),
            content=content,
            **fields,
        ),
    )
