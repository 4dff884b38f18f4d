"""A local OTLP/gRPC trace receiver that appends every span to a JSON-lines file.

No OpenTelemetry Collector binary exists on a development machine, and Envoy cannot write
spans to a file: the local stack runs this receiver (the OTLP ``TraceService/Export`` RPC of
``opentelemetry-proto``, the same one a Collector serves on 4317), and the services and the
gateway Envoy export to it. Each line of the file is one span::

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex or empty>",
     "name": "...", "kind": "SERVER", "service": "aeterna-memory",
     "start_unix_nano": 1, "end_unix_nano": 2, "status": "UNSET",
     "attributes": {"key": value, ...}}
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def span_records(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """The spans of an OTLP export request as flat JSON-ready dicts (see the module docstring).

    Args:
        request: One ``ExportTraceServiceRequest``.

    Returns:
        One dict per span, in the request's order.
    """
    out: list[dict[str, Any]] = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        "service": service,
                        "scope": ss.scope.name,
                        "start_unix_nano": span.start_time_unix_nano,
                        "end_unix_nano": span.end_time_unix_nano,
                        "status": trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                    }
                )
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.spans = 0

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        records = span_records(request)
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self.lock, self.path.open("a", encoding="utf-8") as out:
            out.write(text)
            self.spans += len(records)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpFileReceiver:
    """Serves OTLP/gRPC trace export on loopback and appends the spans to ``path``.

    Args:
        path: The JSON-lines file (created with its directory; appended to).
        host: Address to bind (loopback).
        port: Port; 0 picks a free one (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, path: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.path = path
        self.host = host
        self.port = port
        self._service = _TraceService(path)
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """The OTLP endpoint URL for exporters, ``http://127.0.0.1:PORT`` (plaintext)."""
        return f"http://{self.host}:{self.port}"

    @property
    def spans_received(self) -> int:
        """Spans written so far by this receiver."""
        return self._service.spans

    def start(self) -> Self:
        """Bind and serve in background threads.

        Raises:
            RuntimeError: The port cannot be bound.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self._service, server
        )
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving (exports in flight get a second)."""
        if self._server is not None:
            self._server.stop(1.0).wait()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_spans(path: Path) -> Iterator[dict[str, Any]]:
    """The spans of a JSON-lines trace file, oldest first (a partly written last line is
    skipped).

    Args:
        path: File written by :class:`OtlpFileReceiver`.
    """
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.endswith("\n"):
                yield json.loads(line)
