"""Resolution of the rules in force at a unit, checks of contexts, and the drift score.

Semantics (DOMAIN.md, Governance, after upstream Aeterna):

* A rule's *condition* is its operator applied to its target. ALLOW rules are violated when
  the condition fails, DENY rules when it holds.
* Texts (FILE → ``path``, CODE → ``content``): MUST_USE holds when the text contains the
  value, MUST_MATCH when an RE2 search finds the pattern, MUST_EXIST when the text is
  non-empty.
* Lists (DEPENDENCY, IMPORT): MUST_USE holds when an entry is the value (a dependency also
  by its name without version, ``moment@2.29`` uses ``moment``; an import also by a
  submodule, ``os.path`` uses ``os``), MUST_MATCH when a pattern search finds any entry,
  MUST_EXIST when the list is non-empty.
* CONFIG is seen as its flattened entries ``dotted.key=value`` (lists indexed ``key.0``,
  numbers as JSON writes them, integral ones without a fraction): MUST_USE holds when an
  entry equals the value, MUST_MATCH when a search finds any entry; MUST_EXIST holds when the
  key named by the value is present and not null or empty.
* Resolution walks the chain company → … → the unit. At each unit its policies apply in
  order of name, each to the rules accumulated so far: OVERRIDE replaces rules with the same
  id, MERGE adds its rules, INTERSECT keeps only ids present both above and in the policy
  (the policy's version of each). Rules of MANDATORY policies are never removed.
* Drift score = min(1, Σ over unsuppressed violations of BLOCK 1.0, WARN 0.5, INFO 0.1).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from aeterna_governance.policy.model import (
    SEVERITY_WEIGHT,
    CheckResult,
    InForce,
    MergeStrategy,
    Policy,
    PolicyContext,
    PolicyMode,
    Rule,
    RuleOperator,
    RuleTarget,
    RuleType,
    Severity,
    Suppression,
    Violation,
)
from aeterna_governance.policy.patterns import compile_pattern

FILE_TARGETS = frozenset({RuleTarget.FILE, RuleTarget.CODE})
"""The targets ValidateContent checks (one file's path and text)."""

ALL_TARGETS = frozenset(RuleTarget)
"""The targets CheckPolicy and CheckDrift check."""

_DEPENDENCY_NAME = re.compile(r"@?[^@=<>~!\s\[;]+")
"""A dependency's name before any version: ``moment@2.29``, ``@types/node@20``,
``requests==2.31``, ``numpy>=1.26``, ``uvicorn[standard]``."""


def resolve(chain: Sequence[str], policies: Iterable[Policy]) -> tuple[InForce, ...]:
    """The rules in force at the last unit of ``chain``.

    Args:
        chain: Unit ids from the root (company) down to the unit, each once.
        policies: Policies attached to units of the chain (others are ignored).

    Returns:
        The rules in force with their policies, in resolution order.
    """
    by_unit: dict[str, list[Policy]] = defaultdict(list)
    for policy in policies:
        by_unit[policy.org_unit].append(policy)
    in_force: list[InForce] = []
    for unit in chain:
        for policy in sorted(by_unit.get(unit, ()), key=lambda p: p.name):
            in_force = _apply(in_force, policy)
    return tuple(in_force)


def _apply(inherited: list[InForce], policy: Policy) -> list[InForce]:
    own = [InForce(policy, rule) for rule in policy.rules]
    own_ids = {rule.id for rule in policy.rules}

    def stays(entry: InForce) -> bool:
        return entry.policy.mode is PolicyMode.MANDATORY

    if policy.merge_strategy is MergeStrategy.OVERRIDE:
        return [e for e in inherited if e.rule.id not in own_ids or stays(e)] + own
    if policy.merge_strategy is MergeStrategy.INTERSECT:
        above = {e.rule.id for e in inherited}
        return [e for e in inherited if stays(e)] + [e for e in own if e.rule.id in above]
    return inherited + own


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, value


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value))  # Struct numbers are doubles: 8080.0 is written 8080
    return str(value)


def config_entries(config: Mapping[str, Any]) -> list[str]:
    """A config's flattened ``dotted.key=value`` entries (see the module docstring)."""
    return [f"{key}={_scalar(value)}" for key, value in _flatten(config)]


