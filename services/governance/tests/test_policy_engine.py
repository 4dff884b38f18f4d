"""The policy engine without servers: operators × targets, resolution, drift, bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aeterna.governance.v1 import resources_pb2 as pb
from aeterna_governance.policy import engine
from aeterna_governance.policy.model import (
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
)
from aeterna_governance.policy.validation import MAX_RULES, check_context, parse_rules

T, Op = RuleTarget, RuleOperator

CONFIG = {"server": {"port": 8080.0, "tls": True, "hosts": ["a.example", "b.example"]}}

# (target, operator, value, a context where the condition holds, one where it fails)
CASES: list[tuple[RuleTarget, RuleOperator, str, PolicyContext, PolicyContext]] = [
    (T.FILE, Op.MUST_USE, "/src/", PolicyContext(path="app/src/x.py"), PolicyContext(path="x.py")),
    (T.FILE, Op.MUST_NOT_USE, ".env", PolicyContext(path="a.py"), PolicyContext(path="a/.env")),
    (T.FILE, Op.MUST_MATCH, r"\.py$", PolicyContext(path="a.py"), PolicyContext(path="a.js")),
    (T.FILE, Op.MUST_NOT_MATCH, r"^tmp/", PolicyContext(path="a"), PolicyContext(path="tmp/a")),
    (T.FILE, Op.MUST_EXIST, "", PolicyContext(path="a"), PolicyContext()),
    (T.FILE, Op.MUST_NOT_EXIST, "", PolicyContext(), PolicyContext(path="a")),
    (
        T.CODE,
        Op.MUST_USE,
        "import luxon",
        PolicyContext(content="import luxon\n"),
        PolicyContext(content="x = 1"),
    ),
    (
        T.CODE,
        Op.MUST_NOT_USE,
        "eval(",
        PolicyContext(content="x = 1"),
        PolicyContext(content="eval(s)"),
    ),
    (
        T.CODE,
        Op.MUST_MATCH,
        r"(?m)^# SPDX-License-Identifier: \S+",
        PolicyContext(content="# SPDX-License-Identifier: MIT\nx"),
        PolicyContext(content="x"),
    ),
    (
        T.CODE,
        Op.MUST_NOT_MATCH,
        r"AKIA[0-9A-Z]{16}",
        PolicyContext(content="key = None"),
        PolicyContext(content="key = 'AKIAABCDEFGHIJKLMNOP'"),
    ),
    (T.CODE, Op.MUST_EXIST, "", PolicyContext(content="x"), PolicyContext()),
    (T.CODE, Op.MUST_NOT_EXIST, "", PolicyContext(), PolicyContext(content="x")),
    (
        T.DEPENDENCY,
        Op.MUST_USE,
        "luxon",
        PolicyContext(dependencies=("luxon@3.4",)),
        PolicyContext(dependencies=("luxonish",)),
    ),
    (
        T.DEPENDENCY,
        Op.MUST_NOT_USE,
        "moment",
        PolicyContext(dependencies=("luxon",)),
        PolicyContext(dependencies=("moment@2.29",)),
    ),
    (
        T.DEPENDENCY,
        Op.MUST_MATCH,
        r"^@acme/",
        PolicyContext(dependencies=("@acme/ui@1",)),
        PolicyContext(dependencies=("react",)),
    ),
    (
        T.DEPENDENCY,
        Op.MUST_NOT_MATCH,
        r"==0\.",
        PolicyContext(dependencies=("a==1.0",)),
        PolicyContext(dependencies=("a==0.9",)),
    ),
    (T.DEPENDENCY, Op.MUST_EXIST, "", PolicyContext(dependencies=("a",)), PolicyContext()),
    (T.DEPENDENCY, Op.MUST_NOT_EXIST, "", PolicyContext(), PolicyContext(dependencies=("a",))),
    (
        T.IMPORT,
        Op.MUST_USE,
        "logging",
        PolicyContext(imports=("logging.config",)),
        PolicyContext(imports=("loggingx",)),
    ),
    (
        T.IMPORT,
        Op.MUST_NOT_USE,
        "pickle",
        PolicyContext(imports=("json",)),
        PolicyContext(imports=("pickle",)),
    ),
    (
        T.IMPORT,
        Op.MUST_MATCH,
        r"^structlog$",
        PolicyContext(imports=("os", "structlog")),
        PolicyContext(imports=("os",)),
    ),
    (
        T.IMPORT,
        Op.MUST_NOT_MATCH,
        r"^subprocess",
        PolicyContext(imports=("os",)),
        PolicyContext(imports=("subprocess",)),
    ),
    (T.IMPORT, Op.MUST_EXIST, "", PolicyContext(imports=("os",)), PolicyContext()),
    (T.IMPORT, Op.MUST_NOT_EXIST, "", PolicyContext(), PolicyContext(imports=("os",))),
    (
        T.CONFIG,
        Op.MUST_USE,
        "server.tls=true",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"server": {"tls": False}}),
    ),
    (
        T.CONFIG,
        Op.MUST_NOT_USE,
        "server.port=80",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"server": {"port": 80.0}}),
    ),
    (
        T.CONFIG,
        Op.MUST_MATCH,
        r"^server\.hosts\.\d+=.*\.example$",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"server": {"hosts": ["localhost"]}}),
    ),
    (
        T.CONFIG,
        Op.MUST_NOT_MATCH,
        r"^debug=true$",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"debug": True}),
    ),
    (
        T.CONFIG,
        Op.MUST_EXIST,
        "server.hosts.1",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"server": {"hosts": ["a"]}}),
    ),
    (
        T.CONFIG,
        Op.MUST_NOT_EXIST,
        "server.debug",
        PolicyContext(config=CONFIG),
        PolicyContext(config={"server": {"debug": "yes"}}),
    ),
]


@pytest.mark.parametrize(
    ("target", "operator", "value", "holds", "fails"),
    CASES,
    ids=[f"{c[0].name}-{c[1].name}" for c in CASES],
)
@pytest.mark.parametrize("rule_type", [RuleType.ALLOW, RuleType.DENY])
def test_operator_on_target(
    rule_type: RuleType,
    target: RuleTarget,
    operator: RuleOperator,
    value: str,
    holds: PolicyContext,
    fails: PolicyContext,
) -> None:
    spec = pb.PolicyRule(
        id="r",
        type=rule_type,
        target=target,
        operator=operator,
        value=value,
        severity=pb.SEVERITY_WARN,
    )
    (rule,), problems = parse_rules([spec], "policy.rules")
    assert problems == []
    assert engine.condition_holds(rule, holds) is True
    assert engine.condition_holds(rule, fails) is False
    # ALLOW is violated when the condition fails, DENY when it holds.
    assert engine.is_violated(rule, holds) is (rule_type is RuleType.DENY)
    assert engine.is_violated(rule, fails) is (rule_type is RuleType.ALLOW)


def _rule(rule_id: str, value: str, severity: Severity = Severity.WARN) -> Rule:
    # DENY MUST_USE on dependencies: violated when the context uses `value`.
    return Rule(rule_id, RuleType.DENY, T.DEPENDENCY, Op.MUST_USE, value, severity)


def _policy(
    name: str,
    unit: str,
    strategy: MergeStrategy,
    *rules: Rule,
    mode: PolicyMode = PolicyMode.OPTIONAL,
) -> Policy:
    return Policy(f"tenants/t/policies/{name}", unit, mode, strategy, rules)


CHAIN = ["acme", "eng", "payments", "checkout"]  # company, organisation, team, project


def _in_force(*policies: Policy) -> list[tuple[str, str, str]]:
    return [
        (e.policy.name.rsplit("/", 1)[1], e.rule.id, e.rule.value)
        for e in engine.resolve(CHAIN, policies)
    ]


def test_merge_strategies_down_four_levels() -> None:
    policies = [
        _policy("company", "acme", MergeStrategy.MERGE, _rule("a", "moment"), _rule("b", "lodash")),
        # MERGE adds c; a and b stay.
        _policy("org", "eng", MergeStrategy.MERGE, _rule("c", "left-pad")),
        # OVERRIDE replaces a (company's) with its own version, keeps b and c, adds d.
        _policy("team", "payments", MergeStrategy.OVERRIDE, _rule("a", "dayjs"), _rule("d", "x")),
        # INTERSECT keeps only ids present above and here: a and c, in this policy's version.
        _policy(
            "proj",
            "checkout",
            MergeStrategy.INTERSECT,
            _rule("a", "y"),
            _rule("c", "z"),
            _rule("e", "never-above"),
        ),
    ]
    assert _in_force(*policies[:1]) == [("company", "a", "moment"), ("company", "b", "lodash")]
    assert _in_force(*policies[:2]) == [
        ("company", "a", "moment"),
        ("company", "b", "lodash"),
        ("org", "c", "left-pad"),
    ]
    assert _in_force(*policies[:3]) == [
        ("company", "b", "lodash"),
        ("org", "c", "left-pad"),
        ("team", "a", "dayjs"),
        ("team", "d", "x"),
    ]
    assert _in_force(*policies) == [("proj", "a", "y"), ("proj", "c", "z")]
    # A unit off the chain contributes nothing.
    stray = _policy("other", "elsewhere", MergeStrategy.MERGE, _rule("s", "s"))
    assert _in_force(*policies, stray) == [("proj", "a", "y"), ("proj", "c", "z")]


def test_mandatory_rules_survive_override_and_intersect_below() -> None:
    mandatory = _policy(
        "baseline",
        "acme",
        MergeStrategy.MERGE,
        _rule("no-moment", "moment", Severity.BLOCK),
        mode=PolicyMode.MANDATORY,
    )
    optional = _policy("style", "acme", MergeStrategy.MERGE, _rule("no-lodash", "lodash"))
    override = _policy(
        "team",
        "payments",
        MergeStrategy.OVERRIDE,
        _rule("no-moment", "nothing"),
        _rule("no-lodash", "nothing"),
    )
    intersect = _policy("proj", "checkout", MergeStrategy.INTERSECT, _rule("other", "x"))
    assert _in_force(mandatory, optional, override) == [
        ("baseline", "no-moment", "moment"),
        ("team", "no-moment", "nothing"),
        ("team", "no-lodash", "nothing"),
    ]
    # INTERSECT below drops every optional rule (no common id) but not the mandatory one.
    assert _in_force(mandatory, optional, override, intersect) == [
        ("baseline", "no-moment", "moment"),
    ]
    result = engine.check(
        engine.resolve(CHAIN, [mandatory, optional, override, intersect]),
        PolicyContext(dependencies=("moment@2.29", "lodash")),
        chain=CHAIN,
        suppressions=[],
        now=datetime.now(UTC),
    )
    assert [v.rule_id for v in result.violations] == ["no-moment"]
    assert result.blocked is True


def test_drift_with_active_and_expired_suppressions() -> None:
    policy = _policy(
        "deps",
        "acme",
        MergeStrategy.MERGE,
        _rule("block", "a", Severity.BLOCK),
        _rule("warn", "b", Severity.WARN),
        _rule("info1", "c", Severity.INFO),
        _rule("info2", "d", Severity.INFO),
        _rule("info3", "e", Severity.INFO),
    )
    in_force = engine.resolve(CHAIN, [policy])
    context = PolicyContext(dependencies=("a", "b", "c", "d", "e"))
    now = datetime.now(UTC)

    def run(*suppressions: Suppression) -> tuple[float, bool, list[str]]:
        result = engine.check(in_force, context, chain=CHAIN, suppressions=suppressions, now=now)
        return (
            result.drift_score,
            result.blocked,
            [v.rule_id for v in result.violations if v.suppressed],
        )

    assert run() == (1.0, True, [])  # 1.0 + 0.5 + 0.3, capped at 1
    later, earlier = now + timedelta(days=1), now - timedelta(seconds=1)
    active_block = Suppression(policy.name, "block", "payments", later)
    assert run(active_block) == (0.8, False, ["block"])  # 0.5 + 3 × 0.1
    expired_warn = Suppression(policy.name, "warn", "acme", earlier)
    assert run(active_block, expired_warn) == (0.8, False, ["block"])
    active_warn = Suppression(policy.name, "warn", "acme", later)
    assert run(active_block, active_warn) == (0.3, False, ["block", "warn"])
    # A suppression below the checked unit, or of another policy, does not apply.
    below = Suppression(policy.name, "info1", "elsewhere", later)
    other = Suppression("tenants/t/policies/x", "info2", "acme", later)
    assert run(active_block, active_warn, below, other) == (0.3, False, ["block", "warn"])


def test_catastrophic_backtracking_pattern_returns() -> None:
    spec = pb.PolicyRule(
        id="redos",
        type=pb.RULE_TYPE_DENY,
        target=pb.RULE_TARGET_CODE,
        operator=pb.RULE_OPERATOR_MUST_MATCH,
        value="(a+)+$",
        severity=pb.SEVERITY_BLOCK,
    )
    (rule,), problems = parse_rules([spec], "policy.rules")
    assert problems == []
    # With a backtracking engine this input takes longer than the universe's age.
    assert engine.is_violated(rule, PolicyContext(content="a" * 50_000 + "!")) is False
    assert engine.is_violated(rule, PolicyContext(content="a" * 50_000)) is True


def _fields(specs: list[pb.PolicyRule]) -> dict[str, str]:
    _, problems = parse_rules(specs, "policy.rules")
    return {p.field: p.description for p in problems}


def test_bad_rules_name_their_fields() -> None:
    ok = dict(type=pb.RULE_TYPE_DENY, target=pb.RULE_TARGET_CODE, severity=pb.SEVERITY_INFO)
    problems = _fields(
        [
            pb.PolicyRule(id="a", operator=pb.RULE_OPERATOR_MUST_MATCH, value="(unclosed", **ok),
            pb.PolicyRule(id="a", operator=pb.RULE_OPERATOR_MUST_USE, value="x" * 1001, **ok),
            pb.PolicyRule(id="Bad Id", operator=pb.RULE_OPERATOR_MUST_EXIST, value="x", **ok),
            pb.PolicyRule(
                id="d",
                type=pb.RULE_TYPE_ALLOW,
                target=pb.RULE_TARGET_CONFIG,
                operator=pb.RULE_OPERATOR_MUST_USE,
                value="no-equals-sign",
                severity=pb.SEVERITY_WARN,
            ),
            pb.PolicyRule(
                id="e",
                type=pb.RULE_TYPE_ALLOW,
                target=pb.RULE_TARGET_FILE,
                operator=pb.RULE_OPERATOR_MUST_MATCH,
                value=r"\p{L}{1000}",
            ),
            pb.PolicyRule(
                id="f", operator=pb.RULE_OPERATOR_MUST_USE, value="x", message="m" * 1001, **ok
            ),
        ]
    )
    assert problems.keys() == {
        "policy.rules[0].value",
        "policy.rules[1].id",
        "policy.rules[1].value",
        "policy.rules[2].id",
        "policy.rules[2].value",
        "policy.rules[3].value",
        "policy.rules[4].value",
        "policy.rules[4].severity",
        "policy.rules[5].message",
    }
    assert "missing )" in problems["policy.rules[0].value"]
    assert "too large" in problems["policy.rules[4].value"]


def test_rule_count_is_bounded() -> None:
    spec = dict(
        type=pb.RULE_TYPE_DENY,
        target=pb.RULE_TARGET_IMPORT,
        operator=pb.RULE_OPERATOR_MUST_USE,
        value="pickle",
        severity=pb.SEVERITY_INFO,
    )
    rules = [pb.PolicyRule(id=f"r{i}", **spec) for i in range(MAX_RULES + 1)]
    assert _fields(rules).keys() == {"policy.rules"}
    assert _fields(rules[:MAX_RULES]) == {}
    assert _fields([]).keys() == {"policy.rules"}


def test_context_limits() -> None:
    big = PolicyContext(
        content="é" * ((1 << 19) + 1),
        path="p" * 5000,
        imports=("x" * 1001,),
        dependencies=("d",) * 10_001,
    )
    assert {p.field for p in check_context(big, "context")} == {
        "context.content",
        "context.path",
        "context.imports[0]",
        "context.dependencies",
    }
    # 1 MiB of single-byte characters is within bounds.
    assert check_context(PolicyContext(content="a" * (1 << 20)), "") == []
