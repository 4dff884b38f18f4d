"""Rules of promoting a knowledge item to a higher layer (DOMAIN.md, Knowledge: Promotion to
a higher layer), without gRPC or SQL.

preview → request (PENDING_REVIEW) → approve / reject / retarget (a governance approval at
the target unit decides) → apply. The source must be ACCEPTED and not at COMPANY; the target
layer must be higher; content that contains credentials is refused. FULL apply supersedes
the source; PARTIAL keeps the source at its layer as a residual with a variant role, related
to the promoted item by the kind of that role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from aeterna.knowledge.v1 import resources_pb2 as res

PENDING_REVIEW = res.PROMOTION_STATE_PENDING_REVIEW
APPROVED = res.PROMOTION_STATE_APPROVED
REJECTED = res.PROMOTION_STATE_REJECTED
APPLIED = res.PROMOTION_STATE_APPLIED

RESIDUAL_KIND: dict[int, int] = {
    res.VARIANT_ROLE_SPECIALIZATION: res.RELATION_KIND_SPECIALIZES,
    res.VARIANT_ROLE_APPLICABILITY: res.RELATION_KIND_APPLICABLE_FROM,
    res.VARIANT_ROLE_EXCEPTION: res.RELATION_KIND_EXCEPTION_TO,
    res.VARIANT_ROLE_CLARIFICATION: res.RELATION_KIND_CLARIFIES,
}
"""A PARTIAL promotion's residual role → the relation from the residual to the promoted
item (the residual narrows, bounds, excepts or clarifies what rose)."""

DEFAULT_RESIDUAL_ROLE = res.VARIANT_ROLE_SPECIALIZATION
"""The residual's role when the request leaves it unset: what stays at the lower layer is
the narrower, local form of the promoted decision."""

CREDENTIAL_KEYWORDS = (
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "private_key",
    "token",
    "credential",
    "access_key",
    "client_secret",
)
"""DOMAIN.md's keyword list (password, secret, api_key, private_key, token, credential,
access_key …) with common spellings."""

_KEYWORD_VALUE = re.compile(
    r"(?i)\b[\w.-]*(?:"
    + "|".join(k.replace("_", "[_-]?") for k in CREDENTIAL_KEYWORDS)
    + r")s?[\w.-]*\b[\"']?\s*(?::=|=|:|=>)\s*[\"']?(?P<value>[^\s\"'`,;]{6,})"
)
"""A keyword assigned a value (``password = hunter22``, ``API_KEY: "abc…"``): the keyword
alone in prose ("token validation") is no credential, the assignment of a literal is."""

_PLACEHOLDER = re.compile(
    r"(?i)^(?:<[^>]*>|\$\{?[\w.]+\}?|\{\{.*\}\}|x{3,}|\*{3,}|\.{3,}|changeme)$"
)
"""Values that only name where a secret goes (``<password>``, ``${DB_PASSWORD}``,
``{{ secret }}``, ``xxxx``): not credentials."""

DETECT_SECRETS_PLUGINS = (
    "AWSKeyDetector",
    "ArtifactoryDetector",
    "AzureStorageKeyDetector",
    "BasicAuthDetector",
    "DiscordBotTokenDetector",
    "GitHubTokenDetector",
    "GitLabTokenDetector",
    "JwtTokenDetector",
    "MailchimpDetector",
    "NpmDetector",
    "OpenAIDetector",
    "PrivateKeyDetector",
    "PypiTokenDetector",
    "SendGridDetector",
    "SlackDetector",
    "SquareOAuthDetector",
    "StripeDetector",
    "TelegramBotTokenDetector",
    "TwilioKeyDetector",
)
"""detect-secrets' pattern plugins. The entropy plugins are left out: decision records quote
commit ids and content hashes, which they would report."""


@dataclass(frozen=True, slots=True)
class CredentialFinding:
    """A credential found in content (never the secret itself).

    Attributes:
        line: 1-based line number.
        kind: What was found: a detect-secrets plugin's secret type, or ``Keyword: <word>``.
    """

    line: int
    kind: str


@lru_cache(maxsize=1)
def _plugins() -> tuple[Any, ...]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    wanted = set(DETECT_SECRETS_PLUGINS)
    classes: list[Any] = list(get_mapping_from_secret_type_to_class().values())
    return tuple(cls() for cls in classes if cls.__name__ in wanted)


def find_credentials(text: str) -> list[CredentialFinding]:
    """The credentials in ``text``: detect-secrets' pattern plugins line by line, plus a
    keyword of :data:`CREDENTIAL_KEYWORDS` assigned a literal value.

    Args:
        text: Markdown content (or a title or summary).

    Returns:
        One finding per (line, kind), in line order; empty when there is none.
    """
    found: dict[tuple[int, str], CredentialFinding] = {}
    plugins = _plugins()
    for number, line in enumerate(text.splitlines(), start=1):
        for plugin in plugins:
            for secret in plugin.analyze_line(filename="content.md", line=line, line_number=number):
                found.setdefault((number, secret.type), CredentialFinding(number, str(secret.type)))
        for match in _KEYWORD_VALUE.finditer(line):
            if _PLACEHOLDER.match(match.group("value")):
                continue
            word = match.group(0).split("=")[0].split(":")[0].strip().strip("\"'").lower()
            kind = f"Keyword: {word}"
            found.setdefault((number, kind), CredentialFinding(number, kind))
    return sorted(found.values(), key=lambda f: (f.line, f.kind))


def item_credentials(item: res.KnowledgeItem) -> list[CredentialFinding]:
    """The credentials in an item's title, summary and content (line numbers of the
    content; the title and summary count as line 0)."""
    head = [CredentialFinding(0, f.kind) for f in find_credentials(f"{item.title}\n{item.summary}")]
    return head + find_credentials(item.content)


def layer_name(layer: int) -> str:
    """``TEAM`` for ``KNOWLEDGE_LAYER_TEAM``."""
    return res.KnowledgeLayer.Name(layer).removeprefix("KNOWLEDGE_LAYER_")  # type: ignore[arg-type]


def blockers(source: res.KnowledgeItem, target_layer: int) -> list[tuple[str, str]]:
    """Why ``source`` cannot rise to ``target_layer`` (status, layers, credentials).

    Returns:
        ``(reason, description)`` pairs; reasons ``SOURCE_NOT_ACCEPTED``,
        ``SOURCE_AT_TOP_LAYER``, ``PROMOTION_NOT_UPWARD``, ``CREDENTIALS_IN_CONTENT``.
    """
    out: list[tuple[str, str]] = []
    if source.status != res.KNOWLEDGE_STATUS_ACCEPTED:
        status = res.KnowledgeStatus.Name(source.status).removeprefix("KNOWLEDGE_STATUS_")
        out.append(("SOURCE_NOT_ACCEPTED", f"the source is {status}: only ACCEPTED items rise"))
    if source.layer == res.KNOWLEDGE_LAYER_COMPANY:
        out.append(("SOURCE_AT_TOP_LAYER", "the source is at COMPANY: there is no higher layer"))
    elif target_layer <= source.layer:
        out.append(
            (
                "PROMOTION_NOT_UPWARD",
                f"the target layer {layer_name(target_layer)} is not above the source's "
                f"{layer_name(source.layer)}",
            )
        )
    found = item_credentials(source)
    if found:
        where = ", ".join(f"line {f.line}: {f.kind}" for f in found[:10])
        out.append(("CREDENTIALS_IN_CONTENT", f"the item contains credentials ({where})"))
    return out


class PromotionApprovals(Protocol):
    """Governance's approval requests, as promotion needs them."""

    async def ask(
        self,
        tenant_id: str,
        target_unit: str,
        source: str,
        title: str,
        payload: dict[str, Any],
        request_id: str,
    ) -> tuple[str, str]:
        """Open a SINGLE approval request of type KNOWLEDGE at ``target_unit``.

        Returns:
            ``(approval request name, state)``, state such as ``PENDING``.
        """
        ...

    async def state(self, name: str) -> str:
        """The state of an approval request (``PENDING``, ``APPROVED``, ``REJECTED``,
        ``EXPIRED``, ``CANCELLED``), read with the service's own token."""
        ...

    async def decide(self, name: str, approve: bool, authorization: str, comment: str) -> str:
        """Record the caller's decision (their own bearer token, ``authorization``, and a
        comment); governance checks their authority. Returns the request's state after it."""
        ...

    async def cancel(self, name: str) -> None:
        """Withdraw a pending request this service opened (a retargeted promotion's)."""
        ...


def promotion_state(approval_state: str) -> int | None:
    """The promotion state that governance's approval state settles, or None while pending.

    APPROVED → APPROVED; REJECTED, EXPIRED, CANCELLED → REJECTED.
    """
    if approval_state == "APPROVED":
        return APPROVED
    if approval_state in ("REJECTED", "EXPIRED", "CANCELLED"):
        return REJECTED
    return None
