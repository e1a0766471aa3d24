"""Log line formats: the IoT Edge prefix (`<N> YYYY-MM-DD HH:MM:SS.fff +00:00 `) that `iotedge
logs` and GetModuleLogs filter on, JSON lines, and which one `auto` picks."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from spyrus_hsm.logformat import ForeignTracebacks, IotEdgeFormatter, JsonFormatter, resolve

PREFIX = re.compile(r"^<(\d)> (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}) \+00:00 ")


def record(level: int, message: str = "hello %s", exc: bool = False,
           name: str = "spyrus_hsm.test") -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(name, level, __file__, 1, message, ("world",), exc_info)
    rec.created, rec.msecs = 1_790_000_000.25, 250.0  # 2026-09-21 14:13:20.250 UTC
    return rec


@pytest.mark.parametrize(("level", "severity"), [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                                                 (logging.INFO, 6), (logging.DEBUG, 7), (5, 7)])
def test_each_level_gets_its_syslog_severity_and_a_utc_timestamp(level: int, severity: int) -> None:
    line = IotEdgeFormatter().format(record(level))
    match = PREFIX.match(line)
    assert match, line
    assert int(match.group(1)) == severity
    assert match.group(2) == "2026-09-21 14:13:20.250"
    assert line.endswith("spyrus_hsm.test: hello world")


def test_every_line_of_a_traceback_carries_the_prefix() -> None:
    lines = IotEdgeFormatter().format(record(logging.ERROR, exc=True)).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3> 2026-09-21 14:13:20.250 +00:00 ") for line in lines)
    assert lines[-1].endswith("ValueError: boom")


def test_json_lines_are_one_object_each() -> None:
    entry = json.loads(JsonFormatter().format(record(logging.WARNING)))
    assert entry == {"time": "2026-09-21T14:13:20.250Z", "level": "warning", "severity": 4,
                     "logger": "spyrus_hsm.test", "message": "hello world"}
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record(logging.ERROR, exc=True)))["exception"]


def test_auto_is_the_iot_edge_format_only_under_the_edge_runtime() -> None:
    assert resolve("auto", {"IOTEDGE_MODULEID": "spyrus_hsm"}) == "iotedge"
    assert resolve("auto", {}) == "plain"
    assert resolve("json", {"IOTEDGE_MODULEID": "spyrus_hsm"}) == "json"


@pytest.mark.parametrize("fmt", [IotEdgeFormatter(), JsonFormatter(), logging.Formatter("%(name)s: %(message)s")])
def test_a_librarys_exception_is_one_line_and_ours_keeps_its_traceback(fmt: logging.Formatter) -> None:
    foreign = record(logging.ERROR, exc=True, name="azure.iot.device.common.mqtt_transport")
    assert ForeignTracebacks().filter(foreign)
    text = fmt.format(foreign)
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "hello world (ValueError: boom)" in text
    ours = record(logging.ERROR, exc=True)
    ForeignTracebacks().filter(ours)
    assert "Traceback" in fmt.format(ours)
    debug = record(logging.DEBUG, exc=True, name="paho.mqtt.client")
    ForeignTracebacks().filter(debug)
    assert "Traceback" in fmt.format(debug), "at DEBUG a library's traceback is kept"


@pytest.mark.parametrize("logger", ["asyncio", "aiohttp.server", "azure.iot.device.common.handle_exceptions"])
def test_a_librarys_record_of_an_exception_raised_in_our_code_keeps_its_traceback(logger: str) -> None:
    """asyncio's "Exception in callback" and aiohttp's "Error handling request" about one of our
    callbacks or middlewares: before, cut to one line like any library error."""
    from spyrus_hsm.config_fields import ConfigError, typed

    try:
        typed(int, "not a number", "service.port", "test")  # raises in the package's own frame
    except ConfigError:
        exc_info = sys.exc_info()
    ours = logging.LogRecord(logger, logging.ERROR, __file__, 1, "Exception in callback %s", ("cb",), exc_info)
    ForeignTracebacks().filter(ours)
    text = logging.Formatter("%(message)s").format(ours)
    assert "Traceback" in text and "config_fields.py" in text, text


def test_a_traceback_a_library_formats_into_its_message_becomes_its_exception_lines() -> None:
    """azure-iot-device logs its transport's failures as `logger.info(traceback.format_exc())`."""
    import traceback

    try:
        try:
            raise OSError("[SSL] EVP lib")
        except OSError as cause:
            raise ConnectionError("Could not connect") from cause
    except ConnectionError:
        text = traceback.format_exc()
    foreign = logging.LogRecord("azure.iot.device.common", logging.INFO, __file__, 1, "transport: %s", (text,), None)
    assert ForeignTracebacks().filter(foreign)
    line = foreign.getMessage()
    assert "\n" not in line and "Traceback" not in line
    assert line == "transport: (OSError: [SSL] EVP lib; ConnectionError: Could not connect)"
    debug = logging.LogRecord("azure.iot.device.common", logging.DEBUG, __file__, 1, "%s", (text,), None)
    ForeignTracebacks().filter(debug)
    assert "Traceback" in debug.getMessage()  # everything at DEBUG keeps it
