"""How log lines look on standard error: the IoT Edge format, plain text or JSON lines.

`iotedge logs` and the `GetModuleLogs` direct method filter a module's output by syslog
severity, which they read from a prefix on each line:

    <6> 2026-11-30 03:24:04.123 +00:00 spyrus_hsm: HSM ready: token 'edge' (serial 1234)

(`<3>` error ... `<7>` debug; the time is UTC with milliseconds.) A line without the prefix is
taken as informational, so a traceback's continuation lines carry the prefix too: filtering by
severity keeps them with their message. `auto` uses that format when the edge runtime started
the process (the IOTEDGE_* variables are set) and plain text otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from typing import Literal

from . import times
from .errors import one_line

LogFormat = Literal["auto", "iotedge", "plain", "json"]
PLAIN = "%(levelname)s %(name)s: %(message)s"
EDGE_MARKER = "IOTEDGE_MODULEID"  # set by the edge runtime in every module it starts
PACKAGE = "spyrus_hsm"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def syslog_severity(levelno: int) -> int:
    """RFC 5424 severity for a Python level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class IotEdgeFormatter(logging.Formatter):
    """`<N> YYYY-MM-DD HH:MM:SS.fff +00:00 logger: message`, every line of it prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        prefix = f"<{syslog_severity(record.levelno)}> {when:%Y-%m-%d %H:%M:%S}.{int(record.msecs):03d} +00:00 "
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, severity, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry = {"time": times.iso(when, "milliseconds"), "level": record.levelname.lower(),
                 "severity": syslog_severity(record.levelno), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ForeignTracebacks(logging.Filter):
    """A library's exception (azure-iot-device, paho-mqtt, aiohttp, OpenSSL's through ssl)
    logged at INFO or above becomes one line, `message (Type: reason)`: its traceback says
    nothing an operator can act on, and what we do about it is logged by our own code. Our own
    records keep their tracebacks, and so does everything at DEBUG, and so does a library's
    record of an exception raised in our code (asyncio's "Exception in callback", aiohttp's
    "Error handling request" about our handler or middleware): that is a bug of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or record.name.startswith(PACKAGE):
            return True
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None and not raised_in_our_code(exc):
                record.msg = f"{record.getMessage()} ({one_line(exc)})"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        elif TRACEBACK in (text := record.getMessage()) and _PACKAGE_DIR not in text:
            # A traceback formatted into the message itself (azure-iot-device logs its transport's
            # failures so, at INFO): its exception lines only.
            record.msg = _exception_lines(text)
            record.args = None
        return True


TRACEBACK = "Traceback (most recent call last):"


def _exception_lines(text: str) -> str:
    """`text` holding formatted tracebacks as one line: what came before them, then each
    exception's own line (unindented, neither the header nor a "the above exception" line)."""
    before, _, rest = text.partition(TRACEBACK)
    lines = [line.strip() for line in rest.splitlines()
             if line.strip() and not line.startswith((" ", "\t")) and line.strip() != TRACEBACK.strip()
             and not line.startswith(("The above exception", "During handling"))]
    head = before.strip()
    return (f"{head} " if head else "") + "(" + "; ".join(lines) + ")"


def raised_in_our_code(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback (where it was raised) is the package's."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def resolve(fmt: LogFormat, env: Mapping[str, str]) -> Literal["iotedge", "plain", "json"]:
    if fmt == "auto":
        return "iotedge" if env.get(EDGE_MARKER) else "plain"
    return fmt


def formatter(fmt: Literal["iotedge", "plain", "json"]) -> logging.Formatter:
    if fmt == "iotedge":
        return IotEdgeFormatter()
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(PLAIN)


def apply(fmt: LogFormat, env: Mapping[str, str]) -> str:
    """Give every handler of the root logger the chosen format; returns the format used."""
    chosen = resolve(fmt, env)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(chosen))
        if not any(isinstance(f, ForeignTracebacks) for f in handler.filters):
            handler.addFilter(ForeignTracebacks())
    return chosen
