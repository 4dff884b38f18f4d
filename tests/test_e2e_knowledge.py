"""Knowledge end to end: two knowledge replicas and a governance replica behind the gateway
Envoy (as ``make run`` starts them, each migrated by the owner role first); knowledge reads
the role bindings from governance through the gateway with its service token. ``aeterna
knowledge import`` / ``export`` run on a folder written as teams keep them (adr-tools with
"Superseded by", MADR with front matter, Nygard, an unquoted colon in front matter, a record
missing a required section, an empty file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from aeterna_common.markdown import ParsedRecord, parse_record
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack

ADR = "# Luxon\n\n## Context\nc\n\n## Decision Outcome\nd\n\n## Consequences\nq\n"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-knowledge-", replicas=0, governance_replicas=1, knowledge_replicas=2
    ) as s:
        yield s


async def _tree(
    orgs: osvc_grpc.OrganizationServiceStub,
    tenant: str,
    admin: tuple[tuple[str, str], ...],
    *,
    with_team: bool,
) -> None:
    """Company ``acme`` > organisation ``eng`` (> team ``payments``) in ``tenant``."""
    units = [
        ("acme", gres.ORG_UNIT_KIND_COMPANY, ""),
        ("eng", gres.ORG_UNIT_KIND_ORGANIZATION, "acme"),
    ]
    if with_team:
        units.append(("payments", gres.ORG_UNIT_KIND_TEAM, "eng"))
    for unit, kind, parent in units:
        await orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=f"tenants/{tenant}",
                org_unit_id=unit,
                org_unit=gres.OrgUnit(
                    kind=kind,
                    display_name=unit,
                    parent=f"tenants/{tenant}/orgUnits/{parent}" if parent else "",
                ),
            ),
            metadata=admin,
        )


async def test_team_decision_through_the_gateway(stack: DevStack) -> None:
    assert len(stack.knowledge_list) == 2
    auth = DevAuth(stack.root / "auth")

    def as_user(user: str, *roles: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {auth.issue_token('kn', user, roles=roles)}"),)

    admin = as_user("root", "TENANT_ADMIN")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        await _tree(orgs, "kn", admin, with_team=True)
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
    # Search through the gateway reads the supersede on whichever replica answers (its
    # consistency token), and leaves the superseded item out unless asked for.
    ctoken = ("--consistency-token", reply["consistencyToken"])
    found = [
        json.loads(line)
        for line in cli("search", "which database do we use", *ctoken, *lead, "--json").splitlines()
    ]
    assert (found[0]["title"], found[0]["status"], found[0]["layer"]) == (
        "Use PostgreSQL 17",
        "ACCEPTED",
        "TEAM",
    )
    assert {"name", "title", "path", "score", "status", "layer"} <= set(found[0])
    assert 0 < found[0]["score"] <= 1
    assert item not in {f["name"] for f in found}
    both = cli("search", "PostgreSQL", "--include-superseded", *ctoken, *lead, "--json")
    statuses = {json.loads(line)["name"]: json.loads(line)["status"] for line in both.splitlines()}
    assert statuses[item] == "SUPERSEDED"
    assert statuses[found[0]["name"]] == "ACCEPTED"


SECTIONS = "## Context\n\n{c}\n\n## Decision\n\n{d}\n\n## Consequences\n\nFewer surprises.\n"

FOLDER = {
    "adr/0001-record-architecture-decisions.md": (
        "# 1. Record architecture decisions\n\nDate: 2024-03-04\n\n## Status\n\nAccepted\n\n"
        + SECTIONS.format(c="We need to record decisions.", d="We will keep ADRs.")
    ),
    "adr/0002-use-moment.md": (
        "# 2. Use Moment for dates\n\nDate: 2024-03-05\n\n## Status\n\n"
        "Superseded by [3. Use Luxon for dates](0003-use-luxon.md)\n\n"
        + SECTIONS.format(c="Dates are hard.", d="We use Moment.")
    ),
    "adr/0003-use-luxon.md": (
        "# 3. Use Luxon for dates\n\nDate: 2024-06-01\n\n## Status\n\nAccepted\n\n"
        "Supersedes [2. Use Moment for dates](0002-use-moment.md)\n\n"
        + SECTIONS.format(c="Moment is in maintenance mode.", d="We use Luxon.")
    ),
    "adr/0004-postgres.md": (
        "---\ntitle: Store state in PostgreSQL\nstatus: proposed\ndate: 2024-07-01\n"
        "tags:\n- Data Storage\nid: 4\ndeciders: platform team\n---\n"
        "## Context and Problem Statement\n\nWe need a database.\n\n"
        "## Decision Outcome\n\nPostgreSQL with RLS.\n\n## Consequences\n\nOne more server.\n"
    ),
    "adr/0005-queue.md": (
        "# Use Redis streams for the outbox\n\n"
        + SECTIONS.format(c="Events must leave the database.", d="Redis streams.")
    ),
    "adr/0006-grpc.md": (
        "---\ntitle: Decision: use gRPC\nstatus: rejected\n---\n# Use gRPC\n\n"
        + SECTIONS.format(c="Services talk.", d="gRPC everywhere.")
    ),
    "adr/0007-half-done.md": (
        "# 7. Half done\n\nDate: 2024-08-01\n\n## Status\n\nAccepted\n\n"
        "## Context\n\nWe started writing this.\n"
    ),
    "adr/broken.md": "  \n",
}


def _body(text: str) -> str:
    parsed = parse_record("x.md", text)
    assert isinstance(parsed, ParsedRecord), parsed
    return parsed.body


async def test_import_export_round_trip(stack: DevStack, tmp_path: Path) -> None:
    auth = DevAuth(stack.root / "auth")
    admin = (("authorization", f"Bearer {auth.issue_token('ki', 'root', roles=['TENANT_ADMIN'])}"),)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        await _tree(osvc_grpc.OrganizationServiceStub(ch), "ki", admin, with_team=False)
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}

    def cli(*args: str, user: str = "root", ok: bool = True) -> str:
        who = ("--tenant", "ki", "--user", user)
        roles = ("--roles", "TENANT_ADMIN") if user == "root" else ()
        done = subprocess.run(
            [sys.executable, "-m", "aeterna_cli.main", "knowledge", *args, *who, *roles],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout

    def imported() -> tuple[dict[str, dict[str, object]], dict[str, int]]:
        lines = [json.loads(x) for x in cli("import", str(src), *target, "--json").splitlines()]
        return {x["file"]: x for x in lines[:-1]}, lines[-1]["summary"]

    async def items() -> dict[str, kres.KnowledgeItem]:
        async with grpc.aio.insecure_channel(stack.endpoint) as ch:
            reply = await ksvc_grpc.KnowledgeServiceStub(ch).ListKnowledgeItems(
                ksvc.ListKnowledgeItemsRequest(parent="tenants/ki", page_size=100),
                metadata=admin,
            )
        return {i.path: i for i in reply.knowledge_items}

    src = tmp_path / "src"
    for path, text in FOLDER.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text(text)
    target = ("--layer", "team", "--unit", "platform")

    # A caller who may not create units learns only that the unit does not exist.
    refused = cli("import", str(src), "--layer", "team", "--unit", "ghost", user="dev", ok=False)
    assert "NOT_FOUND" in refused and "ghost" in refused

    # The TENANT_ADMIN's import creates the team under the tenant's only organisation.
    outcomes, summary = imported()
    assert summary == {"created": 7, "updated": 0, "unchanged": 0, "failed": 1}
    assert outcomes["adr/broken.md"]["reasons"] == ["empty file"]
    half = outcomes["adr/0007-half-done.md"]
    assert half["status"] == "DRAFT" and "MISSING_SECTIONS" in str(half["reasons"])
    by_path = await items()
    assert {p: kres.KnowledgeStatus.Name(i.status)[17:] for p, i in by_path.items()} == {
        "adr/0001-record-architecture-decisions": "ACCEPTED",
        "adr/0002-use-moment": "SUPERSEDED",
        "adr/0003-use-luxon": "ACCEPTED",
        "adr/0004-postgres": "PROPOSED",
        "adr/0005-queue": "DRAFT",
        "adr/0006-grpc": "REJECTED",
        "adr/0007-half-done": "DRAFT",
    }
    assert by_path["adr/0006-grpc"].title == "Decision: use gRPC"
    assert list(by_path["adr/0004-postgres"].tags) == ["data-storage"]
    assert outcomes["adr/0002-use-moment.md"]["status"] == "SUPERSEDED"
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        team = await orgs.GetOrgUnit(
            osvc.GetOrgUnitRequest(name="tenants/ki/orgUnits/platform"), metadata=admin
        )
        assert team.parent == "tenants/ki/orgUnits/eng"
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)

        async def related(path: str) -> set[tuple[str, str]]:
            reply = await knowledge.ListKnowledgeRelations(
                ksvc.ListKnowledgeRelationsRequest(parent=by_path[path].name), metadata=admin
            )
            paths = {i.name: p for p, i in by_path.items()}
            return {
                (kres.RelationKind.Name(r.kind), paths[r.target]) for r in reply.knowledge_relations
            }

        assert await related("adr/0002-use-moment") == {
            ("RELATION_KIND_SUPERSEDED_BY", "adr/0003-use-luxon")
        }
        assert await related("adr/0003-use-luxon") == {
            ("RELATION_KIND_SUPERSEDES", "adr/0002-use-moment")
        }

    # Unchanged files: nothing written, no new revision.
    outcomes, summary = imported()
    assert summary == {"created": 0, "updated": 0, "unchanged": 7, "failed": 1}
    versions = {p: i.version for p, i in (await items()).items()}
    assert versions == {p: i.version for p, i in by_path.items()}

    # A changed draft: one new revision of that item only. A changed accepted ADR is
    # immutable: reported, left as it was.
    queue = src / "adr/0005-queue.md"
    queue.write_text(queue.read_text().replace("Redis streams.", "Redis streams, trimmed."))
    first = src / "adr/0001-record-architecture-decisions.md"
    accepted = first.read_text()
    first.write_text(accepted.replace("keep ADRs", "keep ADRs in Git"))
    outcomes, summary = imported()
    assert summary == {"created": 0, "updated": 1, "unchanged": 5, "failed": 2}
    refusal = outcomes["adr/0001-record-architecture-decisions.md"]
    assert refusal["status"] == "ACCEPTED" and "FAILED_PRECONDITION" in str(refusal["reasons"])
    first.write_text(accepted)
    versions["adr/0005-queue"] += 1
    assert {p: i.version for p, i in (await items()).items()} == versions

    # Export writes the same files back, modulo normalised front matter.
    out = tmp_path / "out"
    cli("export", str(out), *target)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.md"))
    assert written == sorted(p for p in FOLDER if p != "adr/broken.md")
    for path in written:
        again, before = (out / path).read_text(), (src / path).read_text()
        assert _body(again) == _body(before), path
        if not before.startswith("---") and path != "adr/0007-half-done.md":
            assert again == before, path
    assert "\nid: 4\ndeciders: platform team\n" in (out / "adr/0004-postgres.md").read_text()
    # The record that stopped at DRAFT says so in its front matter.
    half_out = parse_record("adr/0007-half-done.md", (out / "adr/0007-half-done.md").read_text())
    assert isinstance(half_out, ParsedRecord) and half_out.status == "DRAFT"


EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "adr"


async def test_cli_promotion_story(stack: DevStack) -> None:
    """The README's story: the team's ADRs imported from ``docs/examples/adr``, one team
    decision promoted to the organisation through a governance approval, all by the CLI
    through the gateway."""
    auth = DevAuth(stack.root / "auth")
    admin = (("authorization", f"Bearer {auth.issue_token('kp', 'root', roles=['TENANT_ADMIN'])}"),)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        await _tree(orgs, "kp", admin, with_team=True)
        for subject, role, unit in (
            ("users/lead", gres.ROLE_TECH_LEAD, "payments"),
            ("users/arch", gres.ROLE_ARCHITECT, "eng"),
        ):
            await orgs.CreateRoleBinding(
                osvc.CreateRoleBindingRequest(
                    parent="tenants/kp",
                    role_binding=gres.RoleBinding(
                        subject=subject, role=role, org_unit=f"tenants/kp/orgUnits/{unit}"
                    ),
                ),
                metadata=admin,
            )
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}

    def cli(*args: str, user: str, ok: bool = True) -> str:
        who = ("--tenant", "kp", "--user", user)
        done = subprocess.run(
            [sys.executable, "-m", "aeterna_cli.main", "knowledge", *args, *who],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout + ("" if ok else done.stderr)

    def listed(*args: str, user: str = "lead") -> list[dict[str, object]]:
        return [json.loads(line) for line in cli("list", *args, "--json", user=user).splitlines()]

    cli("import", str(EXAMPLES), "--layer", "team", "--unit", "payments", user="lead")
    statuses = {x["path"]: x["status"] for x in listed()}
    assert statuses == {
        "0001-record-architecture-decisions": "ACCEPTED",
        "0002-use-postgresql-for-the-ledger": "ACCEPTED",
        "0003-idempotency-keys-on-every-write": "ACCEPTED",
        "0004-retry-with-exponential-backoff": "PROPOSED",
        "0005-use-luxon-for-dates": "DRAFT",
    }
    path = "0003-idempotency-keys-on-every-write"
    (source,) = listed("--path", path)
    preview = cli(
        "promote",
        str(source["name"]),
        "--to-layer",
        "org",
        "--to-unit",
        "eng",
        "--preview",
        user="lead",
    )
    assert "no blockers" in preview
    request = json.loads(
        cli(
            "promote",
            str(source["name"]),
            "--to-layer",
            "org",
            "--to-unit",
            "eng",
            "--json",
            user="lead",
        )
    )
    assert request["state"] == "PROMOTION_STATE_PENDING_REVIEW" and request["approvalRequest"]
    # The team's TECH_LEAD does not review for the organisation; its ARCHITECT does.
    refused = cli("promotion", "approve", request["name"], user="lead", ok=False)
    assert "PERMISSION_DENIED" in refused
    approved = json.loads(cli("promotion", "approve", request["name"], "--json", user="arch"))
    assert approved["state"] == "PROMOTION_STATE_APPROVED"
    applied = json.loads(cli("promotion", "apply", request["name"], "--json", user="lead"))
    assert applied["state"] == "PROMOTION_STATE_APPLIED"
    both = {(x["layer"], x["status"]) for x in listed("--path", path, user="arch")}
    assert both == {("TEAM", "SUPERSEDED"), ("ORG", "ACCEPTED")}
    (promoted,) = listed("--layer", "org", user="arch")
    assert promoted["name"] == applied["promotedItem"]
