"""Generate the Grafana dashboards as code (PyPI ``grafana-foundation-sdk``).

One overview (``charts/gateway/files/dashboards/aeterna-overview.json``: every service's RED
metrics, the gateway, firing alerts) and one dashboard per service
(``charts/<service>/files/dashboards/aeterna-<service>.json``). The charts ship them as
ConfigMaps labelled for Grafana's dashboard sidecar (``dashboards.enabled``). Queries select
``job="aeterna-<service>"`` as the charts' ServiceMonitors and PodMonitor set it, and never
group by tenant (no metric has a tenant label).

Usage: ``python scripts/gen_dashboards.py`` (part of ``make gen``; ``make check-gen`` fails when
the committed JSON is stale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("memory", "governance", "knowledge", "sync")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
WIDTH = 8
HEIGHT = 8


def _query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).ref_id(ref)
    return query.legend_format(legend) if legend else query


def _series(
    title: str, unit: str, *queries: tuple[str, str], description: str = "", width: int = WIDTH
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(HEIGHT)
        .fill_opacity(10)
    )
    if description:
        panel = panel.description(description)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _stat(title: str, unit: str, expr: str, description: str = "") -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(6)
        .height(4)
        .with_target(_query(expr))
    )
    return panel.description(description) if description else panel


def _base(title: str, uid: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["aeterna"])
        .timezone("browser")
        .refresh("30s")
        .time("now-3h", "now")
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )


def _red(service: str, job: str) -> list[timeseries.Panel]:
    sel = f'job="{job}"'
    return [
        _series(
            f"{service}: requests/s by method",
            "reqps",
            (
                f"sum by (grpc_method) (rate(grpc_server_handled_total{{{sel}}}[{RATE}]))",
                "{{grpc_method}}",
            ),
        ),
        _series(
            f"{service}: errors/s by code",
            "reqps",
            (
                "sum by (grpc_code) (rate(grpc_server_handled_total"
                f'{{{sel},grpc_code!="OK"}}[{RATE}]))',
                "{{grpc_code}}",
            ),
            description="Every non-OK code; the SLO counts only server-side codes.",
        ),
        _series(
            f"{service}: latency p50 / p99",
            "s",
            (
                "histogram_quantile(0.5, sum by (le) (rate(grpc_server_handling_seconds_bucket"
                f"{{{sel}}}[{RATE}])))",
                "p50",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(grpc_server_handling_seconds_bucket"
                f"{{{sel}}}[{RATE}])))",
                "p99",
            ),
        ),
    ]


def service_dashboard(service: str) -> db.Dashboard:
    """The dashboard of one service: RED per method, SLO burn, events, authorization,
    pools and jobs (and the index and embedding cache for memory, stream subscribers and
    delivery lag for sync)."""
    job = f"aeterna-{service}"
    sel = f'job="{job}"'
    dash = _base(
        f"Aeterna / {service}",
        f"aeterna-{service}",
        f"The {service} service: requests, SLOs, events, authorization and resources.",
    )
    dash = dash.with_row(db.Row("Requests (RED) and SLOs"))
    for panel in _red(service, job):
        dash = dash.with_panel(panel)
    dash = dash.with_panel(
        _series(
            "error budget burn rate (99.9 % availability)",
            "none",
            (f"aeterna:grpc_server_errors:ratio_rate1h{{{sel}}} / 0.001", "1 h"),
            (f"aeterna:grpc_server_errors:ratio_rate6h{{{sel}}} / 0.001", "6 h"),
            (f"aeterna:grpc_server_errors:ratio_rate1d{{{sel}}} / 0.001", "1 d"),
            description="1 = spending exactly the 30-day budget; the page fires at 14.4 (1 h).",
            width=12,
        )
    ).with_panel(
        _series(
            "latency budget burn rate (99 % within 0.5 s)",
            "none",
            (f"aeterna:grpc_server_slow:ratio_rate1h{{{sel}}} / 0.01", "1 h"),
            (f"aeterna:grpc_server_slow:ratio_rate6h{{{sel}}} / 0.01", "6 h"),
            (f"aeterna:grpc_server_slow:ratio_rate1d{{{sel}}} / 0.01", "1 d"),
            width=12,
        )
    )
    dash = (
        dash.with_row(db.Row("Events (outbox → Redis Streams → consumers)"))
        .with_panel(
            _series(
                "relay lag",
                "s",
                (f"max(aeterna_events_relay_lag_seconds{{{sel}}})", "seconds"),
                description="Age of the oldest outbox row not yet published.",
            )
        )
        .with_panel(
            _series(
                "relay lag (positions) and publish rate",
                "short",
                (f"max(aeterna_events_relay_lag_positions{{{sel}}})", "positions behind"),
                (f"sum(rate(aeterna_events_published_total{{{sel}}}[{RATE}]))", "published/s"),
            )
        )
        .with_panel(
            _series(
                "consumers: handled, failed, dead-lettered",
                "short",
                (
                    f"sum by (group) (rate(aeterna_events_handled_total{{{sel}}}[{RATE}]))",
                    "{{group}} handled/s",
                ),
                (
                    f"sum by (group) (rate(aeterna_events_consumer_errors_total{{{sel}}}[{RATE}]))",
                    "{{group}} errors/s",
                ),
                (
                    "sum by (group) (increase(aeterna_events_dead_letters_total"
                    f"{{{sel}}}[{RATE}]))",
                    "{{group}} dead letters",
                ),
            )
        )
    )
    dash = (
        dash.with_row(db.Row("Authorization"))
        .with_panel(
            _series(
                "decisions/s",
                "reqps",
                (
                    "sum by (decision, source) (rate(aeterna_authz_decisions_total"
                    f"{{{sel}}}[{RATE}]))",
                    "{{decision}} ({{source}})",
                ),
            )
        )
        .with_panel(
            _series(
                "bindings cache hit ratio",
                "percentunit",
                (
                    "sum(rate(aeterna_authz_cache_lookups_total"
                    f'{{{sel},result="hit"}}[{RATE}]))\n/\n'
                    f"sum(rate(aeterna_authz_cache_lookups_total{{{sel}}}[{RATE}]))",
                    "hit ratio",
                ),
                (
                    "sum by (result) (rate(aeterna_authz_cache_lookups_total"
                    f'{{{sel},result=~"error|stale"}}[{RATE}]))',
                    "{{result}}/s",
                ),
            )
        )
        .with_panel(
            _series(
                "JWKS fetch failures",
                "short",
                (
                    f"sum(increase(aeterna_auth_jwks_fetch_failures_total{{{sel}}}[{RATE}]))",
                    "failures",
                ),
            )
        )
    )
    dash = (
        dash.with_row(db.Row("Resources and jobs"))
        .with_panel(
            _series(
                "PostgreSQL pool saturation",
                "percentunit",
                (
                    "max by (instance, role) (aeterna_db_pool_connections"
                    f'{{{sel},state="in_use"}}\n/ on (job, instance, role) '
                    f"aeterna_db_pool_max_connections{{{sel}}})",
                    "{{instance}} {{role}}",
                ),
                description="In-use connections over the pool's maximum; alert at 90 %.",
                width=12,
            )
        )
        .with_panel(
            _series(
                "periodic jobs",
                "short",
                (
                    f"sum by (task, result) (increase(aeterna_job_runs_total{{{sel}}}[{RATE}]))",
                    "{{task}} {{result}}",
                ),
                width=12,
            )
        )
    )
    if service == "sync":
        lag = f"rate(aeterna_sync_delivery_lag_seconds_bucket{{{sel}}}[{RATE}])"
        dash = (
            dash.with_row(db.Row("Stream subscribers and lag"))
            .with_panel(
                _series(
                    "subscribers",
                    "short",
                    (f"sum by (instance) (aeterna_sync_subscribers{{{sel}}})", "{{instance}}"),
                    description="Open Subscribe streams per replica.",
                )
            )
            .with_panel(
                _series(
                    "events delivered/s",
                    "short",
                    (
                        "sum by (phase) (rate(aeterna_sync_events_delivered_total"
                        f"{{{sel}}}[{RATE}]))",
                        "{{phase}}",
                    ),
                    (
                        f"sum(increase(aeterna_sync_subscriber_overflows_total{{{sel}}}[{RATE}]))",
                        "ended for lag",
                    ),
                    description=(
                        "Events sent to subscribers (catchup: backlog after a resume cursor), "
                        "and subscribers ended with RESOURCE_EXHAUSTED for falling behind."
                    ),
                )
            )
            .with_panel(
                _series(
                    "delivery lag (commit → send)",
                    "s",
                    (f"histogram_quantile(0.5, sum by (le) ({lag}))", "p50"),
                    (f"histogram_quantile(0.99, sum by (le) ({lag}))", "p99"),
                    description="Live events only; the alert fires at p99 > 5 s for 10 min.",
                )
            )
        )
    if service == "memory":
        dash = (
            dash.with_row(db.Row("Index and embedding cache"))
            .with_panel(
                _series(
                    "index lag",
                    "s",
                    (f"max by (instance) (aeterna_index_lag_seconds{{{sel}}})", "{{instance}}"),
                    description="Age of the oldest outbox change not applied to the index.",
                )
            )
            .with_panel(
                _series(
                    "index lag (positions)",
                    "short",
                    (
                        f"max by (instance) (aeterna_index_lag_positions{{{sel}}})",
                        "{{instance}}",
                    ),
                )
            )
            .with_panel(
                _series(
                    "embedding cache hit ratio",
                    "percentunit",
                    (
                        "sum(rate(aeterna_embedding_cache_lookups_total"
                        f'{{{sel},result="hit"}}[{RATE}]))\n/\n'
                        f"sum(rate(aeterna_embedding_cache_lookups_total{{{sel}}}[{RATE}]))",
                        "hit ratio",
                    ),
                )
            )
        )
    return dash


def overview_dashboard() -> db.Dashboard:
    """Every service at a glance, the gateway, and the Aeterna alerts firing now."""
    dash = _base(
        "Aeterna / Overview",
        "aeterna-overview",
        "Every Aeterna service's requests, errors and latency, the gateway, and firing alerts.",
    )
    dash = dash.with_row(db.Row("Now"))
    for service in SERVICES:
        dash = dash.with_panel(
            _stat(
                f"{service} error ratio (5 m)",
                "percentunit",
                f'aeterna:grpc_server_errors:ratio_rate5m{{job="aeterna-{service}"}}',
            )
        )
    dash = dash.with_panel(
        _stat(
            "gateway: days to certificate expiry",
            "d",
            'min(envoy_server_days_until_first_cert_expiring{job="aeterna-gateway"})',
        )
    )
    for service in SERVICES:
        dash = dash.with_row(db.Row(service))
        for panel in _red(service, f"aeterna-{service}"):
            dash = dash.with_panel(panel)
    gw = 'job="aeterna-gateway"'
    dash = (
        dash.with_row(db.Row("Gateway"))
        .with_panel(
            _series(
                "downstream requests/s",
                "reqps",
                (
                    "sum(rate(envoy_http_downstream_rq_total"
                    f'{{{gw},envoy_http_conn_manager_prefix="ingress"}}[{RATE}]))',
                    "requests/s",
                ),
            )
        )
        .with_panel(
            _series(
                "upstream 5xx ratio by service",
                "percentunit",
                (
                    "sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_xx"
                    f'{{{gw},envoy_response_code_class="5"}}[{RATE}]))\n/\n'
                    "sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total"
                    f"{{{gw}}}[{RATE}]))",
                    "{{envoy_cluster_name}}",
                ),
            )
        )
        .with_panel(
            _series(
                "retries and ejected hosts",
                "short",
                (
                    "sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry"
                    f"{{{gw}}}[{RATE}]))",
                    "{{envoy_cluster_name}} retries/s",
                ),
                (
                    "sum by (envoy_cluster_name) "
                    f"(envoy_cluster_outlier_detection_ejections_active{{{gw}}})",
                    "{{envoy_cluster_name}} ejected",
                ),
            )
        )
    )
    dash = dash.with_row(db.Row("Alerts")).with_panel(
        table.Panel()
        .title("Aeterna alerts firing")
        .datasource(DATASOURCE)
        .span(24)
        .height(8)
        .with_target(
            _query('ALERTS{alertstate="firing", alertname=~"Aeterna.*"}')
            .instant()
            .format(PromQueryFormat.TABLE)
        )
    )
    return dash


def dashboard_files() -> dict[str, str]:
    """Repository-relative path → dashboard JSON text."""
    files = {
        f"charts/{s}/files/dashboards/aeterna-{s}.json": _dump(service_dashboard(s))
        for s in SERVICES
    }
    files["charts/gateway/files/dashboards/aeterna-overview.json"] = _dump(overview_dashboard())
    return files


def _dump(dashboard: db.Dashboard) -> str:
    return json.dumps(dashboard.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main() -> int:
    """Write every dashboard, removing stale ones."""
    files = dashboard_files()
    for stale in ROOT.glob("charts/*/files/dashboards/*.json"):
        if str(stale.relative_to(ROOT)) not in files:
            stale.unlink()
    for path, text in files.items():
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
