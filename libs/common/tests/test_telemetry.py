"""The metrics endpoint: where it binds by default and how to open it."""

from __future__ import annotations

import urllib.request

import pytest
from aeterna_common.config import CommonSettings
from aeterna_common.telemetry import start_metrics_server
from aeterna_devstack.servers import free_port


def test_metrics_bind_loopback_by_default() -> None:
    settings = CommonSettings(metrics_port=free_port())
    assert settings.metrics_host == "127.0.0.1"
    bound = start_metrics_server(settings.metrics_port, settings.metrics_host)
    assert bound == ("127.0.0.1", settings.metrics_port)
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics") as r:
        assert b"grpc_server_handled_total" in r.read()


def test_metrics_host_setting_opens_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AETERNA_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("AETERNA_METRICS_PORT", str(port))
    settings = CommonSettings()
    assert start_metrics_server(settings.metrics_port, settings.metrics_host) == ("0.0.0.0", port)


def test_metrics_disabled_with_port_zero() -> None:
    assert start_metrics_server(0) is None
