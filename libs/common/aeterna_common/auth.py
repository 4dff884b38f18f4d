"""Bearer-token verification (every call) and this service's own credentials (background work).

Every service verifies the caller's JWT itself, whatever sits in front of it: the principal
comes only from verified claims (:func:`aeterna_common.context.principal_from_claims`).

* :class:`TokenVerifier` checks the signature against a JWKS (:class:`JwksFile` or
  :class:`JwksUrl`), an algorithm allowlist (:data:`ALGORITHMS`), and the required ``iss``,
  ``aud`` and ``exp`` claims with a clock skew of at most 60 s. Failures raise
  :class:`~aeterna_common.errors.Unauthenticated` with a stable ``ErrorInfo.reason``
  (``TOKEN_MISSING``, ``TOKEN_MALFORMED``, ``TOKEN_ALGORITHM_NOT_ALLOWED``,
  ``TOKEN_KEY_UNKNOWN``, ``TOKEN_INVALID``, ``TOKEN_EXPIRED``, ``TOKEN_NOT_YET_VALID``,
  ``TOKEN_ISSUER_MISMATCH``, ``TOKEN_AUDIENCE_MISMATCH``, ``TOKEN_CLAIM_MISSING``,
  ``TOKEN_CLAIM_INVALID``); a JWKS that cannot be read at all is
  :class:`~aeterna_common.errors.Unavailable` (``JWKS_UNAVAILABLE``). Messages never hold
  the token.
* Key sets are cached. A file is re-read when it changes; a URL is refetched when its cache
  expires. A token whose ``kid`` is unknown forces one reload, at most once per cooldown
  (key rotation without letting random ``kid`` values hammer the source). Reads and fetches
  run in a worker thread, never on the event loop.
* :class:`ServiceCredentials` reads this service's own token from a file (in Kubernetes a
  projected ServiceAccount token that the kubelet rotates) and gives call metadata.
"""

from __future__ import annotations

import abc
import asyncio
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
import structlog

from aeterna_common.config import MAX_CLOCK_SKEW_S, CommonSettings
from aeterna_common.context import Principal, principal_from_claims
from aeterna_common.errors import Unauthenticated, Unavailable
from aeterna_common.telemetry import JWKS_FETCH_FAILURES

log = structlog.get_logger("aeterna.auth")

ALGORITHMS = ("RS256", "ES256")
"""Signature algorithms accepted: asymmetric only. ``none`` and every HS* are refused, so a
token "signed" with a public key as an HMAC secret cannot pass."""

MAX_TOKEN_CHARS = 8192
"""Longest token read; gRPC's default metadata limit is 8 KiB anyway."""

JWKS_URL_LIFESPAN_S = 300.0
"""Seconds a fetched JWKS is used before it is refetched (PyJWKClient's default)."""

JWKS_FETCH_TIMEOUT_S = 5.0
"""HTTP timeout of one JWKS fetch, in seconds."""

JWKS_REFRESH_COOLDOWN_S = 30.0
"""Least seconds between two reloads forced by an unknown ``kid`` (PyJWKClient's default)."""

SERVICE_ROLE = "SERVICE"
"""Role of service principals (background work), e.g. in development service tokens."""

_REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")


class AuthConfigError(ValueError):
    """Token verification or service credentials are misconfigured (stops a service at start)."""


