"""Generate each chart's Prometheus rules: ``charts/<chart>/files/prometheus-rules.yaml``.

One source for the alerts of every service: the charts ship them as a ``PrometheusRule``
(``prometheusRule.enabled``), ``make run``'s Prometheus loads them, and ``promtool test rules``
unit-tests them (``tests/promtool/``). Every alert links its runbook in ``docs/runbooks/``.

SLO alerts are multi-window, multi-burn-rate (Google SRE workbook, "Alerting on SLOs",
section 6 and table 5-8): page (``critical``) when the 1 h and 5 min error ratios both exceed
14.4x the budget (2 % of a 30-day budget spent in an hour) or the 6 h and 30 min ratios exceed
6x (5 % in 6 h); open a ticket (``warning``) when the 1 d and 2 h ratios exceed 3x or the 3 d
and 6 h ratios exceed 1x. The short window makes an alert stop soon after the burn stops.

Usage: ``python scripts/gen_alerts.py`` (part of ``make gen``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = "https://github.com/aeterna/aeterna/blob/main/docs/runbooks"
SERVICES = ("memory", "governance", "knowledge", "sync")
RULES_FILE = "files/prometheus-rules.yaml"

AVAILABILITY_SLO = 0.999
"""Share of RPCs that must not fail with a server-side code, over 30 days."""
LATENCY_SLO = 0.99
"""Share of RPCs that must complete within :data:`LATENCY_THRESHOLD_S`, over 30 days."""
LATENCY_THRESHOLD_S = "0.5"
"""A bucket bound of ``grpc_server_handling_seconds`` (aeterna_common.telemetry)."""
SERVER_ERRORS = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"
"""gRPC codes that spend the error budget: the server's failures, not the caller's."""
STREAMING = "Watch.*|Stream.*|Subscribe.*"
"""Long-lived streaming methods, left out of latency (their duration is the stream's)."""
SYNC_DELIVERY_LAG_S = 5
"""p99 commit-to-send delay, in seconds, of sync's live events that opens a ticket when held
for 10 minutes: ``make bench-events`` measured p99 986 ms with 1,000 subscribers on a busy
2-core box (README, Sync), so 5 s sustained is a lagging relay, feed or replica, not a burst."""
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
BURN_RATES = (
    # (severity, for, [(long window, short window, burn rate), ...]): each severity is one
    # alert, firing when any of its window pairs burns too fast.
    ("critical", "2m", [("1h", "5m", 14.4), ("6h", "30m", 6.0)]),
    ("warning", "15m", [("1d", "2h", 3.0), ("3d", "6h", 1.0)]),
)


def _runbook(name: str) -> str:
    return f"{RUNBOOKS}/{name}.md"


def _alert(
    name: str,
    expr: str,
    *,
    severity: str,
    summary: str,
    description: str,
    runbook: str,
    for_: str | None = None,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": _runbook(runbook),
    }
    return rule


def _slo_records(job: str) -> list[dict[str, Any]]:
    sel = f'job="{job}"'
    errors = f'{sel},grpc_code=~"{SERVER_ERRORS}"'
    unary = f'{sel},grpc_method!~"{STREAMING}"'
    fast = f'{unary},le="{LATENCY_THRESHOLD_S}"'
    records: list[dict[str, Any]] = []
    for w in WINDOWS:
        total = f"sum by (job) (rate(grpc_server_handled_total{{{sel}}}[{w}]))"
        failed = f"sum by (job) (rate(grpc_server_handled_total{{{errors}}}[{w}]))"
        within = f"sum by (job) (rate(grpc_server_handling_seconds_bucket{{{fast}}}[{w}]))"
        count = f"sum by (job) (rate(grpc_server_handling_seconds_count{{{unary}}}[{w}]))"
        records.append(
            {"record": f"aeterna:grpc_server_errors:ratio_rate{w}", "expr": f"{failed}\n/\n{total}"}
        )
        records.append(
            {
                "record": f"aeterna:grpc_server_slow:ratio_rate{w}",
                "expr": f"1 - (\n  {within}\n  /\n  {count}\n)",
            }
        )
    return records


def _burn_alerts(service: str, job: str, kind: str) -> list[dict[str, Any]]:
    title = service.capitalize()
    if kind == "errors":
        budget = 1 - AVAILABILITY_SLO
        record = "aeterna:grpc_server_errors:ratio_rate"
        what = f"server errors (SLO {AVAILABILITY_SLO:.1%} of RPCs succeed)"
        name = f"Aeterna{title}ErrorBudgetBurn"
        runbook = "error-budget-burn"
    else:
        budget = 1 - LATENCY_SLO
        record = "aeterna:grpc_server_slow:ratio_rate"
        what = f"RPCs slower than {LATENCY_THRESHOLD_S} s (SLO {LATENCY_SLO:.0%} within it)"
        name = f"Aeterna{title}LatencyBudgetBurn"
        runbook = "latency-budget-burn"
    alerts = []
    for severity, for_, pairs in BURN_RATES:
        terms = [
            f'(\n  {record}{long}{{job="{job}"}} > {round(rate * budget, 6)}\n'
            f'  and\n  {record}{short}{{job="{job}"}} > {round(rate * budget, 6)}\n)'
            for long, short, rate in pairs
        ]
        windows = " or ".join(f"{rate}x over {long} and {short}" for long, short, rate in pairs)
        alerts.append(
            _alert(
                name,
                "\nor\n".join(terms),
                severity=severity,
                for_=for_,
                summary=f"{service}: {what} burn the 30-day budget too fast",
                description=(
                    f"The share of {what.split(' (')[0]} exceeds the budget ({budget:.3g}) "
                    f"{windows}: at this rate the 30-day budget runs out early."
                ),
                runbook=runbook,
            )
        )
    return alerts


def service_rules(service: str) -> dict[str, Any]:
    """The rule groups of one service chart.

    Args:
        service: ``memory``, ``governance``, ``knowledge`` or ``sync``.

    Returns:
        ``{"groups": [...]}`` in Prometheus's rule file format.
    """
    job = f"aeterna-{service}"
    title = service.capitalize()
    sel = f'job="{job}"'
    alerts: list[dict[str, Any]] = [
        *_burn_alerts(service, job, "errors"),
        *_burn_alerts(service, job, "latency"),
        _alert(
            f"Aeterna{title}HighErrorRate",
            f"aeterna:grpc_server_errors:ratio_rate5m{{{sel}}} > 0.05",
            severity="critical",
            for_="5m",
            summary=f"{service}: more than 5 % of RPCs fail with a server error",
            description="{{ $value | humanizePercentage }} of RPCs failed over 5 minutes.",
            runbook="high-error-rate",
        ),
        _alert(
            f"Aeterna{title}HighLatency",
            "histogram_quantile(0.99, sum by (job, le) (rate(grpc_server_handling_seconds_bucket"
            f'{{{sel},grpc_method!~"{STREAMING}"}}[5m]))) > 1',
            severity="warning",
            for_="5m",
            summary=f"{service}: p99 RPC latency above 1 s",
            description="p99 latency is {{ $value | humanizeDuration }} over 5 minutes.",
            runbook="high-latency",
        ),
        _alert(
            f"Aeterna{title}Down",
            f"up{{{sel}}} == 0",
            severity="critical",
            for_="2m",
            summary=f"{service}: a replica's metrics endpoint is unreachable",
            description="{{ $labels.instance }} has not answered scrapes for 2 minutes.",
            runbook="service-down",
        ),
        _alert(
            f"Aeterna{title}RelayLag",
            f"max by (job) (aeterna_events_relay_lag_seconds{{{sel}}}) > 60",
            severity="warning",
            for_="5m",
            summary=f"{service}: events wait more than a minute in the outbox",
            description=(
                "The oldest unpublished outbox row is {{ $value | humanizeDuration }} old: "
                "consumers (audit, caches, sync) see changes late."
            ),
            runbook="relay-lag",
        ),
        _alert(
            f"Aeterna{title}DeadLetters",
            f"sum by (job, group) (increase(aeterna_events_dead_letters_total{{{sel}}}[10m])) > 0",
            severity="warning",
            summary=f"{service}: events moved to a dead-letter stream",
            description=(
                "Consumer group {{ $labels.group }} dead-lettered {{ $value }} events in 10 "
                "minutes; they are not applied until replayed."
            ),
            runbook="dead-letters",
        ),
        _alert(
            f"Aeterna{title}PodRestarts",
            "sum by (namespace, pod) (increase(kube_pod_container_status_restarts_total"
            f'{{pod=~"{job}-.*"}}[30m])) > 2',
            severity="warning",
            summary=f"{service}: a pod restarted more than twice in 30 minutes",
            description="{{ $labels.pod }} restarted {{ $value }} times (kube-state-metrics).",
            runbook="pod-restarts",
        ),
        _alert(
            f"Aeterna{title}DbPoolExhausted",
            "max by (job, instance, role) (\n"
            f'  aeterna_db_pool_connections{{{sel},state="in_use"}}\n'
            f"  / on (job, instance, role) aeterna_db_pool_max_connections{{{sel}}}\n"
            ") >= 0.9",
            severity="warning",
            for_="5m",
            summary=f"{service}: a PostgreSQL pool is at 90 % or more of its size",
            description=(
                "{{ $labels.instance }} uses {{ $value | humanizePercentage }} of its "
                "{{ $labels.role }} pool: requests queue for connections."
            ),
            runbook="db-pool-exhausted",
        ),
        _alert(
            f"Aeterna{title}JwksFetchFailures",
            f"increase(aeterna_auth_jwks_fetch_failures_total{{{sel}}}[10m]) > 0",
            severity="warning",
            summary=f"{service}: the JWKS that verifies tokens could not be read",
            description=(
                "{{ $labels.instance }} failed to fetch its JWKS; tokens signed with a new key "
                "are refused until it succeeds."
            ),
            runbook="jwks-fetch-failures",
        ),
        _alert(
            f"Aeterna{title}JobFailures",
            "sum by (job, instance, task) (increase(aeterna_job_runs_total"
            f'{{{sel},result="failure"}}[30m])) > 2',
            severity="warning",
            summary=f"{service}: a periodic job keeps failing",
            description="Job {{ $labels.task }} failed {{ $value }} times in 30 minutes.",
            runbook="job-failures",
        ),
    ]
    if service != "governance":
        alerts.append(
            _alert(
                f"Aeterna{title}AuthzDirectoryErrors",
                f'increase(aeterna_authz_cache_lookups_total{{{sel},result="error"}}[10m]) > 0',
                severity="warning",
                summary=f"{service}: role bindings could not be read from governance",
                description=(
                    "{{ $labels.instance }} serves cached bindings or refuses decisions that "
                    "need them (UNAVAILABLE)."
                ),
                runbook="authz-directory-errors",
            )
        )
    if service == "memory":
        alerts.append(
            _alert(
                "AeternaMemoryIndexLag",
                f"max by (job, instance) (aeterna_index_lag_seconds{{{sel}}}) > 30",
                severity="warning",
                for_="5m",
                summary="memory: a replica's index is more than 30 s behind PostgreSQL",
                description=(
                    "{{ $labels.instance }}'s embedded index is {{ $value | humanizeDuration }} "
                    "behind: searches wait, or are served marked stale."
                ),
                runbook="index-lag",
            )
        )
    if service == "sync":
        alerts.append(
            _alert(
                "AeternaSyncDeliveryLag",
                "histogram_quantile(0.99, sum by (job, le) (rate(aeterna_sync_delivery_lag_seconds"
                f"_bucket{{{sel}}}[5m]))) > {SYNC_DELIVERY_LAG_S}",
                severity="warning",
                for_="10m",
                summary=(
                    f"sync: p99 live event delivery lag above {SYNC_DELIVERY_LAG_S} s "
                    "for 10 minutes"
                ),
                description=(
                    "Subscribers receive changes {{ $value | humanizeDuration }} after their "
                    "commit (p99 over 5 minutes, commit to send)."
                ),
                runbook="sync-delivery-lag",
            )
        )
    return {
        "groups": [
            {"name": f"aeterna-{service}-slo", "interval": "30s", "rules": _slo_records(job)},
            {"name": f"aeterna-{service}-alerts", "rules": alerts},
        ]
    }


def gateway_rules() -> dict[str, Any]:
    """The gateway chart's rule groups (Envoy's own metrics, ``job="aeterna-gateway"``)."""
    sel = 'job="aeterna-gateway"'
    alerts = [
        _alert(
            "AeternaGatewayDown",
            f"up{{{sel}}} == 0",
            severity="critical",
            for_="2m",
            summary="gateway: an Envoy's stats endpoint is unreachable",
            description="{{ $labels.instance }} has not answered scrapes for 2 minutes.",
            runbook="service-down",
        ),
        _alert(
            "AeternaGatewayUpstreamErrors",
            "sum by (job, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_xx"
            f'{{{sel},envoy_response_code_class="5"}}[5m]))\n/\n'
            "sum by (job, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total"
            f"{{{sel}}}[5m])) > 0.05",
            severity="critical",
            for_="5m",
            summary="gateway: more than 5 % of upstream requests fail",
            description=(
                "{{ $value | humanizePercentage }} of requests to {{ $labels.envoy_cluster_name }}"
                " answer 5xx."
            ),
            runbook="high-error-rate",
        ),
        _alert(
            "AeternaGatewayCertificateExpiry",
            f"min by (job, instance) (envoy_server_days_until_first_cert_expiring{{{sel}}}) < 14",
            severity="warning",
            summary="gateway: a TLS certificate expires in less than 14 days",
            description="The first certificate expires in {{ $value }} days.",
            runbook="certificate-expiry",
        ),
        _alert(
            "AeternaGatewayJwksFetchFailures",
            "sum by (job, instance) (increase(envoy_http_jwt_authn_jwks_fetch_failed"
            f"{{{sel}}}[10m])) > 0",
            severity="warning",
            summary="gateway: Envoy could not fetch a JWKS",
            description="jwt_authn failed to fetch the JWKS on {{ $labels.instance }}.",
            runbook="jwks-fetch-failures",
        ),
        _alert(
            "AeternaGatewayPodRestarts",
            "sum by (namespace, pod) (increase(kube_pod_container_status_restarts_total"
            '{pod=~"aeterna-gateway-.*"}[30m])) > 2',
            severity="warning",
            summary="gateway: a pod restarted more than twice in 30 minutes",
            description="{{ $labels.pod }} restarted {{ $value }} times (kube-state-metrics).",
            runbook="pod-restarts",
        ),
    ]
    return {"groups": [{"name": "aeterna-gateway-alerts", "rules": alerts}]}


def rule_files() -> dict[str, dict[str, Any]]:
    """Repository-relative path → rule file contents, for every chart."""
    files = {f"charts/{s}/{RULES_FILE}": service_rules(s) for s in SERVICES}
    files[f"charts/gateway/{RULES_FILE}"] = gateway_rules()
    return files


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(rules: dict[str, Any]) -> str:
    """The rule file's text (block scalars for multi-line expressions, stable order)."""
    header = "# Generated by scripts/gen_alerts.py (make gen): edit the script, not this file.\n"
    return header + yaml.dump(rules, Dumper=_Dumper, sort_keys=False, width=100)


def main() -> int:
    """Write every chart's rule file."""
    for path, rules in rule_files().items():
        (ROOT / path).write_text(dump(rules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
