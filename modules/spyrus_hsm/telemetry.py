"""OpenTelemetry for spyrus-hsm: one place that builds the tracer and meter from the standard
OTEL_* variables, exports them over OTLP/HTTP (protobuf), and keeps a slow or dead collector
from ever slowing requests or holding up shutdown.

Why it is shaped like this: a down collector has hung applications and their shutdown
(opentelemetry-python #2024, #4043, #3309). So spans go through a BatchSpanProcessor with a
bounded queue (spans are dropped, never waited for), every export has a short timeout, the SDK's
own atexit hooks are off, and `Telemetry.shutdown` runs the flush on a daemon thread and gives up
at its deadline.

Nothing here records data, signatures, tokens or PINs: `hsm_span` takes only the operation, the
key label and the mechanism, and records an error by its type, never by its message (messages
can quote the data they failed on).

The OpenTelemetry SDK reads its own OTEL_* variables from the process environment (endpoints,
headers, certificates, compression, resource attributes, service name, metric interval,
sampler). This module adds only what the SDK lacks:
    OTEL_SDK_DISABLED=true                 no-op tracer and meter, no providers at all
    OTEL_{TRACES,METRICS}_EXPORTER         otlp (default) or none
    no OTEL_EXPORTER_OTLP[_{TRACES,METRICS}]_ENDPOINT: spans are still created (trace ids reach
        logs and the HTTP layer) but nothing is exported (the SDK would try localhost:4318)
    OTEL_EXPORTER_OTLP[_{TRACES,METRICS}]_TIMEOUT  read in milliseconds, as the spec says (the
        SDK reads seconds); default 2 s, not the SDK's 10 s
    invalid endpoints, protocols other than http/protobuf, unknown compressions and malformed
        OTEL_RESOURCE_ATTRIBUTES are refused at start, naming the variable (the SDK only warns)
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from . import __version__
from .errors import Kind, SpyrusError
from .threads import call_with_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

INSTRUMENTATION_NAME = "spyrus_hsm"

# Span and metric attribute names (the HSM ones are ours; error.type is the semconv one).
HSM_OPERATION = "hsm.operation"
HSM_KEY_LABEL = "hsm.key.label"
HSM_MECHANISM = "hsm.mechanism"
HSM_OUTCOME = "hsm.outcome"
ERROR_TYPE = "error.type"

Outcome = Literal["ok", "error", "cancelled"]

DEFAULT_EXPORT_TIMEOUT = 2.0  # seconds; the SDK's 10 s is too long to hold a batch for
SCHEDULE_DELAY_MILLIS = 1000

# Semantic-conventions buckets for HTTP durations, in seconds.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# SoftHSM signs in well under a millisecond; slow USB tokens take 0.7 s to 10 s.
HSM_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_SIGNAL_PATHS = {"TRACES": "v1/traces", "METRICS": "v1/metrics"}


class TelemetryConfigError(SpyrusError, ValueError, kind=Kind.CONFIG):
    """An OTEL_* variable holds a value spyrus-hsm cannot use; the message names the variable."""


# --- configuration -------------------------------------------------------------------------


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


# --- metrics -------------------------------------------------------------------------------


class Metrics:
    """The package's metric instruments, made once per meter; the service and pool record on them."""

    def __init__(self, meter: Meter) -> None:
        self.http_request_duration: Histogram = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=HTTP_DURATION_BUCKETS,
        )
        self.hsm_operation_duration: Histogram = meter.create_histogram(
            "hsm.operation.duration",
            unit="s",
            description="Duration of PKCS#11 operations, queueing included.",
            explicit_bucket_boundaries_advisory=HSM_DURATION_BUCKETS,
        )
        self.cache_hits: Counter = meter.create_counter(
            "cache.hits", unit="{hit}", description="Answers served from cache."
        )
        self.cache_misses: Counter = meter.create_counter(
            "cache.misses", unit="{miss}", description="Lookups that had to go to the HSM."
        )
        self.signatures: Counter = meter.create_counter(
            "hsm.signatures", unit="{signature}", description="HSM signing operations, by outcome."
        )
        self._sources: dict[str, Callable[[], float | None]] = {}
        self._labelled: dict[str, Callable[[], Iterable[tuple[Mapping[str, str], float]]]] = {}
        for name, unit, description, make in (
            ("hsm.queue.depth", "{call}", "PKCS#11 calls waiting for a worker session.",
             meter.create_observable_gauge),
            ("hsm.queue.limit", "{call}", "PKCS#11 calls that may wait at once (hsm.queue_limit); more are refused.",
             meter.create_observable_gauge),
            ("hsm.ready", "1", "1 while the HSM is ready, 0 otherwise.", meter.create_observable_gauge),
            ("hsm.recoveries", "{recovery}", "Times the HSM came back after being lost.",
             meter.create_observable_counter),
            # A point in time (Unix seconds) per credential, so an alert computes `- time()` itself
            # and one series per label says which credential it is.
            ("certificate.not_after.timestamp", "s",
             "When each X.509 credential in the HSM expires (its notAfter), in seconds since the Unix epoch.",
             meter.create_observable_gauge),
            ("certificate.renewal.consecutive_failures", "{failure}",
             "Renewal attempts of each operational certificate that failed in a row (0 after a success).",
             meter.create_observable_gauge),
            ("audit.dropped", "{record}",
             "Audit records dropped because the audit log's queue was full (non-blocking writes only).",
             meter.create_observable_counter),
        ):
            make(name, callbacks=[self._observer(name)], unit=unit, description=description)

    def watch(self, name: str, source: Callable[[], float | None]) -> None:
        """Report `source()` as the observable instrument `name` at every collection (None: no
        value this time). `source` must be quick and must not touch the HSM."""
        self._sources[name] = source

    def watch_each(self, name: str, source: Callable[[], Iterable[tuple[Mapping[str, str], float]]]) -> None:
        """Like `watch`, one observation per (attributes, value) that `source()` yields."""
        self._labelled[name] = source

    def watch_queue_depth(self, source: Callable[[], int]) -> None:
        """Report `source()` as hsm.queue.depth at every collection (e.g. the pool's queue size)."""
        self.watch("hsm.queue.depth", source)

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            labelled = self._labelled.get(name)
            if labelled is not None:
                return [Observation(value, dict(attributes)) for attributes, value in labelled()]
            source = self._sources.get(name)
            value = None if source is None else source()
            return [] if value is None else [Observation(value)]
        return observe


