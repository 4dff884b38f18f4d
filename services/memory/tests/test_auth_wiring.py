"""How the memory service is wired to token verification and its service credentials."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import jwt
from aeterna_common.auth import JwksFile, TokenVerifier
from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER
from aeterna_devstack.pytest_plugin import session_auth
from memory_testkit import MemoryEnv


async def test_the_app_holds_service_credentials_that_follow_the_token_file(
    env: MemoryEnv,
) -> None:
    creds = env.app.credentials
    assert creds is not None
    verifier = TokenVerifier(
        JwksFile(session_auth().jwks_path), issuer=DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE
    )
    first = await creds.token()
    principal = await verifier.verify(first)
    assert (principal.user_id, principal.roles, principal.is_service) == (
        "service:memory",
        frozenset({"SERVICE"}),
        True,
    )
    await asyncio.sleep(0.01)
    session_auth().write_service_token("memory", ttl_s=600)  # rotated, as the kubelet does
    second = await creds.token()
    assert second != first
    claims = jwt.decode(second, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    assert await creds.metadata() == (("authorization", f"Bearer {second}"),)


def test_a_replica_without_token_verification_stops_at_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETERNA_AUTH_")}
    env["AETERNA_LISTEN"] = "127.0.0.1:0"
    done = subprocess.run(
        [sys.executable, "-m", "aeterna_memory"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "AETERNA_AUTH_JWKS_FILE or AETERNA_AUTH_JWKS_URL" in done.stderr
    assert "Traceback" not in done.stderr
