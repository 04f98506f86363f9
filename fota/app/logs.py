"""Logging set-up for the command line (the library itself never configures logging).

JSON lines when stderr is not a terminal (journald, CI, log shippers), a console renderer when
it is. The stdlib loggers of aiocoap (``coap``) and transitions go through the same
processors, so every line, whoever emitted it, has the same keys:

* ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event``;
* the context bound with :func:`structlog.contextvars.bind_contextvars` in the task (or the
  code it called) that logs: the engine binds ``update_id``, ``version`` and ``state``;
* ``exception``: a traceback as one string (in JSON, one line like everything else).

Bound context whose value is None is left out rather than printed as ``null``: the engine
binds ``update_id=None`` between updates, and a line outside an update should not claim a
field it does not have. A None passed explicitly in a log call (``log.info("x", state=None)``)
is kept: the caller meant it.

A stdlib line carries the context of the task that emitted it; aiocoap's own background tasks
(started when the transport was created) carry the context of that moment, not an update's.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

FORMATS = ("auto", "json", "console")
LEVELS = ("debug", "info", "warning", "error", "critical")

#: Stdlib loggers of fota's dependencies, kept one step quieter than fota (see configure).
DEPENDENCY_LOGGERS = ("coap", "coap-server", "transitions")


def merge_contextvars_without_none(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Merge the bound context vars into the event, leaving out those bound to None.

    A key given in the log call wins over a bound one, as with
    :func:`structlog.contextvars.merge_contextvars`.
    """
    for key, value in structlog.contextvars.get_contextvars().items():
        if value is not None:
            event_dict.setdefault(key, value)
    return event_dict


def configure(level: str = "info", format: str = "auto", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib loggers fota's dependencies use, on stderr.

    Replaces the root logger's handlers, so it can be called again (tests, a daemon that read
    its configuration) without doubling lines.

    Args:
        level: the lowest level logged: ``debug``, ``info``, ``warning``, ``error`` or
            ``critical`` (any case). aiocoap and transitions log at WARNING and above unless
            it is ``debug``: they log every message and every callback below that.
        format: ``auto`` (JSON lines unless stderr is a terminal), ``json`` or ``console``.
        json: the older spelling of ``format``: True is ``json``, False ``console``; when
            given it wins over ``format``.

    Raises:
        ValueError: an unknown level or format.
    """
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r}")
    if format not in FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if json is not None:
        format = "json" if json else "console"
    as_json = not _isatty(sys.stderr) if format == "auto" else format == "json"

    # The same chain for structlog's lines and (as foreign_pre_chain) for stdlib records, so
    # both get the same keys, including the bound context: the formatter runs synchronously
    # in the logging call, in the emitting task's context.
    shared: list[Processor] = [
        merge_contextvars_without_none,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if as_json:
        final += [
            # A traceback as a string field: JSON escapes its newlines, so it stays one line.
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(default=_fallback),
        ]
    else:
        # The console renderer formats exc_info itself (and warns if it was rendered before).
        # Plain tracebacks whether or not rich is installed: the same lines everywhere, and
        # `fota` starts without importing rich (fota.app.cli).
        final.append(
            structlog.dev.ConsoleRenderer(
                colors=_isatty(sys.stderr), exception_formatter=structlog.dev.plain_traceback
            )
        )

    structlog.configure(
        processors=[
            # Drops lines below the level before any work is done on them.
            structlog.stdlib.filter_by_level,
            *shared,
            # stack_info=True: the caller's stack. Not in the foreign chain: a stdlib record's
            # stack_info is already text (it stays a field of its own).
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure() must reach loggers that already logged.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Python's warnings (a DeprecationWarning from a dependency) as log lines too, not bare
    # text in the middle of a JSON log.
    logging.captureWarnings(True)
    threshold = logging.getLevelNamesMapping()[name.upper()]
    root.setLevel(threshold)
    # aiocoap logs every message at DEBUG and transitions every callback at INFO: keep them at
    # WARNING unless asked for debug, and never below the level asked for.
    quiet = logging.DEBUG if threshold == logging.DEBUG else max(threshold, logging.WARNING)
    for logger_name in DEPENDENCY_LOGGERS:
        logging.getLogger(logger_name).setLevel(quiet)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _fallback(value: object) -> str:
    # A bound value json cannot encode (a Path, an enum, bytes) must not lose the line.
    return repr(value) if isinstance(value, bytes) else str(value)