# --- setup and shutdown --------------------------------------------------------------------


class Telemetry:
    """The configured tracer and meter, and the providers behind them (None when disabled)."""

    def __init__(
        self,
        settings: TelemetrySettings,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        pull_reader: InMemoryMetricReader | None = None,
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer: Tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION_NAME, __version__) if tracer_provider else trace.NoOpTracer()
        )
        self.meter: Meter = (
            meter_provider.get_meter(INSTRUMENTATION_NAME, __version__)
            if meter_provider
            else metrics.NoOpMeter(INSTRUMENTATION_NAME)
        )
        self.metrics = Metrics(self.meter)
        # The pull reader behind the Prometheus endpoint (metrics.py); None when it is off.
        self.pull_reader = pull_reader
        self._closed = False

    def force_flush(self, deadline: float = 3.0) -> bool:
        """Export what is pending; False if that did not finish within `deadline` seconds."""
        millis = int(deadline * 1000)

        def flush() -> None:
            if self.tracer_provider:
                self.tracer_provider.force_flush(millis)
            if self.meter_provider:
                self.meter_provider.force_flush(millis)

        return _within(deadline, "flush", flush)

    def shutdown(self, deadline: float = 3.0) -> bool:
        """Flush and stop exporting; returns within `deadline` seconds whatever the collector does.

        False when the deadline passed first: unsent telemetry is dropped and the exporter
        threads (daemons) are left to time out on their own, so they cannot keep the process up.
        Safe to call twice; also registered with atexit by `setup`.
        """
        if self._closed:
            return True
        self._closed = True
        atexit.unregister(self.shutdown)
        millis = int(deadline * 1000)

        def stop() -> None:
            if self.tracer_provider:
                self.tracer_provider.shutdown()
            if self.meter_provider:
                self.meter_provider.shutdown(timeout_millis=millis)

        finished = _within(deadline, "shutdown", stop)
        if not finished:
            log.warning(
                "telemetry shutdown did not finish within %.1f s (collector %s unreachable or slow?); "
                "unsent spans and metrics were dropped",
                deadline,
                self._endpoints(),
            )
        return finished

    def _endpoints(self) -> str:
        found = [s.endpoint for s in (self.settings.traces, self.settings.metrics) if s is not None]
        return ", ".join(found) or "none"


