"""Validation of policies at write time and of contexts at check time.

Everything a check could trip over is refused when the policy is written: unknown enums,
malformed or too costly RE2 patterns, operands that make no sense for the target. A check
then never fails on a stored rule. Each problem is one field violation naming the field's
path in the request (AIP-193), e.g. ``policy.rules[3].value``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from aeterna_common.errors import FieldViolation

from aeterna_governance.policy.model import (
    PolicyContext,
    Rule,
    RuleOperator,
    RuleTarget,
    RuleType,
    Severity,
)
from aeterna_governance.policy.patterns import PatternError, compile_pattern

MAX_RULES = 200
"""Rules per policy (the contract: 1-200)."""

MAX_VALUE_CHARS = 1000
"""Longest rule value and rule message, in characters (the contract)."""

MAX_CONTENT_BYTES = 1 << 20
"""Largest checked text (``content``), in UTF-8 bytes: 1 MiB (the contract)."""

MAX_PATH_CHARS = 4096
"""Longest checked path, in characters (Linux ``PATH_MAX``)."""

MAX_ITEMS = 10_000
"""Most dependencies or imports in one check."""

MAX_ITEM_CHARS = 1000
"""Longest dependency or import name, in characters."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest checked config, in bytes of its compact JSON: 1 MiB, as for content."""

RULE_ID = re.compile(r"[a-z0-9._-]{1,64}")
"""Rule ids (the contract: 1-64 characters of [a-z0-9-_.])."""

CONFIG_KEY = re.compile(r"[^.\s]+(\.[^.\s]+)*")
"""A dotted config key path: non-empty segments without blanks."""


class RuleSpec(Protocol):
    """A rule as a request carries it (``aeterna.governance.v1.PolicyRule`` fits)."""

    @property
    def id(self) -> str:
        """Rule id."""

    @property
    def type(self) -> int:
        """``RuleType`` number."""

    @property
    def target(self) -> int:
        """``RuleTarget`` number."""

    @property
    def operator(self) -> int:
        """``RuleOperator`` number."""

    @property
    def value(self) -> str:
        """The operand."""

    @property
    def severity(self) -> int:
        """``Severity`` number."""

    @property
    def message(self) -> str:
        """Message on violation."""


E = TypeVar("E", bound=enum.IntEnum)


def _enum(kind: type[E], raw: int, field: str, violations: list[FieldViolation]) -> E | None:
    try:
        return kind(raw)
    except ValueError:
        names = ", ".join(m.name for m in kind)
        violations.append(
            FieldViolation(field, f"must be one of {names}", "UNSPECIFIED" if raw == 0 else "")
        )
        return None


def _check_value(rule: RuleSpec, target: RuleTarget, operator: RuleOperator) -> str:
    """What is wrong with a rule's value for its target and operator, or ''."""
    value = rule.value
    if operator in (RuleOperator.MUST_USE, RuleOperator.MUST_NOT_USE):
        if not value:
            return "required: the literal to look for"
        if target is RuleTarget.CONFIG:
            key, sep, _ = value.partition("=")
            if not sep or not CONFIG_KEY.fullmatch(key):
                return "a CONFIG literal is `dotted.key=value`"
        return ""
    if operator in (RuleOperator.MUST_MATCH, RuleOperator.MUST_NOT_MATCH):
        if not value:
            return "required: an RE2 pattern"
        try:
            compile_pattern(value)
        except PatternError as exc:
            return str(exc)
        return ""
    if target is RuleTarget.CONFIG:
        if not CONFIG_KEY.fullmatch(value):
            return "required: the dotted config key that must (not) exist"
    elif value:
        return f"must be empty: {operator.name} on {target.name} tests the target itself"
    return ""


