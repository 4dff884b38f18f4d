"""``aeterna policy`` and ``aeterna audit`` against a real governance server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from aeterna.governance.v1 import resources_pb2 as res
from aeterna_devstack.pytest_plugin import session_auth
from aeterna_governance.audit.chain import parse_envelope
from aeterna_governance.audit.log import AuditLog
from audit_testkit import envelope
from governance_testkit import GovernanceEnv, new_tenant
from test_organization import COMPANY, ORG, PROJECT, TEAM, bind, unit


async def cli(
    gov: GovernanceEnv, tenant: str, user: str, *args: str, roles: str = ""
) -> tuple[int, str]:
    token = session_auth().issue_token(tenant, user, roles=[r for r in roles.split(",") if r])
    env = {**os.environ, "AETERNA_ENDPOINT": f"127.0.0.1:{gov.server.port}", "COLUMNS": "200"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aeterna_cli.main",
        *args,
        "--tenant",
        tenant,
        "--token",
        token,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_policy_and_audit_groups(gov: GovernanceEnv, tmp_path: Path) -> None:
    t = new_tenant()
    await unit(gov, t, "acme", COMPANY)
    await unit(gov, t, "eng", ORG, "acme")
    await unit(gov, t, "payments", TEAM, "eng")
    await unit(gov, t, "checkout", PROJECT, "payments")
    await bind(gov, t, "users/dev", res.ROLE_DEVELOPER, "checkout")
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            [
                {
                    "id": "no-moment",
                    "type": "DENY",
                    "target": "DEPENDENCY",
                    "operator": "MUST_USE",
                    "value": "moment",
                    "severity": "BLOCK",
                    "message": "use luxon",
                },
                {
                    "id": "no-print",
                    "type": "DENY",
                    "target": "CODE",
                    "operator": "MUST_MATCH",
                    "value": r"\bprint\(",
                    "severity": "WARN",
                },
            ]
        )
    )
    code, out = await cli(
        gov,
        t,
        "root",
        "policy",
        "create",
        "deps",
        "--org-unit",
        "acme",
        "--rules",
        str(rules),
        "--mandatory",
        roles="TENANT_ADMIN",
    )
    assert code == 0 and f"created tenants/{t}/policies/deps (2 rules)" in out, out
    # A developer may not write policies: the refusal is printed, exit 1.
    code, out = await cli(
        gov, t, "dev", "policy", "create", "mine", "--org-unit", "checkout", "--rules", str(rules)
    )
    assert code == 1 and "PERMISSION_DENIED" in out and "ACTION_NOT_ALLOWED" in out, out
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "type": "DENY",
                    "target": "CODE",
                    "operator": "MUST_MATCH",
                    "value": "(a",
                    "severity": "INFO",
                }
            ]
        )
    )
    code, out = await cli(
        gov,
        t,
        "root",
        "policy",
        "create",
        "bad",
        "--org-unit",
        "acme",
        "--rules",
        str(bad),
        roles="TENANT_ADMIN",
    )
    assert code == 1 and "INVALID_ARGUMENT" in out and "policy.rules[0].value" in out, out

    source = tmp_path / "app.py"
    source.write_text("print('hi')\n")
    code, out = await cli(
        gov,
        t,
        "dev",
        "policy",
        "check",
        "--org-unit",
        "checkout",
        "--file",
        str(source),
        "--dependency",
        "moment@2.29",
        "--json",
    )
    result = json.loads(out)
    assert code == 2 and result["blocked"] is True and result["driftScore"] == 1.0, out
    assert [v["ruleId"] for v in result["violations"]] == ["no-moment", "no-print"]
    code, out = await cli(
        gov, t, "dev", "policy", "check", "--org-unit", "checkout", "--dependency", "luxon"
    )
    assert code == 0 and "ok: drift score 0.00" in out, out
    code, out = await cli(gov, t, "dev", "policy", "list", "--org-unit", "acme", "--json")
    assert code == 0 and [p["name"] for p in json.loads(out)] == [f"tenants/{t}/policies/deps"]

    audit = AuditLog(gov.app.deps.db)
    for n in (1, 2):
        await audit.append(parse_envelope(envelope(t, n)))
    code, out = await cli(gov, t, "root", "audit", "list", "--json", roles="TENANT_ADMIN")
    assert code == 0 and [e["eventId"] for e in json.loads(out)] == ["memory:1", "memory:2"], out
    code, out = await cli(gov, t, "root", "audit", "verify", roles="TENANT_ADMIN")
    assert code == 0 and "valid: 2 entries" in out, out
    code, out = await cli(gov, t, "dev", "audit", "verify")
    assert code == 1 and "PERMISSION_DENIED" in out, out
