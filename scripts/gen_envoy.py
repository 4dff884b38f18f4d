"""Write the Envoy configs the Helm charts ship, or validate every Envoy config with Envoy.

``python scripts/gen_envoy.py`` (run by ``make gen``) renders ``charts/gateway/files/envoy.json``,
``charts/gateway/files/envoy-tls.json`` and ``charts/<service>/files/envoy-sidecar.json`` from
:mod:`aeterna_devstack.envoy`, the code ``make run`` and the tests use. The transcoder's
descriptor comes from ``libs/sdk/aeterna/descriptor_set.pb``, so run ``scripts/gen_protos.py``
first.

``python scripts/gen_envoy.py --validate`` (run by ``make lint-envoy``) checks with
``envoy --mode validate`` the config ``make run`` renders and each committed chart config,
its Helm placeholders filled with example values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from aeterna_devstack.auth import DevAuth
from aeterna_devstack.envoy import (
    EnvoyError,
    chart_config_paths,
    dump_chart_config,
    render_chart_configs,
    validate_chart_config,
    validate_config,
)
from aeterna_devstack.stack import render_stack_envoy_config

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = ROOT / "libs" / "sdk" / "aeterna" / "descriptor_set.pb"


def write() -> int:
    """Render the chart configs into the repository.

    Returns:
        Exit status: 0.

    """
    for relative, config in render_chart_configs(DESCRIPTOR_SET.read_bytes()).items():
        path = ROOT / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_chart_config(config))
        print(f"wrote {relative}")
    return 0


def validate() -> int:
    """Validate the ``make run`` config and the committed chart configs with Envoy.

    Returns:
        Exit status: 0 when Envoy accepts every config, 1 otherwise.

    """
    failed = 0
    with tempfile.TemporaryDirectory(prefix="aeterna-envoy-lint-") as tmp:
        # The ports are examples: validation binds nothing.
        stack = render_stack_envoy_config(
            [50051, 50052],
            port=8080,
            admin_port=9901,
            jwks_path=DevAuth(tmp).jwks_path,
            governance_ports=[50061, 50062],
        )
        checks: list[tuple[str, Callable[[], None]]] = [
            ("make run gateway", partial(validate_config, stack))
        ]
        for relative in chart_config_paths():
            path = ROOT / relative
            if not path.is_file():
                print(f"FAIL {relative}: missing (run make gen)", file=sys.stderr)
                failed += 1
                continue
            checks.append((relative, partial(validate_chart_config, path.read_text())))
        for name, check in checks:
            try:
                check()
            except (EnvoyError, ValueError) as exc:
                print(f"FAIL {name}: {exc}", file=sys.stderr)
                failed += 1
            else:
                print(f"ok   {name}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run.

    Args:
        argv: Command line arguments; None reads ``sys.argv``.

    Returns:
        Exit status.

    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check the make run config and the committed chart configs with envoy --mode validate",
    )
    args = parser.parse_args(argv)
    return validate() if args.validate else write()


if __name__ == "__main__":
    raise SystemExit(main())
