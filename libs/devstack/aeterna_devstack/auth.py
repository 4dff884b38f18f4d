"""Development JWTs: a local RS256 key pair, its JWKS, and a token issuer.

The key pair is created once in a state directory (``$AETERNA_AUTH_DIR``, else ``.var/auth``
under the repository root) and reused afterwards, so tokens stay valid across ``make run``
restarts. Envoy's ``jwt_authn`` filter and every service (``aeterna_common.auth``) verify the
tokens against ``jwks.json``; the services take the caller from the claims ``tenant``,
``sub``, ``agent`` and ``roles``. :meth:`DevAuth.server_env` configures a service to trust the
key, :meth:`DevAuth.service_env` gives it a development service token.

Example::

    auth = DevAuth()
    token = auth.issue_token("acme", "alice", agent="planner", roles=("reader", "writer"))
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DEFAULT_ISSUER = "aeterna-dev"
"""``iss`` of development tokens; Envoy's provider must expect the same value."""

DEFAULT_AUDIENCE = "aeterna"
"""``aud`` of development tokens; Envoy's provider must list it in ``audiences``."""

DEFAULT_TTL_S = 3600
"""Token lifetime in seconds when the caller gives none."""

SERVICE_TOKEN_TTL_S = 7 * 24 * 3600
"""Lifetime of development service tokens in seconds: a week, so a long ``make run`` keeps
working (the stack writes a fresh one at every start; in Kubernetes the kubelet rotates)."""

SERVICE_ROLE = "SERVICE"
"""Role of development service principals (``aeterna_common.auth.SERVICE_ROLE``)."""

ALGORITHM = "RS256"
PRIVATE_KEY_FILE = "private_key.pem"
JWKS_FILE = "jwks.json"

# 2048-bit RSA with e=65537: the minimum NIST SP 800-57 Part 1 rev. 5 accepts through 2030.
_KEY_BITS = 2048
_PUBLIC_EXPONENT = 65537


def repo_root() -> Path:
    """Return the repository root: the nearest ancestor of this file holding ``Makefile``
    and ``protos/`` (each package has its own ``pyproject.toml``, so that is no marker).

    Falls back to the current directory when the package is installed outside a checkout.
    """
    for parent in Path(__file__).resolve().parents:
        if (parent / "Makefile").is_file() and (parent / "protos").is_dir():
            return parent
    return Path.cwd()


