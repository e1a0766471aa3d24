"""Spans (and the duration and count metrics) around HSM calls. Nothing here records data,
signatures, tokens or PINs: only the operation, the key label and the mechanism, and an error
by its type, never by its message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from opentelemetry.metrics import Counter, Histogram
from opentelemetry.trace import Span, Status, StatusCode, Tracer

if TYPE_CHECKING:
    from .providers import Telemetry

T = TypeVar("T")
R = TypeVar("R")

# Span and metric attribute names (the HSM ones are ours; error.type is the semconv one).
HSM_OPERATION = "hsm.operation"
HSM_KEY_LABEL = "hsm.key.label"
HSM_MECHANISM = "hsm.mechanism"
HSM_OUTCOME = "hsm.outcome"
ERROR_TYPE = "error.type"

Outcome = Literal["ok", "error", "cancelled"]


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