def _within(deadline: float, what: str, work: Callable[[], None]) -> bool:
    """`work()` bounded by `deadline` seconds; True if it finished (an error is logged)."""
    try:
        call_with_deadline(work, deadline, f"telemetry {what}", f"telemetry-{what}")
    except TimeoutError:
        return False
    except Exception:
        log.exception("telemetry %s failed", what)
    return True


def setup(service_name: str = "spyrus-hsm", *, set_global: bool = False, prometheus: bool = False) -> Telemetry:
    """Build tracing and metrics from the OTEL_* variables of the process environment.

    With set_global=True the providers also become the process-wide ones (what auto-
    instrumentation in other libraries uses); OpenTelemetry allows that once per
    process, so tests leave it False and use `telemetry.tracer` / `telemetry.meter`.
    With prometheus=True the meter also gets a pull reader for the Prometheus endpoint
    (`Telemetry.pull_reader`), whether or not metrics are exported over OTLP.
    Raises TelemetryConfigError naming the variable when one is invalid.
    """
    settings = TelemetrySettings.from_env()
    if settings.disabled:
        return disabled()
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these defaults.
    resource = Resource.create({SERVICE_NAME: service_name, SERVICE_VERSION: __version__,
                                **OTELResourceDetector().detect().attributes})
    pull_reader = InMemoryMetricReader() if prometheus else None
    meter_provider = MeterProvider(resource=resource, shutdown_on_exit=False,
                                   metric_readers=_metric_readers(settings) + ([pull_reader] if pull_reader else []))
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if settings.traces is not None:
        _quiet_dropped_span_warnings()
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(timeout=settings.traces.timeout),
                schedule_delay_millis=SCHEDULE_DELAY_MILLIS,
                export_timeout_millis=settings.traces.timeout * 1000,
            )
        )
    if set_global:
        metrics.set_meter_provider(meter_provider)
        trace.set_tracer_provider(tracer_provider)
    telemetry = Telemetry(settings, tracer_provider, meter_provider, pull_reader)
    # Our bounded shutdown instead of the SDK's unbounded atexit hooks (shutdown_on_exit=False).
    atexit.register(telemetry.shutdown)
    return telemetry


def disabled() -> Telemetry:
    """A no-op tracer and meter whatever the environment says (OTEL_SDK_DISABLED=true gives it)."""
    return Telemetry(TelemetrySettings(traces=None, metrics=None, disabled=True), None, None)


def _quiet_dropped_span_warnings() -> None:
    """With the collector down and the queue full, the SDK builds a log record for every span it
    drops ("Queue full, dropping Span"; its filter discards the repeats only after building them),
    which doubled the cost of a span. The exporter still logs each failed export as an error, so
    raising this logger to ERROR loses nothing an operator acts on. An explicit level is kept."""
    sdk_batch_log = logging.getLogger("opentelemetry.sdk._shared_internal")
    if sdk_batch_log.level == logging.NOTSET:
        sdk_batch_log.setLevel(logging.ERROR)