def default_state_dir() -> Path:
    """Return ``$AETERNA_AUTH_DIR``, else ``$AETERNA_STATE_DIR/auth``, else
    ``<repo root>/.var/auth`` (where ``make run`` keeps the key its Envoy trusts)."""
    if env := os.environ.get("AETERNA_AUTH_DIR"):
        return Path(env)
    if env := os.environ.get("AETERNA_STATE_DIR"):
        return Path(env) / "auth"
    return repo_root() / ".var" / "auth"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of an RSA JWK, used as its ``kid``.

    Args:
        jwk: A JWK with at least ``kty``, ``n`` and ``e``.

    Returns:
        The base64url-encoded thumbprint (43 characters).

    """
    # RFC 7638 section 3.2: required members only, lexicographic order, no whitespace.
    canonical = json.dumps(
        {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DevAuth:
    """A development token issuer backed by a key pair in a state directory.

    Attributes:
        state_dir: Directory holding ``private_key.pem`` (mode 0600) and ``jwks.json``.
        kid: Key id of the signing key (its RFC 7638 thumbprint), also in the JWKS.

    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        """Load the key pair from ``state_dir``, creating it (and the JWKS) on first use.

        Safe against concurrent first use: the private key is published with an exclusive
        hard link, so every process ends up with the same key.

        Args:
            state_dir: Where the keys live; None means :func:`default_state_dir`.

        Raises:
            OSError: The directory cannot be created or written.

        """
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._private_key = self._load_or_create_key()
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        self.kid = jwk_thumbprint(jwk)
        jwk.update({"kid": self.kid, "alg": ALGORITHM, "use": "sig"})
        self._jwks: dict[str, Any] = {"keys": [jwk]}
        text = json.dumps(self._jwks, indent=2, sort_keys=True) + "\n"
        if not self.jwks_path.is_file() or self.jwks_path.read_text() != text:
            _write_atomic(self.jwks_path, text.encode(), 0o644)

    @property
    def private_key_path(self) -> Path:
        """Path of the PEM (PKCS#8, unencrypted) private key."""
        return self.state_dir / PRIVATE_KEY_FILE

    @property
    def jwks_path(self) -> Path:
        """Path of the JWKS file holding the public key."""
        return self.state_dir / JWKS_FILE

    def jwks(self) -> dict[str, Any]:
        """Return the JWKS (``{"keys": [jwk]}``) as a dict."""
        return copy.deepcopy(self._jwks)

    def jwks_json(self) -> str:
        """Return the JWKS as a compact JSON string, e.g. for Envoy's ``inline_string``."""
        return json.dumps(self._jwks, separators=(",", ":"), sort_keys=True)

    def _load_or_create_key(self) -> rsa.RSAPrivateKey:
        path = self.private_key_path
        if not path.exists():
            key = rsa.generate_private_key(public_exponent=_PUBLIC_EXPONENT, key_size=_KEY_BITS)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".key.")
            try:
                with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
                    f.write(pem)
                # link() fails if another process published its key first; then use that one.
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise TypeError(f"{path} does not hold an RSA private key")
        return loaded

    def issue_token(
        self,
        tenant: str | None,
        user: str,
        agent: str | None = None,
        roles: Iterable[str] = (),
        ttl_s: float | None = DEFAULT_TTL_S,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        *,
        issued_at: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign an RS256 token for a tenant's user (and optionally an agent acting for them).

        Args:
            tenant: Tenant id, claim ``tenant``; None omits it (a service principal).
            user: User id, claim ``sub``.
            agent: Agent id, claim ``agent``; omitted when None.
            roles: Role names, joined with commas into the string claim ``roles``; omitted
                when empty.
            ttl_s: Lifetime in seconds; negative values make an already expired token, None
                omits ``exp`` (a token every verifier must refuse).
            issuer: Claim ``iss``.
            audience: Claim ``aud``.
            issued_at: ``iat`` as Unix time in seconds; None means now.
            extra_claims: More claims, added last (they may override the ones above).

        Returns:
            The compact JWS string, with ``kid`` in its header.

        """
        iat = int(time.time() if issued_at is None else issued_at)
        claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": user, "iat": iat}
        if tenant is not None:
            claims["tenant"] = tenant
        if ttl_s is not None:
            claims["exp"] = iat + int(ttl_s)
        if agent is not None:
            claims["agent"] = agent
        role_list = list(roles)
        if any("," in role for role in role_list):
            raise ValueError(f"role names must not contain commas: {role_list}")
        if role_list:
            claims["roles"] = ",".join(role_list)
        claims.update(extra_claims or {})
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def issue_service_token(self, service: str, ttl_s: float = SERVICE_TOKEN_TTL_S) -> str:
        """Sign a service principal's token: ``sub`` ``service:<service>``, role
        :data:`SERVICE_ROLE`, no tenant.

        Args:
            service: Short service name, e.g. ``memory``.
            ttl_s: Lifetime in seconds.

        Returns:
            The compact JWS string.
        """
        return self.issue_token(None, f"service:{service}", roles=(SERVICE_ROLE,), ttl_s=ttl_s)

    def service_token_path(self, service: str) -> Path:
        """Path of the development token file of ``service``."""
        return self.state_dir / f"service-{service}.token"

    def write_service_token(self, service: str, ttl_s: float = SERVICE_TOKEN_TTL_S) -> Path:
        """Write a fresh service token for ``service`` (mode 0600, replaced atomically, as the
        kubelet rotates a projected token).

        Args:
            service: Short service name, e.g. ``memory``.
            ttl_s: Lifetime in seconds.

        Returns:
            The token file's path.
        """
        path = self.service_token_path(service)
        _write_atomic(path, self.issue_service_token(service, ttl_s).encode(), 0o600)
        return path

    def server_env(self) -> dict[str, str]:
        """Environment that makes a service trust this key (``AETERNA_AUTH_*``)."""
        return {
            "AETERNA_AUTH_JWKS_FILE": str(self.jwks_path),
            "AETERNA_AUTH_ISSUER": DEFAULT_ISSUER,
            "AETERNA_AUTH_AUDIENCE": DEFAULT_AUDIENCE,
        }

    def service_env(self, service: str) -> dict[str, str]:
        """Environment giving ``service`` a fresh development service token
        (``AETERNA_SERVICE_TOKEN_FILE``)."""
        return {"AETERNA_SERVICE_TOKEN_FILE": str(self.write_service_token(service))}


def issue_token(
    tenant: str,
    user: str,
    agent: str | None = None,
    roles: Iterable[str] = (),
    ttl_s: float = DEFAULT_TTL_S,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    *,
    state_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Sign a development token with the key in ``state_dir`` (see :meth:`DevAuth.issue_token`).

    Args:
        tenant: Tenant id, claim ``tenant``.
        user: User id, claim ``sub``.
        agent: Agent id, claim ``agent``; omitted when None.
        roles: Role names, sent as one comma-separated string claim ``roles``.
        ttl_s: Lifetime in seconds.
        issuer: Claim ``iss``.
        audience: Claim ``aud``.
        state_dir: Key directory; None means :func:`default_state_dir`.

    Returns:
        The compact JWS string.

    """
    return DevAuth(state_dir).issue_token(
        tenant, user, agent=agent, roles=roles, ttl_s=ttl_s, issuer=issuer, audience=audience
    )
