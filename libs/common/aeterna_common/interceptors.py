"""The one server interceptor of every service: request context, errors, metrics.

For each RPC it (1) verifies the bearer token and takes the caller's principal from its claims
only (:class:`~aeterna_common.auth.TokenVerifier`; ``x-aeterna-*`` metadata is ignored), (2)
binds it and the request id into a ContextVar and the log context, (3) maps
:class:`AeternaError` to a ``google.rpc.Status`` with details, a dependency outage to
``UNAVAILABLE`` (:func:`~aeterna_common.errors.outage`: ``DATABASE_UNAVAILABLE``,
``EMBEDDING_UNAVAILABLE``) and any other exception to ``INTERNAL`` (logged, never leaked), and
(4) records ``grpc_server_handled_total`` / ``grpc_server_handling_seconds``.
Infrastructure services (``grpc.health.v1``, reflection) need no token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc_status import rpc_status

from aeterna_common import anomaly
from aeterna_common import context as rc
from aeterna_common.auth import TokenVerifier
from aeterna_common.errors import (
    AeternaError,
    FieldViolation,
    InvalidArgument,
    internal_status,
    outage,
)
from aeterna_common.telemetry import GRPC_HANDLED, GRPC_HANDLING_SECONDS

log = structlog.get_logger("aeterna.rpc")

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods that run without a token: health checks and reflection (as at the edge; the trailing
slash keeps look-alikes such as ``/grpc.health.v1.HealthX/`` behind the token)."""


class _Undecodable:
    """Stands in for a request whose bytes did not parse (bad wire format or invalid UTF-8
    in a string field), so the handler wrapper can answer INVALID_ARGUMENT instead of
    grpcio's generic INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError, or ValueError for bad UTF-8
            return _Undecodable(exc)

    return parse


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            [FieldViolation("request", "not a valid message: malformed bytes or invalid UTF-8")],
            reason="MALFORMED_REQUEST",
        )


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class _Call:
    """Bookkeeping of one RPC: context binding, error mapping, metrics."""

    def __init__(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], verifier: TokenVerifier
    ) -> None:
        self.method = method
        self.verifier = verifier
        self.context = context
        self.service, self.name = _split(method)
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.tenant = ""

    async def begin(self) -> rc.RequestContext:
        md = tuple(self.context.invocation_metadata() or ())
        request_id = rc.request_id_from_metadata(md)
        structlog.contextvars.bind_contextvars(request_id=request_id, method=self.name)
        principal = await self.verifier.authenticate(md)
        structlog.contextvars.bind_contextvars(tenant=principal.tenant_id)
        self.tenant = principal.tenant_id
        return rc.RequestContext(principal=principal, request_id=request_id, method=self.method)

    async def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, AeternaError):
            down = outage(exc)
            if down is not None:
                self.code = down.code
                log.warning("rpc.unavailable", reason=down.reason, error=repr(exc))
                await self.context.abort_with_status(rpc_status.to_status(down.to_status()))
        if isinstance(exc, AeternaError):
            self.code = exc.code
            log.info("rpc.error", code=exc.code.name, reason=exc.reason, message=exc.message)
            await self.context.abort_with_status(rpc_status.to_status(exc.to_status()))
        self.code = grpc.StatusCode.INTERNAL
        log.exception("rpc.internal_error", exc_info=exc)
        await self.context.abort_with_status(rpc_status.to_status(internal_status()))

    def finish(self) -> None:
        code = self.code
        # An abort by the handler itself (context.abort) sets the code on the context.
        ctx_code = self.context.code()
        if code == grpc.StatusCode.OK and isinstance(ctx_code, grpc.StatusCode):
            code = ctx_code
        GRPC_HANDLED.labels(self.service, self.name, code.name).inc()
        elapsed = time.perf_counter() - self.start
        GRPC_HANDLING_SECONDS.labels(self.service, self.name).observe(elapsed)
        # Per-tenant figures go to the anomaly detector, never into metric labels.
        anomaly.TRAFFIC.record(self.tenant, code.name, elapsed)
        structlog.contextvars.clear_contextvars()


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    method: str,
    verifier: TokenVerifier,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context, verifier)
        try:
            with rc.bind(await call.begin()):
                _check_decoded(request)
                return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # context.abort() by the handler itself: already a status
        except Exception as exc:
            await call.fail(exc)
        finally:
            call.finish()

    return handler


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
    method: str,
    verifier: TokenVerifier,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context, verifier)
        try:
            with rc.bind(await call.begin()):
                _check_decoded(request)
                async for item in behavior(request, context):
                    yield item
        except grpc.aio.AbortError:
            raise  # context.abort() by the handler itself: already a status
        except Exception as exc:
            await call.fail(exc)
        finally:
            call.finish()

    return handler


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller, binds the request context, maps errors and records metrics.

    Args:
        verifier: Verifies each call's bearer token.
    """

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Wrap the method handler (see the module docstring)."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        des, ser = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self.verifier), des, ser
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self.verifier), des, ser
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, self.verifier), des, ser
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method, self.verifier), des, ser
        )