def _pick(keys: Mapping[str, jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    # A token without ``kid`` is accepted only when the set leaves no choice.
    return next(iter(keys.values())) if len(keys) == 1 else None


class KeySource(Protocol):
    """Where a :class:`TokenVerifier` finds signing keys."""

    async def signing_key(self, kid: str | None) -> jwt.PyJWK:
        """The public key named ``kid`` (None: the only key of the set).

        Raises:
            Unauthenticated: no such key, even after a reload (``TOKEN_KEY_UNKNOWN``).
            Unavailable: the key set was never readable (``JWKS_UNAVAILABLE``).
        """
        ...


class _CachedJwks(abc.ABC):
    """Shared caching logic; subclasses say when the copy is stale and how to load it."""

    def __init__(self, algorithms: Sequence[str], refresh_cooldown_s: float) -> None:
        self.algorithms = tuple(algorithms)
        self.refresh_cooldown_s = refresh_cooldown_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_forced = -math.inf
        self._forced: asyncio.Future[None] | None = None

    @abc.abstractmethod
    def _stale(self) -> bool:
        """Whether the cached copy must be read again before use."""

    @abc.abstractmethod
    def _load(self, force: bool) -> jwt.PyJWKSet:
        """Read the key set (blocking; runs in a worker thread)."""

    def _use(self, jwks: jwt.PyJWKSet) -> None:
        self._keys = {
            key.key_id or "": key
            for key in jwks.keys
            if key.algorithm_name in self.algorithms and key.public_key_use in ("sig", None)
        }

    def load(self, force: bool = False) -> None:
        """Load the key set now, blocking (at start, before serving).

        Raises:
            AuthConfigError: it cannot be read or holds no usable key.
        """
        try:
            self._use(self._load(force))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            JWKS_FETCH_FAILURES.inc()
            raise AuthConfigError(f"cannot load the JWKS from {self}: {exc}") from exc
        if not self._keys:
            raise AuthConfigError(f"the JWKS from {self} holds no {'/'.join(self.algorithms)} key")

    async def _refresh(self, force: bool) -> None:
        try:
            jwks = await asyncio.to_thread(self._load, force)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            JWKS_FETCH_FAILURES.inc()
            if not self._keys:
                raise Unavailable(
                    "the token verification keys are unavailable", reason="JWKS_UNAVAILABLE"
                ) from exc
            # Keep verifying with the keys we have; the source may be briefly unreachable.
            log.warning("auth.jwks_reload_failed", source=str(self), error=str(exc))
            return
        self._use(jwks)

    async def signing_key(self, kid: str | None) -> jwt.PyJWK:
        """See :meth:`KeySource.signing_key`."""
        if self._stale():
            await self._refresh(force=False)
        key = _pick(self._keys, kid)
        if key is None:
            # Calls that arrive while a forced reload runs wait for it: the first tokens
            # signed with a rotated key come in bursts.
            if self._forced is None or self._forced.done():
                if time.monotonic() - self._last_forced < self.refresh_cooldown_s:
                    raise Unauthenticated(
                        "the token's signing key is unknown", reason="TOKEN_KEY_UNKNOWN"
                    )
                self._last_forced = time.monotonic()
                self._forced = asyncio.ensure_future(self._refresh(force=True))
            await asyncio.shield(self._forced)
            key = _pick(self._keys, kid)
        if key is None:
            raise Unauthenticated("the token's signing key is unknown", reason="TOKEN_KEY_UNKNOWN")
        return key


class JwksFile(_CachedJwks):
    """A JWKS in a local file, re-read when it changes (modification time, inode or size)
    and when a token names an unknown key (at most once per ``refresh_cooldown_s``).

    Args:
        path: The JWKS file (``{"keys": [...]}``).
        algorithms: Algorithms whose keys are used.
        refresh_cooldown_s: Least seconds between reloads forced by an unknown ``kid``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        algorithms: Sequence[str] = ALGORITHMS,
        refresh_cooldown_s: float = JWKS_REFRESH_COOLDOWN_S,
    ) -> None:
        super().__init__(algorithms, refresh_cooldown_s)
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return str(self.path)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        # Kubernetes swaps a mounted file by symlink: a new inode, maybe the same mtime.
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _stale(self) -> bool:
        return self._current_stamp() != self._stamp

    def _load(self, force: bool) -> jwt.PyJWKSet:
        with self._lock:
            # Recorded before reading: a change during the read is seen by the next call.
            # Recorded even if the read fails, so a broken file is not re-read on every call.
            self._stamp = self._current_stamp()
            return jwt.PyJWKSet.from_dict(json.loads(self.path.read_text()))


class JwksUrl(_CachedJwks):
    """A JWKS served over HTTP(S) by the identity provider, through ``jwt.PyJWKClient``.

    The set is cached for ``lifespan_s``; a token naming an unknown key forces a refetch
    (key rotation), at most once per ``refresh_cooldown_s``. After a failed fetch the cached
    keys stay in use and the next attempt waits ``refresh_cooldown_s``.

    Args:
        url: The JWKS URL (``http`` or ``https``; redirects are not followed).
        algorithms: Algorithms whose keys are used.
        lifespan_s: Seconds a fetched set is used.
        timeout_s: HTTP timeout of one fetch, in seconds.
        refresh_cooldown_s: Least seconds between forced refetches.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Sequence[str] = ALGORITHMS,
        lifespan_s: float = JWKS_URL_LIFESPAN_S,
        timeout_s: float = JWKS_FETCH_TIMEOUT_S,
        refresh_cooldown_s: float = JWKS_REFRESH_COOLDOWN_S,
    ) -> None:
        super().__init__(algorithms, refresh_cooldown_s)
        self.url = url
        self.lifespan_s = lifespan_s
        try:
            # Its own cooldown stays off: this class rate-limits forced refetches itself.
            self._client = jwt.PyJWKClient(
                url, lifespan=lifespan_s, timeout=timeout_s, cooldown_duration=0
            )
        except jwt.PyJWKClientError as exc:
            raise AuthConfigError(str(exc)) from exc
        self._next_check = -math.inf

    def __str__(self) -> str:
        return self.url

    def _stale(self) -> bool:
        return time.monotonic() >= self._next_check

    def _load(self, force: bool) -> jwt.PyJWKSet:
        try:
            jwks = self._client.get_jwk_set(refresh=force)
        except Exception:
            self._next_check = time.monotonic() + self.refresh_cooldown_s
            raise
        self._next_check = time.monotonic() + self.lifespan_s
        return jwks


class TokenVerifier:
    """Verifies bearer JWTs and turns their claims into a :class:`Principal`.

    Args:
        keys: Where signing keys come from.
        issuer: Required ``iss``.
        audience: Required ``aud`` (one of the token's audiences).
        clock_skew_s: Tolerance for ``exp``, ``nbf`` and ``iat`` in seconds, 0 to 60.
        algorithms: Accepted algorithms, a subset of :data:`ALGORITHMS`.

    Raises:
        AuthConfigError: empty issuer or audience, skew outside 0-60 s, or an algorithm
            outside :data:`ALGORITHMS`.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        clock_skew_s: int = MAX_CLOCK_SKEW_S,
        algorithms: Sequence[str] = ALGORITHMS,
    ) -> None:
        if not issuer:
            raise AuthConfigError("AETERNA_AUTH_ISSUER is required to serve")
        if not audience:
            raise AuthConfigError("AETERNA_AUTH_AUDIENCE is required to serve")
        if not 0 <= clock_skew_s <= MAX_CLOCK_SKEW_S:
            raise AuthConfigError(f"clock skew must be 0-{MAX_CLOCK_SKEW_S} s, not {clock_skew_s}")
        refused = sorted(set(algorithms) - set(ALGORITHMS))
        if refused or not algorithms:
            raise AuthConfigError(f"algorithms must be a subset of {ALGORITHMS}, got {refused}")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.clock_skew_s = clock_skew_s
        self.algorithms = tuple(algorithms)

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> TokenVerifier:
        """Build the verifier a service serves with; a JWKS file is read now.

        Args:
            settings: ``auth_jwks_file`` or ``auth_jwks_url`` (exactly one), ``auth_issuer``,
                ``auth_audience``, ``auth_clock_skew_s``.

        Returns:
            The verifier.

        Raises:
            AuthConfigError: a setting is missing, or the JWKS file is unreadable or holds no
                usable key (the message names the variable).
        """
        keys: KeySource
        if settings.auth_jwks_file is not None:
            source = JwksFile(settings.auth_jwks_file)
            try:
                source.load()
            except AuthConfigError as exc:
                raise AuthConfigError(f"AETERNA_AUTH_JWKS_FILE: {exc}") from exc
            keys = source
        elif settings.auth_jwks_url:
            keys = JwksUrl(settings.auth_jwks_url)
        else:
            raise AuthConfigError(
                "no token verification keys: set AETERNA_AUTH_JWKS_FILE or AETERNA_AUTH_JWKS_URL"
            )
        return cls(
            keys,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            clock_skew_s=settings.auth_clock_skew_s,
        )

    async def verify(self, token: str) -> Principal:
        """Verify a compact JWS and return its principal.

        Args:
            token: The token, without the ``Bearer`` prefix.

        Returns:
            The principal from the verified claims.

        Raises:
            Unauthenticated: the token is not acceptable (reasons in the module docstring).
            Unavailable: no signing keys could be loaded (``JWKS_UNAVAILABLE``).
        """
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the bearer token is malformed", reason="TOKEN_MALFORMED")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(
                "the bearer token is malformed", reason="TOKEN_MALFORMED"
            ) from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise Unauthenticated(
                f"token algorithm not allowed; accepted: {', '.join(self.algorithms)}",
                reason="TOKEN_ALGORITHM_NOT_ALLOWED",
            )
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("the bearer token is malformed", reason="TOKEN_MALFORMED")
        key = await self.keys.signing_key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.clock_skew_s,
                options={"require": list(_REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise _unauthenticated(exc) from None
        return principal_from_claims(claims)

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """Verify the ``authorization: Bearer <token>`` entry of gRPC invocation metadata.

        Args:
            metadata: ``(key, value)`` pairs, keys lower case as gRPC delivers them.

        Returns:
            The verified principal.

        Raises:
            Unauthenticated: no bearer token (``TOKEN_MISSING``), or as :meth:`verify`.
            Unavailable: as :meth:`verify`.
        """
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        if len(values) > 1:
            raise Unauthenticated("send one authorization entry", reason="TOKEN_MALFORMED")
        value = values[0]
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_MISSING")
        return await self.verify(token.strip())


def _unauthenticated(exc: jwt.PyJWTError) -> Unauthenticated:
    # Fixed messages: PyJWT's texts are fine today, but nothing of the token may leak.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthenticated("the token is not valid yet", reason="TOKEN_NOT_YET_VALID")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthenticated(
            f"the token lacks the {exc.claim!r} claim",
            reason="TOKEN_CLAIM_MISSING",
            metadata={"claim": exc.claim},
        )
    if isinstance(exc, jwt.InvalidIssuerError):
        return Unauthenticated("the token's issuer is not trusted", reason="TOKEN_ISSUER_MISMATCH")
    if isinstance(exc, jwt.InvalidAudienceError):
        return Unauthenticated(
            "the token is meant for another audience", reason="TOKEN_AUDIENCE_MISMATCH"
        )
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return Unauthenticated(
            "the token's algorithm does not match its key", reason="TOKEN_ALGORITHM_NOT_ALLOWED"
        )
    if isinstance(exc, jwt.InvalidSignatureError):
        return Unauthenticated("the token's signature is invalid", reason="TOKEN_INVALID")
    if isinstance(exc, jwt.DecodeError):
        return Unauthenticated("the bearer token is malformed", reason="TOKEN_MALFORMED")
    return Unauthenticated("the token is invalid", reason="TOKEN_INVALID")


class ServiceCredentials:
    """A service's own token, for the calls its background work makes to other services.

    In Kubernetes the file is a projected ServiceAccount token whose audience is the Aeterna
    audience; the kubelet rotates it, so it is re-read whenever it changes. Locally,
    ``aeterna_devstack`` writes a development service token (``sub`` ``service:<name>``,
    role :data:`SERVICE_ROLE`).

    Args:
        path: The token file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> ServiceCredentials | None:
        """The credentials of ``AETERNA_SERVICE_TOKEN_FILE``, read once now to fail early.

        Returns:
            The credentials, or None when the setting is empty.

        Raises:
            AuthConfigError: the file is unreadable or empty.
        """
        if settings.service_token_file is None:
            return None
        creds = cls(settings.service_token_file)
        creds._reload()
        return creds

    def _reload(self) -> str:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp == self._stamp:
                return self._token
            token = self.path.read_text().strip()
        except OSError as exc:
            raise AuthConfigError(
                f"AETERNA_SERVICE_TOKEN_FILE: cannot read {self.path}: {exc.strerror}"
            ) from exc
        if not token:
            raise AuthConfigError(f"AETERNA_SERVICE_TOKEN_FILE: {self.path} is empty")
        self._token, self._stamp = token, stamp
        return token

    async def token(self) -> str:
        """The current token, re-read (in a worker thread) if the file changed.

        Raises:
            AuthConfigError: the file is unreadable or empty.
        """
        return await asyncio.to_thread(self._reload)

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """GRPC call metadata carrying the current token as a bearer token.

        Raises:
            AuthConfigError: the file is unreadable or empty.
        """
        return (("authorization", f"Bearer {await self.token()}"),)
