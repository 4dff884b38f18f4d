"""Policies, rules, checked contexts, violations and suppressions.

The enums carry the numbers of ``aeterna.governance.v1`` (``resources.proto``), so the
servicer converts with ``RuleType(pb.type)`` and back with ``int(rule.type)``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class RuleType(enum.IntEnum):
    """ALLOW: the condition must hold. DENY: it must not."""

    ALLOW = 1
    DENY = 2


class RuleTarget(enum.IntEnum):
    """The part of a :class:`PolicyContext` a rule looks at."""

    FILE = 1
    CODE = 2
    DEPENDENCY = 3
    IMPORT = 4
    CONFIG = 5


class RuleOperator(enum.IntEnum):
    """The condition a rule tests on its target."""

    MUST_USE = 1
    MUST_NOT_USE = 2
    MUST_MATCH = 3
    MUST_NOT_MATCH = 4
    MUST_EXIST = 5
    MUST_NOT_EXIST = 6


class Severity(enum.IntEnum):
    """How bad a violation is; callers reject on BLOCK."""

    INFO = 1
    WARN = 2
    BLOCK = 3


class PolicyMode(enum.IntEnum):
    """Whether units below may weaken a policy (UNSPECIFIED in a request means OPTIONAL)."""

    OPTIONAL = 1
    MANDATORY = 2


class MergeStrategy(enum.IntEnum):
    """How a policy combines with the rules inherited from above (UNSPECIFIED means MERGE)."""

    OVERRIDE = 1
    MERGE = 2
    INTERSECT = 3


SEVERITY_WEIGHT: Mapping[Severity, float] = {
    Severity.BLOCK: 1.0,
    Severity.WARN: 0.5,
    Severity.INFO: 0.1,
}
"""Weight of one unsuppressed violation in the drift score (DOMAIN.md, Governance: drift
score = min(1, Σ BLOCK 1.0 / WARN 0.5 / INFO 0.1), the upstream Aeterna weights)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a policy (``PolicyRule``).

    Attributes:
        id: Rule id, unique in its policy; merge strategies match rules across units by it.
        type: ALLOW or DENY.
        target: What it looks at.
        operator: The condition.
        value: A literal (USE), an RE2 pattern (MATCH), a dotted config key (EXIST on
            CONFIG), or empty (EXIST on other targets).
        severity: Severity of a violation.
        message: Shown on violation; a generated one when empty.
    """

    id: str
    type: RuleType
    target: RuleTarget
    operator: RuleOperator
    value: str
    severity: Severity
    message: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """A policy attached to a unit, as the engine needs it.

    Attributes:
        name: ``tenants/{tenant}/policies/{policy}``.
        org_unit: Id of the unit it is attached to (the last segment of its name).
        mode: OPTIONAL or MANDATORY.
        merge_strategy: How it combines with the rules inherited from above.
        rules: Its rules, in order.
    """

    name: str
    org_unit: str
    mode: PolicyMode
    merge_strategy: MergeStrategy
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a check looks at: one file, or one project's state.

    Attributes:
        path: File path (FILE rules).
        content: File text (CODE rules).
        dependencies: Declared dependencies, e.g. ``luxon`` or ``moment@2.29``.
        imports: Imported modules.
        config: Configuration as JSON values; nested keys addressed by dotted paths.
    """

    path: str = ""
    content: str = ""
    dependencies: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InForce:
    """A rule in force at a unit, with the policy it comes from."""

    policy: Policy
    rule: Rule


@dataclass(frozen=True, slots=True)
class Violation:
    """A rule in force that a context breaks.

    Attributes:
        policy: The policy's resource name.
        rule_id: The rule id.
        severity: The rule's severity.
        message: The rule's message, or a generated one.
        suppressed: Whether an unexpired suppression covers it.
    """

    policy: str
    rule_id: str
    severity: Severity
    message: str
    suppressed: bool = False


@dataclass(frozen=True, slots=True)
class Suppression:
    """A decision not to count one rule's violations at a unit and below until a time.

    Attributes:
        policy: The policy's resource name.
        rule_id: The rule id.
        org_unit: Id of the unit where it applies (and below).
        expire_time: When it stops applying (aware datetime).
    """

    policy: str
    rule_id: str
    org_unit: str
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of checking a context against the rules in force.

    Attributes:
        violations: Every violated rule, suppressed ones marked, in resolution order.
        blocked: Whether any unsuppressed violation is BLOCK.
        drift_score: min(1, Σ weights of unsuppressed violations), in [0, 1].
    """

    violations: tuple[Violation, ...]
    blocked: bool
    drift_score: float