def config_lookup(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key path (list items by index), or ``None`` when absent."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _uses(rule: Rule, item: str) -> bool:
    if item == rule.value:
        return True
    if rule.target is RuleTarget.DEPENDENCY:
        name = _DEPENDENCY_NAME.match(item)
        return name is not None and name.group(0) == rule.value
    if rule.target is RuleTarget.IMPORT:
        return item.startswith(rule.value + ".")
    return False


def condition_holds(rule: Rule, context: PolicyContext) -> bool:
    """Whether the rule's operator holds on its target in ``context``.

    Args:
        rule: A validated rule (its pattern compiles: see :mod:`.validation`).
        context: What is checked.

    Returns:
        The condition's truth (before ALLOW/DENY is applied).
    """
    op = rule.operator
    negated = op in (
        RuleOperator.MUST_NOT_USE,
        RuleOperator.MUST_NOT_MATCH,
        RuleOperator.MUST_NOT_EXIST,
    )
    if rule.target is RuleTarget.CONFIG and op in (
        RuleOperator.MUST_EXIST,
        RuleOperator.MUST_NOT_EXIST,
    ):
        found = config_lookup(context.config, rule.value)
        return (found not in (None, "", [], {})) != negated
    items: Sequence[str]
    if rule.target is RuleTarget.FILE:
        items = [context.path] if context.path else []
    elif rule.target is RuleTarget.CODE:
        items = [context.content] if context.content else []
    elif rule.target is RuleTarget.DEPENDENCY:
        items = context.dependencies
    elif rule.target is RuleTarget.IMPORT:
        items = context.imports
    else:
        items = config_entries(context.config)
    if op in (RuleOperator.MUST_EXIST, RuleOperator.MUST_NOT_EXIST):
        holds = bool(items)
    elif op in (RuleOperator.MUST_USE, RuleOperator.MUST_NOT_USE):
        if rule.target in FILE_TARGETS:
            holds = any(rule.value in text for text in items)
        else:
            holds = any(_uses(rule, item) for item in items)
    else:
        pattern = compile_pattern(rule.value)
        holds = any(pattern.search(item) is not None for item in items)
    return holds != negated


def is_violated(rule: Rule, context: PolicyContext) -> bool:
    """ALLOW rules are violated when their condition fails, DENY rules when it holds."""
    holds = condition_holds(rule, context)
    return not holds if rule.type is RuleType.ALLOW else holds


def default_message(rule: Rule) -> str:
    """The message of a violation of a rule without its own message."""
    operand = f" {rule.value!r}" if rule.value else ""
    return (
        f"rule {rule.id!r} violated: {rule.type.name} {rule.target.name} "
        f"{rule.operator.name}{operand}"
    )


def is_suppressed(
    policy: str,
    rule_id: str,
    chain: Sequence[str],
    suppressions: Iterable[Suppression],
    now: datetime,
) -> bool:
    """Whether an unexpired suppression at a unit of ``chain`` covers the rule.

    Args:
        policy: The policy's resource name.
        rule_id: The rule id.
        chain: Unit ids from the root down to the checked unit (a suppression at a unit
            applies there and below).
        suppressions: Candidate suppressions.
        now: The time of the check (aware); a suppression applies while ``now`` is before
            its ``expire_time``.
    """
    units = set(chain)
    return any(
        s.policy == policy and s.rule_id == rule_id and s.org_unit in units and now < s.expire_time
        for s in suppressions
    )


def drift_score(violations: Iterable[Violation]) -> float:
    """min(1, Σ weights of the unsuppressed violations) (:data:`SEVERITY_WEIGHT`).

    Returns:
        The score in [0, 1], rounded to 9 decimals so that 3 × INFO is 0.3.
    """
    total = math.fsum(SEVERITY_WEIGHT[v.severity] for v in violations if not v.suppressed)
    return min(1.0, round(total, 9))


def check(
    in_force: Iterable[InForce],
    context: PolicyContext,
    *,
    chain: Sequence[str],
    suppressions: Iterable[Suppression],
    now: datetime,
    targets: frozenset[RuleTarget] = ALL_TARGETS,
) -> CheckResult:
    """Check ``context`` against the rules in force.

    Args:
        in_force: From :func:`resolve`.
        context: What is checked.
        chain: Unit ids from the root down to the checked unit (for suppressions).
        suppressions: The tenant's suppressions (expired ones are ignored).
        now: The time of the check (aware).
        targets: Only rules on these targets are checked (:data:`FILE_TARGETS` for one
            file).

    Returns:
        The violations, ``blocked`` and the drift score.
    """
    sup = list(suppressions)
    violations = tuple(
        Violation(
            policy=entry.policy.name,
            rule_id=entry.rule.id,
            severity=entry.rule.severity,
            message=entry.rule.message or default_message(entry.rule),
            suppressed=is_suppressed(entry.policy.name, entry.rule.id, chain, sup, now),
        )
        for entry in in_force
        if entry.rule.target in targets and is_violated(entry.rule, context)
    )
    blocked = any(v.severity is Severity.BLOCK and not v.suppressed for v in violations)
    return CheckResult(violations, blocked, drift_score(violations))
