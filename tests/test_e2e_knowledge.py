"""Knowledge end to end: two knowledge replicas and a governance replica behind the gateway
Envoy (as ``make run`` starts them, each migrated by the owner role first); knowledge reads
the role bindings from governance through the gateway with its service token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack

ADR = "# Luxon\n\n## Context\nc\n\n## Decision Outcome\nd\n\n## Consequences\nq\n"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    root = Path(tempfile.mkdtemp(prefix="aeterna-e2e-knowledge-"))
    os.chmod(root, 0o755)
    s = DevStack(
        replicas=0,
        governance_replicas=1,
        knowledge_replicas=2,
        port=free_port(),
        root=root,
        fresh=True,
    )
    s.start(log=lambda *_: None)
    yield s
    s.stop()


async def test_team_decision_through_the_gateway(stack: DevStack) -> None:
    assert len(stack.knowledge_list) == 2
    auth = DevAuth(stack.root / "auth")

    def as_user(user: str, *roles: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {auth.issue_token('kn', user, roles=roles)}"),)

    admin = as_user("root", "TENANT_ADMIN")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        for unit, kind, parent in (
            ("acme", gres.ORG_UNIT_KIND_COMPANY, ""),
            ("eng", gres.ORG_UNIT_KIND_ORGANIZATION, "acme"),
            ("payments", gres.ORG_UNIT_KIND_TEAM, "eng"),
        ):
            await orgs.CreateOrgUnit(
                osvc.CreateOrgUnitRequest(
                    parent="tenants/kn",
                    org_unit_id=unit,
                    org_unit=gres.OrgUnit(
                        kind=kind,
                        display_name=unit,
                        parent=f"tenants/kn/orgUnits/{parent}" if parent else "",
                    ),
                ),
                metadata=admin,
            )
        await orgs.CreateRoleBinding(
            osvc.CreateRoleBindingRequest(
                parent="tenants/kn",
                role_binding=gres.RoleBinding(
                    subject="users/lead",
                    role=gres.ROLE_TECH_LEAD,
                    org_unit="tenants/kn/orgUnits/payments",
                ),
            ),
            metadata=admin,
        )
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        lead = as_user("lead")
        item = await knowledge.CreateKnowledgeItem(
            ksvc.CreateKnowledgeItemRequest(
                parent="tenants/kn",
                knowledge_item=kres.KnowledgeItem(
                    type=kres.KNOWLEDGE_TYPE_ADR,
                    layer=kres.KNOWLEDGE_LAYER_TEAM,
                    org_unit="tenants/kn/orgUnits/payments",
                    path="adr/0001-luxon",
                    title="Use Luxon",
                    content=ADR,
                ),
                request_id="e2e-create",
            ),
            metadata=(*lead, ("x-aeterna-request-id", "e2e-create")),
        )
        # "Decision Outcome" (MADR) counts as the decision section.
        for step in ("Propose", "Accept"):
            item = await getattr(knowledge, f"{step}KnowledgeItem")(
                getattr(ksvc, f"{step}KnowledgeItemRequest")(name=item.name, etag=item.etag),
                metadata=lead,
            )
        assert item.status == kres.KNOWLEDGE_STATUS_ACCEPTED
        # Someone with no binding in the tree is refused by every replica (round robin).
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await knowledge.GetKnowledgeItem(
                    ksvc.GetKnowledgeItemRequest(name=item.name), metadata=as_user("stranger")
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_cli_add_list_propose_accept_supersede(stack: DevStack, tmp_path: Path) -> None:
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "aeterna_cli.main", "knowledge", *args, "--tenant", "kn"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    adr = tmp_path / "0002-postgres.md"
    adr.write_text(ADR.replace("Luxon", "PostgreSQL"))
    lead = ("--user", "lead")
    created = json.loads(
        cli(
            "add",
            "adr/0002-postgres",
            "--file",
            str(adr),
            "--unit",
            "payments",
            "--title",
            "Use PostgreSQL",
            *lead,
            "--json",
        )
    )
    item = created["name"]
    assert created["consistencyToken"]
    cli("propose", item, *lead)
    cli("accept", item, *lead)
    listed = [
        json.loads(line)
        for line in cli("list", "--path", "adr/0002-postgres", *lead, "--json").splitlines()
    ]
    assert listed == [
        {
            "name": item,
            "title": "Use PostgreSQL",
            "path": "adr/0002-postgres",
            "score": None,
            "status": "ACCEPTED",
            "layer": "TEAM",
        }
    ]
    reply = json.loads(
        cli("supersede", item, "--file", str(adr), "--title", "Use PostgreSQL 17", *lead, "--json")
    )
    assert reply["superseded"]["status"] == "KNOWLEDGE_STATUS_SUPERSEDED"
    history = json.loads(cli("history", item, *lead, "--json"))
    assert [h["reason"] for h in history] == ["superseded", "accepted", "proposed", "created"]
