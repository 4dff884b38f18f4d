"""One permission model end to end: memory and governance replicas behind the gateway Envoy,
memory reading role bindings from governance through Envoy with its service token, and the
token roles of development tokens NOT trusted (as in production): every role here comes from
a binding, the first one written by ``aeterna-governance bootstrap``. Driven by the ``aeterna``
CLI as a user would type it, with gRPC only where the CLI has no command (UpdateMemory).

The authorization cache runs with a 1 s TTL and a 1 s stale grace, so that what the TTL bounds
is observed by waiting past it (a state change, never a measured duration). Governance
events reach memory through the outbox relay once it publishes them; until then the TTL is
the bound, which is what these tests rely on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

TENANT = "perm2"
TTL_S = 1.0
GRACE_S = 1.0
PAST_TTL_S = TTL_S + 0.5
"""Long enough for every replica's cached snapshot to be older than the TTL."""
BOOTSTRAP = ("--tenant", TENANT, "--admin", "users/root")


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-authz-",
        replicas=1,
        governance_replicas=2,
        env={
            "AETERNA_AUTH_TRUST_TOKEN_ROLES": "false",
            "AETERNA_AUTHZ_CACHE_TTL_S": str(TTL_S),
            "AETERNA_AUTHZ_STALE_GRACE_S": str(GRACE_S),
        },
    ) as s:
        # The tenant's first TENANT_ADMIN, as an operator writes it (the owner role).
        gov_env = s.governance_list[0].env
        done = subprocess.run(
            [sys.executable, "-m", "aeterna_governance", "bootstrap", *BOOTSTRAP],
            env=gov_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0 and "bound now" in done.stdout, done.stdout + done.stderr
        yield s


def cli(stack: DevStack, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``aeterna ... --tenant perm2 [--user U]`` with the CLI's own development tokens."""
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    env.pop("AETERNA_TOKEN", None)
    who = ("--user", user) if user else ()
    return subprocess.run(
        [sys.executable, "-m", "aeterna_cli.main", *args, "--tenant", TENANT, *who],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def refused(done: subprocess.CompletedProcess[str], reason: str = "ACTION_NOT_ALLOWED") -> None:
    assert done.returncode == 1 and reason in done.stdout, done.stdout + done.stderr


def add(stack: DevStack, user: str, content: str, *scope: str) -> subprocess.CompletedProcess[str]:
    return cli(stack, "memory", "add", content, *scope, "--json", user=user)


def name_of(done: subprocess.CompletedProcess[str]) -> str:
    return str(json.loads(ok(done))[0]["name"])


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.reason
    return ""


async def update(stack: DevStack, user: str, name: str, content: str) -> res.Memory:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        reply: res.Memory = await svc_grpc.MemoryServiceStub(ch).UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=res.Memory(name=name, content=content),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        return reply


def test_the_tree_is_built_by_the_bootstrapped_admin(stack: DevStack) -> None:
    # root's rights come from its binding: its CLI token carries no roles.
    ok(cli(stack, "org", "create", "acme", "--kind", "company", user="root"))
    ok(
        cli(
            stack, "org", "create", "eng", "--kind", "organization", "--parent", "acme", user="root"
        )
    )
    ok(cli(stack, "org", "create", "payments", "--kind", "team", "--parent", "eng", user="root"))
    ok(
        cli(
            stack,
            "org",
            "create",
            "checkout",
            "--kind",
            "project",
            "--parent",
            "payments",
            user="root",
        )
    )
    # Nobody else may: a token role claiming TENANT_ADMIN is not trusted here.
    claimed = DevAuth(stack.root / "auth").issue_token(TENANT, "mallory", roles=("TENANT_ADMIN",))
    refused(
        cli(
            stack,
            "org",
            "create",
            "ops",
            "--kind",
            "organization",
            "--parent",
            "acme",
            "--token",
            claimed,
        )
    )


async def test_bob_cannot_reach_alices_user_memories(stack: DevStack) -> None:
    name = name_of(add(stack, "alice", "alice parks on level 3"))
    refused(add(stack, "bob", "x", "--user-id", "alice"))
    refused(cli(stack, "memory", "get", name, user="bob"))
    refused(cli(stack, "memory", "delete", name, user="bob"))
    refused(
        cli(stack, "memory", "search", "where does alice park", "--user-id", "alice", user="bob")
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await update(stack, "bob", name, "alice parks on level 9")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err.value) == "ACTION_NOT_ALLOWED"
    # bob's open search is narrowed to what he may read; alice still has hers, unchanged.
    found = ok(cli(stack, "memory", "search", "where does alice park", "--json", user="bob"))
    assert [json.loads(line) for line in found.splitlines() if line.strip()] == []
    assert "level 3" in ok(cli(stack, "memory", "get", name, "--json", user="alice"))
    # The issue's report: the CLI's default user `cli` writing into alice's memories.
    refused(cli(stack, "memory", "add", "x", "--user-id", "alice"))


def test_a_developer_writes_its_project_not_its_team_until_revoked(stack: DevStack) -> None:
    project = ("--layer", "project", "--project-id", "checkout")
    team = ("--layer", "team", "--team-id", "payments")
    refused(add(stack, "dev", "checkout uses the v2 payment API", *project))
    granted = json.loads(
        ok(
            cli(
                stack,
                "role",
                "grant",
                "dev",
                "DEVELOPER",
                "--unit",
                "checkout",
                "--json",
                user="root",
            )
        )
    )
    time.sleep(PAST_TTL_S)  # memory's cached bindings (without the grant) have expired
    ok(add(stack, "dev", "checkout uses the v2 payment API", *project))
    refused(add(stack, "dev", "payments deploys on Tuesdays", *team))
    # A viewer of the project is refused the write too; the team's lead may write the team.
    ok(cli(stack, "role", "grant", "lead", "TECH_LEAD", "--unit", "payments", user="root"))
    ok(cli(stack, "role", "revoke", granted["name"].rsplit("/", 1)[1], user="root"))
    time.sleep(PAST_TTL_S)
    refused(add(stack, "dev", "checkout again", *project))
    ok(add(stack, "lead", "payments deploys on Tuesdays", *team))
    ok(add(stack, "lead", "checkout is owned by payments", *project))


async def test_a_bound_tenant_admin_may_do_everything(stack: DevStack) -> None:
    name = name_of(add(stack, "alice", "alice's badge is 4411"))
    assert "4411" in ok(cli(stack, "memory", "get", name, "--json", user="root"))
    found = ok(cli(stack, "memory", "search", "badge", "--user-id", "alice", "--json", user="root"))
    assert name in found
    updated = await update(stack, "root", name, "alice's badge is 4412")
    assert updated.content == "alice's badge is 4412"
    ok(add(stack, "root", "written for alice", "--user-id", "alice"))
    ok(add(stack, "root", "eng uses trunk-based development", "--layer", "org", "--org-id", "eng"))
    ok(cli(stack, "memory", "delete", name, user="root"))


def test_with_governance_down_memory_never_opens(stack: DevStack) -> None:
    project = ("--layer", "project", "--project-id", "checkout")
    ok(cli(stack, "role", "grant", "dev2", "DEVELOPER", "--unit", "checkout", user="root"))
    time.sleep(PAST_TTL_S)
    ok(add(stack, "dev2", "cached while governance is up", *project))  # caches the bindings
    for replica in stack.governance_list:
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGTERM)
        replica.proc.wait(30)
    # Own-user access needs no bindings and keeps working.
    mine = name_of(add(stack, "alice", "alice works from home on Fridays"))
    assert "Fridays" in ok(cli(stack, "memory", "get", mine, "--json", user="alice"))
    # Past TTL + grace a decision that needs bindings is UNAVAILABLE, never allowed; bob is
    # refused either way.
    time.sleep(TTL_S + GRACE_S + 0.5)
    refused(add(stack, "dev2", "after the grace", *project), "AUTHORIZATION_DIRECTORY_UNAVAILABLE")
    done = add(stack, "bob", "x", "--user-id", "alice")
    assert done.returncode == 1 and (
        "ACTION_NOT_ALLOWED" in done.stdout or "AUTHORIZATION_DIRECTORY_UNAVAILABLE" in done.stdout
    ), done.stdout