def _metric_readers(settings: TelemetrySettings) -> list[MetricReader]:
    if settings.metrics is None:
        return []
    timeout = settings.metrics.timeout
    return [PeriodicExportingMetricReader(OTLPMetricExporter(timeout=timeout), export_timeout_millis=timeout * 1000)]


# --- spans around HSM calls ----------------------------------------------------------------


@contextmanager
def hsm_span(
    tracer: Tracer,
    operation: str,
    key_label: str | None,
    mechanism: str | None,
    *,
    duration: Histogram | None = None,
    count: Counter | None = None,
    submitted: Submitted | None = None,
) -> Iterator[Span]:
    """A span named "hsm.<operation>" around one HSM call, recording its outcome.

    Attributes: hsm.operation, hsm.key.label, hsm.mechanism, hsm.outcome (ok | error |
    cancelled) and, on error, error.type (the exception's class name). The exception's message
    and traceback are deliberately not recorded: they can quote the data being signed.
    With `duration` (Metrics.hsm_operation_duration) the elapsed time is recorded too, labelled
    by operation, mechanism, outcome and error type; with `count` (Metrics.signatures) the call
    is counted, labelled the same way. With `submitted` (when the caller handed the call to
    the pool) span and duration begin then, so both include the wait in the queue; without,
    they begin now.
    """
    attributes = {HSM_OPERATION: operation}
    if key_label is not None:
        attributes[HSM_KEY_LABEL] = key_label
    if mechanism is not None:
        attributes[HSM_MECHANISM] = mechanism
    start = submitted or Submitted.now()
    outcome: Outcome = "ok"
    error_type: str | None = None
    with tracer.start_as_current_span(
        f"hsm.{operation}", attributes=attributes, start_time=start.wall_ns, record_exception=False,
        set_status_on_exception=False
    ) as span:
        try:
            yield span
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException as exc:
            outcome, error_type = "error", type(exc).__qualname__
            span.set_attribute(ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
            raise
        finally:
            span.set_attribute(HSM_OUTCOME, outcome)
            labels = _metric_labels(attributes, outcome, error_type)
            if duration is not None:
                duration.record(time.perf_counter() - start.perf, labels)
            if count is not None:
                count.add(1, labels)


@dataclass(frozen=True)
class Submitted:
    """When a call was handed over, by both clocks a measurement needs: the span's start
    (wall, ns) and the duration's (perf_counter)."""
    wall_ns: int
    perf: float

    @staticmethod
    def now() -> Submitted:
        return Submitted(time.time_ns(), time.perf_counter())


def _metric_labels(span_attributes: Mapping[str, str], outcome: Outcome, error_type: str | None) -> dict[str, str]:
    # The key label stays out of metric attributes to keep series few.
    labels = {k: v for k, v in span_attributes.items() if k != HSM_KEY_LABEL}
    labels[HSM_OUTCOME] = outcome
    if error_type is not None:
        labels[ERROR_TYPE] = error_type
    return labels


def hsm_instrument(telemetry: Telemetry) -> Callable[[Callable[[T], R], str, str | None, str | None], Callable[[T], R]]:
    """For `Hsm.instrument`: each operation runs inside an `hsm_span`, on the worker thread but
    in the caller's contextvars, so the span's parent is the request's span. `Hsm` wraps an
    operation when the caller submits it, so span and duration begin then: queueing included,
    as `hsm.operation.duration` says."""

    def wrap(fn: Callable[[T], R], operation: str, key_label: str | None,
             mechanism: str | None) -> Callable[[T], R]:
        submitted = Submitted.now()

        def traced(arg: T) -> R:
            with hsm_span(telemetry.tracer, operation, key_label, mechanism,
                          duration=telemetry.metrics.hsm_operation_duration,
                          count=telemetry.metrics.signatures if operation == "sign" else None,
                          submitted=submitted):
                return fn(arg)
        return traced

    return wrap
