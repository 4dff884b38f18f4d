"""Generate the Python SDK (messages, gRPC stubs, .pyi) from protos/ into libs/sdk/.

Also writes ``libs/sdk/aeterna/descriptor_set.pb``, the self-contained descriptor set (imports
and source info included) that Envoy's gRPC-JSON transcoder and server reflection use.

The proto directory equals the Python import path (protos/aeterna/memory/v1 ->
aeterna.memory.v1), so generated imports need no rewriting. Run with ``make gen``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "sdk"


def main() -> int:
    """Regenerate libs/sdk/aeterna from every .proto under protos/."""
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    shutil.rmtree(OUT / "aeterna", ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(sys.modules["google.api"].__path__[0]).parent.parent  # site-packages
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        f"--descriptor_set_out={OUT / 'aeterna' / 'descriptor_set.pb'}",
        # Envoy's gRPC-JSON transcoder resolves google.api.http rules and message types from
        # this set: it needs every import, and source info keeps the comments for reflection.
        "--include_imports",
        "--include_source_info",
        *files,
    ]
    (OUT / "aeterna").mkdir(exist_ok=True)
    code = protoc.main(args)
    if code != 0:
        return int(code)
    for d in {(OUT / f).parent for f in files}:
        while d != OUT:
            (d / "__init__.py").touch()
            (d / "py.typed").touch()
            d = d.parent
    return 0


if __name__ == "__main__":
    import google.api  # noqa: F401  (locates googleapis-common-protos' .proto files)

    raise SystemExit(main())
