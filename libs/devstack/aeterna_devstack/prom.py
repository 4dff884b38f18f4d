"""Prometheus for the local stack: scrapes every replica and Envoy on loopback and loads the
charts' alert rules, when the ``prometheus`` binary is installed (Debian package
``prometheus``; ``make deps-system`` installs it).

Jobs are named as in Kubernetes (``aeterna-memory``, ``aeterna-governance``,
``aeterna-knowledge``, ``aeterna-gateway``), so the charts' rules and dashboards work
unchanged against it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from aeterna_devstack.auth import repo_root
from aeterna_devstack.servers import free_port

RULE_FILES = "charts/*/files/prometheus-rules.yaml"
"""The charts' rule files, relative to the repository (written by ``make gen``)."""


def find_prometheus() -> Path | None:
    """The ``prometheus`` binary on ``PATH``, or None."""
    found = shutil.which("prometheus")
    return Path(found) if found else None


def scrape_config(
    targets: Mapping[str, Sequence[str]],
    *,
    envoy_admin: str | None,
    rule_files: Sequence[str] = (),
    interval_s: int = 5,
) -> dict[str, Any]:
    """A ``prometheus.yml`` scraping the given targets.

    Args:
        targets: Job name (``aeterna-memory``) → ``host:port`` of each replica's ``/metrics``.
        envoy_admin: ``host:port`` of Envoy's admin interface (``/stats/prometheus``), as
            job ``aeterna-gateway``; None: not scraped.
        rule_files: Rule files to load (absolute paths or globs).
        interval_s: Scrape and rule evaluation interval in seconds.

    Returns:
        The configuration as a dict.
    """
    jobs: list[dict[str, Any]] = [
        {"job_name": job, "static_configs": [{"targets": list(hosts)}]}
        for job, hosts in sorted(targets.items())
        if hosts
    ]
    if envoy_admin is not None:
        jobs.append(
            {
                "job_name": "aeterna-gateway",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [envoy_admin]}],
            }
        )
    return {
        "global": {
            "scrape_interval": f"{interval_s}s",
            "evaluation_interval": f"{interval_s}s",
        },
        "rule_files": list(rule_files),
        "scrape_configs": jobs,
    }


class PrometheusProcess:
    """A Prometheus server on loopback with its data under ``state_dir``.

    Args:
        config: ``prometheus.yml`` contents (see :func:`scrape_config`).
        state_dir: Directory for the config, the TSDB and the log.
        port: Listen port on 127.0.0.1; 0 picks a free one.
        binary: The ``prometheus`` binary; found on ``PATH`` when omitted.

    Raises:
        FileNotFoundError: No ``prometheus`` binary.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        state_dir: Path,
        *,
        port: int = 0,
        binary: Path | None = None,
    ) -> None:
        found = binary or find_prometheus()
        if found is None:
            raise FileNotFoundError("no prometheus binary on PATH (make deps-system)")
        self.binary = found
        self.config = dict(config)
        self.state_dir = state_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The web UI and API base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Prometheus's log file."""
        return self.state_dir / "prometheus.log"

    def start(self, timeout_s: float = 30.0) -> Self:
        """Write the config, start the server and wait for ``/-/ready``.

        Raises:
            RuntimeError: It exited or was not ready within ``timeout_s``.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.state_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.state_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=2d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {timeout_s} s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def chart_rule_files() -> list[str]:
    """Absolute paths of the charts' rule files in this checkout."""
    return sorted(str(p) for p in repo_root().glob(RULE_FILES))
