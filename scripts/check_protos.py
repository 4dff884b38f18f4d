"""``make lint-protos``: buf lint on the contracts, and buf breaking against main.

buf cannot fetch ``buf.build/googleapis/googleapis`` offline, so the inputs are images built
with protoc (grpcio-tools), which finds ``google/api/*`` in the googleapis-common-protos wheel
and ``google/protobuf/*`` in grpcio-tools; buf then lints only ``aeterna/``. The rules are in
``protos/buf.yaml``.

The breaking check compares with ``$AETERNA_PROTO_BASE`` when set, else the merge base of
HEAD and ``main``; on ``main`` itself (merge base = HEAD) it compares with HEAD's first parent,
so every commit that lands must read what the one before it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "protos" / "buf.yaml"
BUF = Path(sys.executable).parent / "buf"


def build_image(protos: Path, out: Path) -> None:
    """Compile every ``.proto`` under ``protos`` into a FileDescriptorSet at ``out``.

    Raises:
        SystemExit: protoc failed.
    """
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(google.api.__path__[0]).parent.parent
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{protos}",
            f"-I{well_known}",
            f"-I{googleapis}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed on {protos}")


def git(*args: str) -> str:
    """Run git in the repository; return its stripped stdout."""
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def base_commit() -> str | None:
    """The commit to compare with (see the module docstring); None when there is none."""
    if env := os.environ.get("AETERNA_PROTO_BASE"):
        return env
    head = git("rev-parse", "HEAD")
    try:
        base = git("merge-base", "HEAD", "main")
    except subprocess.CalledProcessError:
        base = head
    if base == head:
        try:
            base = git("rev-parse", "HEAD^")
        except subprocess.CalledProcessError:
            return None  # the first commit: nothing to compare with
    return base


def buf(*args: str, cwd: Path) -> int:
    """Run buf; its findings go to stdout."""
    return subprocess.run([str(BUF), *args], cwd=cwd, check=False).returncode


def main() -> int:
    """Lint, then check for breaking changes; exit non-zero on any finding."""
    with tempfile.TemporaryDirectory(prefix="aeterna-buf-") as tmp:
        work = Path(tmp)
        head_image = work / "head.binpb"
        build_image(ROOT / "protos", head_image)
        common = ["--config", str(CONFIG), "--exclude-path", "google"]
        if buf("lint", str(head_image), *common, cwd=work) != 0:
            print("buf lint: findings above (rules in protos/buf.yaml)")
            return 1
        print("buf lint: clean")
        base = base_commit()
        if base is None:
            print("buf breaking: no earlier commit to compare with")
            return 0
        old = work / "base"
        old.mkdir()
        listed = git("ls-tree", "-r", "--name-only", base, "--", "protos")
        if not any(name.endswith(".proto") for name in listed.splitlines()):
            print(f"buf breaking: {base[:12]} has no contracts to compare with")
            return 0
        archive = subprocess.run(
            ["git", "archive", base, "protos"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        base_image = work / "base.binpb"
        build_image(old / "protos", base_image)
        shutil.rmtree(old)
        if buf("breaking", str(head_image), "--against", str(base_image), *common, cwd=work):
            print(f"buf breaking: wire-incompatible changes against {base[:12]} (above)")
            return 1
        print(f"buf breaking: compatible with {base[:12]}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
