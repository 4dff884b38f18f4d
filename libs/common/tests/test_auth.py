"""Token verification against real keys, a real JWKS file and a real JWKS HTTP server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from aeterna_common.auth import (
    AuthConfigError,
    JwksFile,
    JwksUrl,
    ServiceCredentials,
    TokenVerifier,
)
from aeterna_common.config import CommonSettings
from aeterna_common.errors import Unauthenticated, Unavailable
from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, DevAuth
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pydantic import ValidationError


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _write_jwks(path: Path, *auths: DevAuth, extra: list[dict[str, Any]] | None = None) -> None:
    keys = [k for a in auths for k in a.jwks()["keys"]] + (extra or [])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": keys}, indent=2, sort_keys=True))
    os.replace(tmp, path)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[DevAuth, DevAuth, Path]:
    """Two key pairs and a JWKS file holding only the first."""
    a, b = DevAuth(tmp_path / "a"), DevAuth(tmp_path / "b")
    path = tmp_path / "jwks.json"
    _write_jwks(path, a)
    return a, b, path


def _verifier(source: Any, skew: int = 60) -> TokenVerifier:
    return TokenVerifier(
        source, issuer=DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE, clock_skew_s=skew
    )


async def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert token not in info.value.message  # messages never echo the token
    return info.value.reason


async def test_valid_token_gives_the_principal(keys: tuple[DevAuth, DevAuth, Path]) -> None:
    a, _, path = keys
    v = _verifier(JwksFile(path))
    p = await v.verify(a.issue_token("acme", "auth0|abc123", agent="planner", roles=["reader"]))
    assert (p.tenant_id, p.user_id, p.agent_id, p.roles) == (
        "acme",
        "auth0|abc123",
        "planner",
        frozenset({"READER"}),
    )
    bearer = (("authorization", f"Bearer {a.issue_token('acme', 'u')}"),)
    assert (await v.authenticate(bearer)).user_id == "u"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("no_exp", "TOKEN_CLAIM_MISSING"),
        ("wrong_aud", "TOKEN_AUDIENCE_MISMATCH"),
        ("wrong_iss", "TOKEN_ISSUER_MISMATCH"),
        ("unknown_kid", "TOKEN_KEY_UNKNOWN"),
        ("bad_signature", "TOKEN_INVALID"),
        ("alg_none", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("hs256_with_public_key", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("not_yet_valid", "TOKEN_NOT_YET_VALID"),
        ("garbage", "TOKEN_MALFORMED"),
    ],
)
async def test_bad_tokens_are_refused(
    keys: tuple[DevAuth, DevAuth, Path], case: str, reason: str
) -> None:
    a, b, path = keys
    good = a.issue_token("acme", "alice")
    header, payload, _ = good.split(".")
    other_payload = a.issue_token("evil", "mallory").split(".")[1]
    public_pem = jwt.PyJWK(a.jwks()["keys"][0]).key.public_bytes(  # anyone can fetch it
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": a.kid, "typ": "JWT"}).encode())
    hs_mac = hmac.new(public_pem, f"{hs_header}.{payload}".encode(), hashlib.sha256).digest()
    none_header = _b64(json.dumps({"alg": "none", "kid": a.kid}).encode())
    tokens = {
        "expired": a.issue_token("acme", "alice", ttl_s=-120),  # beyond the 60 s skew
        "no_exp": a.issue_token("acme", "alice", ttl_s=None),
        "wrong_aud": a.issue_token("acme", "alice", audience="another-api"),
        "wrong_iss": a.issue_token("acme", "alice", issuer="someone-else"),
        "unknown_kid": b.issue_token("acme", "alice"),
        "bad_signature": f"{header}.{other_payload}.{good.split('.')[2]}",
        "alg_none": f"{none_header}.{payload}.",
        "hs256_with_public_key": f"{hs_header}.{payload}.{_b64(hs_mac)}",
        "not_yet_valid": a.issue_token("acme", "alice", issued_at=time.time() + 600),
        "garbage": "not-a-jwt",
    }
    assert await _reason(_verifier(JwksFile(path)), tokens[case]) == reason


async def test_missing_or_non_bearer_authorization(keys: tuple[DevAuth, DevAuth, Path]) -> None:
    v = _verifier(JwksFile(keys[2]))
    for md in ((), (("x-aeterna-tenant", "acme"), ("x-aeterna-user", "mallory"))):
        with pytest.raises(Unauthenticated) as info:
            await v.authenticate(md)
        assert info.value.reason == "TOKEN_MISSING"
    with pytest.raises(Unauthenticated) as info:
        await v.authenticate((("authorization", "Basic dXNlcjpwdw=="),))
    assert info.value.reason == "TOKEN_MISSING"


async def test_clock_skew_is_tolerated_up_to_the_setting(
    keys: tuple[DevAuth, DevAuth, Path],
) -> None:
    a, _, path = keys
    just_expired = a.issue_token("acme", "alice", ttl_s=-30)
    assert (await _verifier(JwksFile(path), skew=60).verify(just_expired)).user_id == "alice"
    assert await _reason(_verifier(JwksFile(path), skew=0), just_expired) == "TOKEN_EXPIRED"


def test_skew_above_60_s_is_rejected(keys: tuple[DevAuth, DevAuth, Path]) -> None:
    with pytest.raises(ValidationError, match="auth_clock_skew_s"):
        CommonSettings(auth_clock_skew_s=61)
    with pytest.raises(AuthConfigError, match="clock skew"):
        _verifier(JwksFile(keys[2]), skew=61)
    with pytest.raises(AuthConfigError, match="subset"):
        TokenVerifier(JwksFile(keys[2]), issuer="i", audience="a", algorithms=("HS256",))


def test_settings_need_exactly_one_jwks_source(keys: tuple[DevAuth, DevAuth, Path]) -> None:
    path = keys[2]
    base = {"auth_issuer": DEFAULT_ISSUER, "auth_audience": DEFAULT_AUDIENCE}
    with pytest.raises(AuthConfigError, match="AETERNA_AUTH_JWKS_FILE or AETERNA_AUTH_JWKS_URL"):
        TokenVerifier.from_settings(CommonSettings(**base))
    with pytest.raises(ValidationError, match="only one"):
        CommonSettings(auth_jwks_file=path, auth_jwks_url="https://idp.example/jwks", **base)
    with pytest.raises(ValidationError, match="http"):
        CommonSettings(auth_jwks_url="file:///etc/passwd", **base)
    with pytest.raises(AuthConfigError, match="AETERNA_AUTH_ISSUER"):
        TokenVerifier.from_settings(CommonSettings(auth_jwks_file=path, auth_audience="a"))
    with pytest.raises(AuthConfigError, match="AETERNA_AUTH_JWKS_FILE"):
        TokenVerifier.from_settings(CommonSettings(auth_jwks_file=path.with_name("nope"), **base))
    assert (
        TokenVerifier.from_settings(CommonSettings(auth_jwks_file=path, **base)).clock_skew_s == 60
    )


async def test_es256_keys_verify(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="ec-1", alg="ES256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    claims = {"iss": DEFAULT_ISSUER, "aud": DEFAULT_AUDIENCE, "sub": "u", "tenant": "t"}
    token = jwt.encode(
        {**claims, "exp": int(time.time()) + 60}, key, algorithm="ES256", headers={"kid": "ec-1"}
    )
    assert (await _verifier(JwksFile(path)).verify(token)).tenant_id == "t"


async def test_rotation_through_a_jwks_file_change(keys: tuple[DevAuth, DevAuth, Path]) -> None:
    a, b, path = keys
    v = _verifier(JwksFile(path, refresh_cooldown_s=3600))
    assert (await v.verify(a.issue_token("acme", "alice"))).user_id == "alice"
    assert await _reason(v, b.issue_token("acme", "bob")) == "TOKEN_KEY_UNKNOWN"
    _write_jwks(path, a, b)  # the new key is published next to the old one
    assert (await v.verify(b.issue_token("acme", "bob"))).user_id == "bob"
    _write_jwks(path, b)  # the old key is retired
    assert await _reason(v, a.issue_token("acme", "alice")) == "TOKEN_KEY_UNKNOWN"


async def test_unknown_kid_rereads_an_unchanged_looking_file_rate_limited(
    tmp_path: Path, keys: tuple[DevAuth, DevAuth, Path]
) -> None:
    a, b, path = keys
    c = DevAuth(tmp_path / "c")

    def rewrite_in_place(auth: DevAuth) -> None:
        # Same inode, same size, same mtime: only an unknown kid can reveal the change.
        st = path.stat()
        text = json.dumps({"keys": auth.jwks()["keys"]}, indent=2, sort_keys=True)
        assert len(text) == st.st_size
        with path.open("r+") as f:
            f.write(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    v = _verifier(JwksFile(path, refresh_cooldown_s=3600))
    assert (await v.verify(a.issue_token("acme", "alice"))).user_id == "alice"
    rewrite_in_place(b)
    assert (await v.verify(b.issue_token("acme", "bob"))).user_id == "bob"  # forced re-read
    rewrite_in_place(c)
    # A second unknown kid within the cooldown does not re-read.
    assert await _reason(v, c.issue_token("acme", "carol")) == "TOKEN_KEY_UNKNOWN"
    fast = _verifier(JwksFile(path, refresh_cooldown_s=0))
    assert (await fast.verify(c.issue_token("acme", "carol"))).user_id == "carol"


class _JwksServer:
    """A real HTTP server in a thread serving a JWKS that tests can change."""

    def __init__(self, jwks: dict[str, Any], delay_s: float = 0.0) -> None:
        self.jwks = jwks
        self.delay_s = delay_s
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                time.sleep(outer.delay_s)
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def jwks_server(keys: tuple[DevAuth, DevAuth, Path]) -> Iterator[_JwksServer]:
    server = _JwksServer(keys[0].jwks())
    yield server
    server.close()


async def test_rotation_through_a_jwks_url(
    keys: tuple[DevAuth, DevAuth, Path], jwks_server: _JwksServer
) -> None:
    a, b, _ = keys
    v = _verifier(JwksUrl(jwks_server.url, refresh_cooldown_s=0))
    assert (await v.verify(a.issue_token("acme", "alice"))).user_id == "alice"
    assert (await v.verify(a.issue_token("acme", "alice"))).user_id == "alice"
    assert jwks_server.fetches == 1  # cached
    jwks_server.jwks = {"keys": a.jwks()["keys"] + b.jwks()["keys"]}
    assert (await v.verify(b.issue_token("acme", "bob"))).user_id == "bob"  # unknown kid: refetch
    assert jwks_server.fetches == 2


async def test_unknown_kids_refetch_a_url_at_most_once_per_cooldown(
    keys: tuple[DevAuth, DevAuth, Path], jwks_server: _JwksServer
) -> None:
    a, b, _ = keys
    v = _verifier(JwksUrl(jwks_server.url, refresh_cooldown_s=3600))
    await v.verify(a.issue_token("acme", "alice"))
    for _ in range(5):
        assert await _reason(v, b.issue_token("acme", "bob")) == "TOKEN_KEY_UNKNOWN"
    assert jwks_server.fetches == 2  # the first load, then one forced refetch


async def test_cached_keys_outlive_an_unreachable_jwks_url(
    keys: tuple[DevAuth, DevAuth, Path], jwks_server: _JwksServer
) -> None:
    a, _, _ = keys
    v = _verifier(JwksUrl(jwks_server.url, lifespan_s=0.05, timeout_s=1, refresh_cooldown_s=0))
    await v.verify(a.issue_token("acme", "alice"))
    jwks_server.close()
    await asyncio.sleep(0.1)  # the cache expired and the provider is gone
    assert (await v.verify(a.issue_token("acme", "alice"))).user_id == "alice"
    never_loaded = _verifier(JwksUrl(jwks_server.url, timeout_s=1))
    with pytest.raises(Unavailable) as info:
        await never_loaded.verify(a.issue_token("acme", "alice"))
    assert info.value.reason == "JWKS_UNAVAILABLE"


async def test_a_slow_jwks_fetch_does_not_block_the_event_loop(
    keys: tuple[DevAuth, DevAuth, Path],
) -> None:
    a = keys[0]
    server = _JwksServer(a.jwks(), delay_s=0.5)
    try:
        v = _verifier(JwksUrl(server.url))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await v.verify(a.issue_token("acme", "alice"))
        task.cancel()
        assert ticks >= 20  # the loop kept running during the 0.5 s fetch
    finally:
        server.close()


async def test_service_credentials_follow_the_rotated_file(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path / "auth")
    path = auth.write_service_token("memory")
    settings = CommonSettings(service_token_file=path)
    creds = ServiceCredentials.from_settings(settings)
    assert creds is not None
    first = await creds.token()
    assert await creds.metadata() == (("authorization", f"Bearer {first}"),)
    v = _verifier(JwksFile(auth.jwks_path))
    principal = await v.verify(first)
    assert principal.user_id == "service:memory" and principal.roles == {"SERVICE"}
    assert principal.is_service
    # The kubelet swaps the file; the next call uses the new token.
    await asyncio.sleep(0.01)
    auth.write_service_token("memory", ttl_s=120)
    second = await creds.token()
    assert second != first
    assert jwt.decode(second, options={"verify_signature": False})["exp"] < time.time() + 200
    assert ServiceCredentials.from_settings(CommonSettings(service_token_file="")) is None
    path.write_text("  \n")
    with pytest.raises(AuthConfigError, match="empty"):
        await creds.token()
    with pytest.raises(AuthConfigError, match="AETERNA_SERVICE_TOKEN_FILE"):
        ServiceCredentials.from_settings(CommonSettings(service_token_file=tmp_path / "none"))


async def test_a_burst_of_rotated_tokens_shares_one_refetch(
    keys: tuple[DevAuth, DevAuth, Path],
) -> None:
    a, b, _ = keys
    server = _JwksServer(a.jwks(), delay_s=0.2)
    try:
        v = _verifier(JwksUrl(server.url, refresh_cooldown_s=3600))
        await v.verify(a.issue_token("acme", "alice"))
        server.jwks = {"keys": a.jwks()["keys"] + b.jwks()["keys"]}
        burst = await asyncio.gather(*(v.verify(b.issue_token("acme", "bob")) for _ in range(10)))
        assert {p.user_id for p in burst} == {"bob"}
        assert server.fetches == 2
    finally:
        server.close()


async def test_a_governance_directory_needs_the_service_token(tmp_path: Path) -> None:
    from aeterna_common.authz import StaticDirectory
    from aeterna_common.authz.governance import GovernanceDirectory, directory_from_settings
    from aeterna_common.server import StartupError

    url = "127.0.0.1:1"
    # No directory address: token roles only.
    assert directory_from_settings(CommonSettings(authz_directory_url="")) is None
    # An explicit directory wins over the address.
    given = StaticDirectory({})
    assert directory_from_settings(CommonSettings(authz_directory_url=url), given) is given
    # An address without the service's own token: refused at start, never an anonymous call.
    with pytest.raises(StartupError, match="AETERNA_SERVICE_TOKEN_FILE"):
        directory_from_settings(CommonSettings(authz_directory_url=url, service_token_file=""))
    token = tmp_path / "token"
    token.write_text("a.b.c")
    found = directory_from_settings(
        CommonSettings(authz_directory_url=url, service_token_file=token)
    )
    assert isinstance(found, GovernanceDirectory)
    await found.close()
