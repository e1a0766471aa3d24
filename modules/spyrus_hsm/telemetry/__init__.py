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

from .env import DEFAULT_EXPORT_TIMEOUT, ExporterSettings, TelemetryConfigError, TelemetrySettings
from .instruments import HSM_DURATION_BUCKETS, HTTP_DURATION_BUCKETS, Metrics
from .providers import INSTRUMENTATION_NAME, SCHEDULE_DELAY_MILLIS, Telemetry, disabled, setup
from .spans import (
    ERROR_TYPE,
    HSM_KEY_LABEL,
    HSM_MECHANISM,
    HSM_OPERATION,
    HSM_OUTCOME,
    Outcome,
    Submitted,
    hsm_instrument,
    hsm_span,
)

__all__ = [
    "DEFAULT_EXPORT_TIMEOUT", "ERROR_TYPE", "HSM_DURATION_BUCKETS", "HSM_KEY_LABEL", "HSM_MECHANISM",
    "HSM_OPERATION", "HSM_OUTCOME", "HTTP_DURATION_BUCKETS", "INSTRUMENTATION_NAME", "SCHEDULE_DELAY_MILLIS",
    "ExporterSettings", "Metrics", "Outcome", "Submitted", "Telemetry", "TelemetryConfigError",
    "TelemetrySettings", "disabled", "hsm_instrument", "hsm_span", "setup",
]
