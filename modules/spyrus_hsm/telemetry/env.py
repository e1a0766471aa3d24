"""The OTEL_* variables spyrus-hsm reads itself, validated at start (see the package docstring):
exporters wanted, endpoints, protocol, compression, timeouts in milliseconds, resource
attributes. The SDK reads the rest of its variables on its own."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import Kind, SpyrusError

log = logging.getLogger(__name__)

DEFAULT_EXPORT_TIMEOUT = 2.0  # seconds; the SDK's 10 s is too long to hold a batch for

_SIGNAL_PATHS = {"TRACES": "v1/traces", "METRICS": "v1/metrics"}


class TelemetryConfigError(SpyrusError, ValueError, kind=Kind.CONFIG):
    """An OTEL_* variable holds a value spyrus-hsm cannot use; the message names the variable."""


@dataclass(frozen=True)
class ExporterSettings:
    """Where one signal (traces or metrics) is exported, and the per-export timeout."""

    endpoint: str
    timeout: float  # seconds, per export call including retries


@dataclass(frozen=True)
class TelemetrySettings:
    """What `setup` decides from the environment, validated; the SDK reads the rest itself."""

    traces: ExporterSettings | None
    metrics: ExporterSettings | None
    disabled: bool = False

    @classmethod
    def from_env(cls) -> TelemetrySettings:
        _check_resource_attributes()
        return cls(traces=_exporter_settings("TRACES"), metrics=_exporter_settings("METRICS"),
                   disabled=_flag("OTEL_SDK_DISABLED"))


def _get(keys: Iterable[str]) -> tuple[str, str] | None:
    """The first of `keys` set to a non-blank value, as (key, value)."""
    for key in keys:
        value = os.environ.get(key, "").strip()
        if value:
            return key, value
    return None


def _signal_keys(signal: str, suffix: str) -> tuple[str, str]:
    return f"OTEL_EXPORTER_OTLP_{signal}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"


def _flag(key: str) -> bool:
    value = os.environ.get(key, "").strip().lower()
    if value not in ("", "true", "false"):
        log.warning("%s=%r is neither true nor false; treating it as false", key, os.environ[key])
    return value == "true"


def _timeout(signal: str) -> float:
    """The export timeout in seconds, from a positive number of milliseconds."""
    found = _get(_signal_keys(signal, "TIMEOUT"))
    if found is None:
        return DEFAULT_EXPORT_TIMEOUT
    key, raw = found
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TelemetryConfigError(f"{key}={raw!r} must be a positive number of milliseconds")
    return value / 1000


def _check_resource_attributes() -> None:
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, _ = item.partition("=")
        if item.strip() and (not sep or not key.strip()):
            raise TelemetryConfigError(
                f"OTEL_RESOURCE_ATTRIBUTES: {item.strip()!r} is not key=value (entries are comma-separated)"
            )


def _exporter_settings(signal: str) -> ExporterSettings | None:
    if not _exporter_wanted(signal):
        return None
    endpoint = _endpoint(signal)
    if endpoint is None:
        return None
    _check_choice(signal, "PROTOCOL", ("http/protobuf",),
                  "spyrus-hsm exports OTLP over HTTP; set it to http/protobuf and point the endpoint "
                  "at the collector's HTTP port (usually 4318)")
    _check_choice(signal, "COMPRESSION", ("none", "gzip", "deflate"), "use none, gzip or deflate")
    return ExporterSettings(endpoint=endpoint, timeout=_timeout(signal))


def _exporter_wanted(signal: str) -> bool:
    key = f"OTEL_{signal}_EXPORTER"
    value = os.environ.get(key, "otlp")
    names = {name.strip().lower() for name in value.split(",") if name.strip()} or {"otlp"}
    if names - {"otlp", "none"}:
        raise TelemetryConfigError(f"{key}={value!r}: only 'otlp' and 'none' are supported")
    return "otlp" in names


def _endpoint(signal: str) -> str | None:
    """The URL the SDK will export to, or None when no endpoint is configured."""
    specific_key, general_key = _signal_keys(signal, "ENDPOINT")
    if (found := _get((specific_key,))) is not None:
        key, url = found
    elif (found := _get((general_key,))) is not None:
        key, base = found
        url = f"{base.rstrip('/')}/{_SIGNAL_PATHS[signal]}"
    else:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TelemetryConfigError(f"{key}={url!r} must be an http(s) URL such as http://otel-collector:4318")
    return url


def _check_choice(signal: str, suffix: str, allowed: tuple[str, ...], hint: str) -> None:
    found = _get(_signal_keys(signal, suffix))
    if found is not None and found[1].lower() not in allowed:
        key, value = found
        raise TelemetryConfigError(f"{key}={value!r} is not supported: {hint}")