def parse_rules(
    rules: Sequence[RuleSpec], field: str
) -> tuple[tuple[Rule, ...], list[FieldViolation]]:
    """Check a policy's rules and convert them to the domain's.

    Args:
        rules: The rules of a request, in order.
        field: Path of the rule list in the request, e.g. ``policy.rules``.

    Returns:
        The rules (complete only when there are no violations) and every violation found:
        a count outside 1-:data:`MAX_RULES`, a malformed or repeated id, an unset or unknown
        enum, a value or message over :data:`MAX_VALUE_CHARS`, a value that does not fit the
        operator and target (a malformed or too costly RE2 pattern among them).
    """
    violations: list[FieldViolation] = []
    if not rules:
        violations.append(FieldViolation(field, "at least one rule is required", "REQUIRED"))
    if len(rules) > MAX_RULES:
        violations.append(
            FieldViolation(field, f"at most {MAX_RULES} rules, got {len(rules)}", "TOO_MANY")
        )
        return (), violations
    parsed: list[Rule] = []
    seen: set[str] = set()
    for i, spec in enumerate(rules):
        at = f"{field}[{i}]"
        if not RULE_ID.fullmatch(spec.id):
            violations.append(FieldViolation(f"{at}.id", "1-64 characters of [a-z0-9-_.]"))
        elif spec.id in seen:
            violations.append(FieldViolation(f"{at}.id", f"repeats rule id {spec.id!r}"))
        seen.add(spec.id)
        rule_type = _enum(RuleType, spec.type, f"{at}.type", violations)
        target = _enum(RuleTarget, spec.target, f"{at}.target", violations)
        operator = _enum(RuleOperator, spec.operator, f"{at}.operator", violations)
        severity = _enum(Severity, spec.severity, f"{at}.severity", violations)
        if len(spec.message) > MAX_VALUE_CHARS:
            violations.append(
                FieldViolation(f"{at}.message", f"at most {MAX_VALUE_CHARS} characters")
            )
        if len(spec.value) > MAX_VALUE_CHARS:
            violations.append(
                FieldViolation(f"{at}.value", f"at most {MAX_VALUE_CHARS} characters")
            )
        elif target is not None and operator is not None:
            problem = _check_value(spec, target, operator)
            if problem:
                violations.append(FieldViolation(f"{at}.value", problem, "INVALID_RULE_VALUE"))
        if rule_type and target and operator and severity:
            parsed.append(
                Rule(spec.id, rule_type, target, operator, spec.value, severity, spec.message)
            )
    return tuple(parsed), violations


def check_context(context: PolicyContext, field: str) -> list[FieldViolation]:
    """The size violations of a context to check.

    Args:
        context: What to check.
        field: Path of the context in the request (``context``), or ``""`` when its fields
            are the request's own (ValidateContent).

    Returns:
        One violation per field over its limit: content over :data:`MAX_CONTENT_BYTES`,
        path over :data:`MAX_PATH_CHARS`, more than :data:`MAX_ITEMS` dependencies or
        imports or one over :data:`MAX_ITEM_CHARS`, config over :data:`MAX_CONFIG_BYTES`.
    """
    at = f"{field}." if field else ""
    violations: list[FieldViolation] = []
    if len(context.content) > MAX_CONTENT_BYTES // 4 and (
        len(context.content.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES
    ):
        violations.append(
            FieldViolation(f"{at}content", f"at most {MAX_CONTENT_BYTES} bytes", "TOO_LARGE")
        )
    if len(context.path) > MAX_PATH_CHARS:
        violations.append(FieldViolation(f"{at}path", f"at most {MAX_PATH_CHARS} characters"))
    for name, items in (("dependencies", context.dependencies), ("imports", context.imports)):
        if len(items) > MAX_ITEMS:
            violations.append(FieldViolation(f"{at}{name}", f"at most {MAX_ITEMS} entries"))
            continue
        for i, item in enumerate(items):
            if len(item) > MAX_ITEM_CHARS:
                violations.append(
                    FieldViolation(f"{at}{name}[{i}]", f"at most {MAX_ITEM_CHARS} characters")
                )
                break
    if _json_size(context.config) > MAX_CONFIG_BYTES:
        violations.append(
            FieldViolation(f"{at}config", f"at most {MAX_CONFIG_BYTES} bytes of JSON", "TOO_LARGE")
        )
    return violations


def _json_size(value: Mapping[str, Any]) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
