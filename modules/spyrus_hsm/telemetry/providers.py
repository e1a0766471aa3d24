"""Building the tracer and meter providers from the environment, and shutting them down
within a deadline whatever the collector does."""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer

from .. import __version__
from ..threads import Lane
from .env import TelemetrySettings
from .instruments import Metrics

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "spyrus_hsm"
SCHEDULE_DELAY_MILLIS = 1000
_LANE = Lane("telemetry-stop", 2)  # flushes and shutdowns, each bounded by its deadline


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
        _LANE.call(work, deadline, f"telemetry {what}")
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
