"""structlog configuration: JSON in production, console in development, with the tenant and
request id of the current request bound by the interceptor (``structlog.contextvars``), and the
``trace_id`` and ``span_id`` of the current span
(:func:`~aeterna_common.telemetry.add_trace_context`)."""

from __future__ import annotations

import logging
import sys

import structlog

from aeterna_common.telemetry import add_trace_context


def configure_logging(level: str = "info", json: bool = False) -> None:
    """Configure structlog and the standard library root logger.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        json: Render JSON lines instead of the console format.
    """
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s", force=True)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
