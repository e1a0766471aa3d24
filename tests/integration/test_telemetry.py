"""Telemetry against a real OTLP/HTTP receiver: what arrives, what never does (secrets), and that a
dead or hung collector costs neither request latency nor a prompt shutdown."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry.trace import Span, Tracer
from otlp_receiver import OtlpReceiver, SilentCollector, SpanRecord, all_attribute_values, closed_port_endpoint

from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, SignAlgorithm, TokenSelector
from spyrus_hsm.hsm.errors import HsmTimeout
from spyrus_hsm.telemetry import Telemetry, TelemetryConfigError, hsm_instrument, hsm_span, setup

pytestmark = pytest.mark.timeout(60)

SECRET = "S3CRET-payload-4f1c9e"  # stands for data to sign, a signature or a SAS token
PIN = "PIN-918273"

MakeTelemetry = Callable[..., Telemetry]


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def otel_environment(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Exactly these OTEL_* variables in the process environment, where the SDK reads them."""
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def make_telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeTelemetry]:
    made: list[Telemetry] = []

    def make(**env: str) -> Telemetry:
        otel_environment(monkeypatch, **env)
        telemetry = setup("spyrus-hsm-test")
        made.append(telemetry)
        return telemetry

    yield make
    for telemetry in made:
        telemetry.shutdown(deadline=3)


@pytest.fixture
def exported(rx: OtlpReceiver, make_telemetry: MakeTelemetry) -> Telemetry:
    return make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint)


def by_name(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    return {s.name: s for s in spans}


def sign_with_span(tracer: Tracer, data: str, pin: str, fail: bool = False) -> str:
    """Stands for the HSM layer: it holds data and a PIN, and only the span is told about the call."""
    with hsm_span(tracer, "sign", "device-key", "ECDSA"):
        if fail:
            raise HsmTimeout(f"token did not answer while signing {data!r} with PIN {pin}")
        return f"signature-of-{data}"


# --- spans --------------------------------------------------------------------------------


def test_spans_arrive_with_names_attributes_parent_links_and_resource(
    rx: OtlpReceiver, make_telemetry: MakeTelemetry
) -> None:
    telemetry = make_telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint,
        OTEL_SERVICE_NAME="edge-hsm",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,iotedge.device=dev%2C1",
    )
    with telemetry.tracer.start_as_current_span("POST /sign", attributes={"http.request.method": "POST"}):
        sign_with_span(telemetry.tracer, "data", "pin")
    assert telemetry.force_flush()

    spans = by_name(rx.wait_for_spans(count=2))
    request, sign = spans["POST /sign"], spans["hsm.sign"]
    assert request.parent_span_id is None
    assert sign.parent_span_id == request.span_id and sign.trace_id == request.trace_id
    assert request.attributes == {"http.request.method": "POST"}
    assert sign.resource["service.name"] == "edge-hsm"
    assert sign.resource["deployment.environment"] == "test"
    assert sign.resource["iotedge.device"] == "dev,1"
    assert sign.scope == "spyrus_hsm"


def test_an_hsm_operation_on_a_pool_worker_is_traced_as_a_child_of_the_callers_span(
    rx: OtlpReceiver, exported: Telemetry, hsm: Hsm
) -> None:
    label = "traced-" + secrets.token_hex(3)
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    previous = hsm.instrument(hsm_instrument(exported))
    try:
        with exported.tracer.start_as_current_span("caller"):
            hsm.sign(label, SignAlgorithm.HMAC_SHA256, b"traced")
    finally:
        hsm.instrument(previous)
    exported.force_flush()

    spans = by_name(rx.wait_for_spans(lambda s: s.name == "caller" or s.attributes.get("hsm.key.label") == label,
                                      count=2))
    caller, sign = spans["caller"], spans["hsm.sign"]
    assert sign.parent_span_id == caller.span_id and sign.trace_id == caller.trace_id
    assert sign.attributes == {"hsm.operation": "sign", "hsm.key.label": label,
                               "hsm.mechanism": "CKM_SHA256_HMAC", "hsm.outcome": "ok"}


def test_hsm_span_records_operation_key_mechanism_and_ok_outcome(rx: OtlpReceiver, exported: Telemetry) -> None:
    sign_with_span(exported.tracer, SECRET, PIN)
    exported.force_flush()

    [span] = rx.wait_for_spans(lambda s: s.name == "hsm.sign")
    assert span.attributes == {
        "hsm.operation": "sign",
        "hsm.key.label": "device-key",
        "hsm.mechanism": "ECDSA",
        "hsm.outcome": "ok",
    }
    assert span.status_code == "UNSET"


def test_hsm_span_records_error_type_but_not_the_error_message(rx: OtlpReceiver, exported: Telemetry) -> None:
    with pytest.raises(HsmTimeout):
        sign_with_span(exported.tracer, SECRET, PIN, fail=True)
    exported.force_flush()

    [span] = rx.wait_for_spans(lambda s: s.name == "hsm.sign")
    assert span.attributes["hsm.outcome"] == "error"
    assert span.attributes["error.type"] == "HsmTimeout"
    assert (span.status_code, span.status_message) == ("ERROR", "HsmTimeout")
    assert span.events == []  # no exception event: its message and traceback quote the data


def test_no_data_or_pin_reaches_the_collector(rx: OtlpReceiver, make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_METRIC_EXPORT_INTERVAL="100000")
    duration = telemetry.metrics.hsm_operation_duration
    with hsm_span(telemetry.tracer, "sign", "device-key", "ECDSA", duration=duration):
        f"signature-of-{SECRET}".encode()
    with pytest.raises(ValueError), hsm_span(telemetry.tracer, "sign", "device-key", "ECDSA", duration=duration):
        raise ValueError(f"cannot sign {SECRET} with PIN {PIN}")
    telemetry.force_flush()

    rx.wait_for_spans(lambda s: s.name == "hsm.sign", count=2)
    rx.wait_for_metric("hsm.operation.duration", count=2)
    texts = all_attribute_values(rx)
    assert any("hsm.outcome='error'" in t for t in texts)  # the scan sees the attributes at all
    assert not [t for t in texts if SECRET in t or PIN in t]


def test_hsm_span_marks_cancellation_as_cancelled_not_error(rx: OtlpReceiver, exported: Telemetry) -> None:
    async def cancelled_sign() -> None:
        with hsm_span(exported.tracer, "sign", "device-key", "ECDSA"):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled_sign())
    exported.force_flush()

    [span] = rx.wait_for_spans(lambda s: s.name == "hsm.sign")
    assert span.attributes["hsm.outcome"] == "cancelled"
    assert span.status_code == "UNSET"


# --- metrics ------------------------------------------------------------------------------


def test_metrics_arrive_on_the_periodic_reader(rx: OtlpReceiver, make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_METRIC_EXPORT_INTERVAL="200")
    m = telemetry.metrics
    m.http_request_duration.record(0.012, {"http.request.method": "POST", "http.route": "/sign"})
    with hsm_span(telemetry.tracer, "sign", "device-key", "ECDSA", duration=m.hsm_operation_duration):
        pass
    m.cache_hits.add(2, {"cache.name": "sas"})
    m.cache_misses.add(1, {"cache.name": "sas"})
    m.watch_queue_depth(lambda: 3)

    [http] = rx.wait_for_metric("http.server.request.duration")[:1]
    assert (http.kind, http.unit, http.count) == ("histogram", "s", 1)
    [hsm] = rx.wait_for_metric("hsm.operation.duration")[:1]
    assert hsm.unit == "s"
    assert hsm.attributes == {"hsm.operation": "sign", "hsm.mechanism": "ECDSA", "hsm.outcome": "ok"}
    assert rx.wait_for_metric("cache.hits")[0].value == 2
    assert rx.wait_for_metric("cache.misses")[0].value == 1
    assert rx.wait_for_metric("hsm.queue.depth")[0].value == 3
    assert rx.wait_for_metric("hsm.queue.depth")[0].resource["service.name"] == "spyrus-hsm-test"


# --- export options -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_each_compression_the_settings_accept_is_the_one_the_export_uses(
        rx: OtlpReceiver, make_telemetry: MakeTelemetry, compression: str) -> None:
    telemetry = make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_EXPORTER_OTLP_COMPRESSION=compression)
    with telemetry.tracer.start_as_current_span("compressed"):
        pass
    telemetry.force_flush()

    rx.wait_for_spans(lambda s: s.name == "compressed")
    traces = [r for r in rx.requests if r.path == "/v1/traces"]
    assert {(r.content_type, r.content_encoding) for r in traces} == {("application/x-protobuf", compression)}


def test_signal_specific_endpoint_is_used_as_is(rx: OtlpReceiver, make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT=closed_port_endpoint(),
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{rx.endpoint}/v1/traces",
        OTEL_METRICS_EXPORTER="none",
    )
    with telemetry.tracer.start_as_current_span("routed"):
        pass
    telemetry.force_flush()

    rx.wait_for_spans(lambda s: s.name == "routed")
    assert telemetry.settings.traces is not None
    assert telemetry.settings.traces.endpoint == f"{rx.endpoint}/v1/traces"
    assert telemetry.settings.metrics is None


def test_without_endpoint_spans_are_recorded_but_nothing_is_exported(make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry()
    with telemetry.tracer.start_as_current_span("local") as span:
        assert span.is_recording() and span.get_span_context().is_valid
    assert telemetry.settings.traces is None and telemetry.settings.metrics is None


def test_traces_exporter_none_turns_span_export_off(rx: OtlpReceiver, make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_TRACES_EXPORTER="none")
    assert telemetry.settings.traces is None
    assert telemetry.settings.metrics is not None


def test_sdk_disabled_gives_non_recording_spans_and_working_helpers(make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    with hsm_span(telemetry.tracer, "sign", "k", None, duration=telemetry.metrics.hsm_operation_duration) as span:
        assert not span.is_recording()
    telemetry.metrics.cache_hits.add(1)
    assert telemetry.tracer_provider is None


def test_export_timeout_is_read_in_milliseconds(make_telemetry: MakeTelemetry) -> None:
    telemetry = make_telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
        OTEL_EXPORTER_OTLP_TIMEOUT="1500",
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="500",
    )
    assert telemetry.settings.traces is not None and telemetry.settings.traces.timeout == 1.5
    assert telemetry.settings.metrics is not None and telemetry.settings.metrics.timeout == 0.5
    assert telemetry.settings.traces.endpoint == "http://collector:4318/v1/traces"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
        ("OTEL_TRACES_EXPORTER", "console"),
        ("OTEL_RESOURCE_ATTRIBUTES", "no-equals-sign"),
    ],
)
def test_invalid_setting_is_rejected_naming_the_variable(
        key: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    otel_environment(monkeypatch, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318", **{key: value})
    with pytest.raises(TelemetryConfigError, match=key):
        setup()


def test_endpoint_without_scheme_is_rejected_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    otel_environment(monkeypatch, OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318")
    with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        setup()


# --- a collector that is down or hangs ----------------------------------------------------


def make_spans(tracer: Tracer, n: int = 1000) -> float:
    started = time.perf_counter()
    for i in range(n):
        with tracer.start_as_current_span("request") as span:
            child(tracer, span, i)
    return time.perf_counter() - started


def child(tracer: Tracer, parent: Span, i: int) -> None:
    with hsm_span(tracer, "sign", "device-key", "ECDSA"):
        parent.set_attribute("request.index", i)


@contextmanager
def dead_collector(kind: str) -> Iterator[str]:
    if kind == "hangs":
        with SilentCollector() as collector:
            yield collector.endpoint
    else:
        yield closed_port_endpoint()


@pytest.mark.parametrize("kind", ["closed port", "hangs"])
def test_dead_collector_neither_slows_spans_nor_holds_up_shutdown(
        kind: str, make_telemetry: MakeTelemetry) -> None:
    with dead_collector(kind) as endpoint:
        local = make_telemetry(OTEL_METRICS_EXPORTER="none")
        dead = make_telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_METRICS_EXPORTER="none")
        # Interleaved rounds, best of each: the ratio, not absolute time, is what is compared.
        local_times, dead_times = [], []
        for _ in range(5):
            local_times.append(make_spans(local.tracer))
            dead_times.append(make_spans(dead.tracer))
        ratio = min(dead_times) / min(local_times)
        assert ratio < 3, f"span creation {ratio:.1f}x slower when the collector {kind}"

        started = time.monotonic()
        dead.shutdown(deadline=3)
        assert time.monotonic() - started < 5
        local.shutdown(deadline=3)


def test_shutdown_with_a_live_collector_finishes_and_is_idempotent(exported: Telemetry) -> None:
    assert exported.shutdown(deadline=3)
    assert exported.shutdown(deadline=3)


# --- HSM timing: from the caller's submission, queueing included ------------------------------

QUEUED_DELAY_MS = 400


@pytest.mark.shim
def test_hsm_operation_duration_and_span_begin_when_the_caller_submits_queueing_included(
        rx: OtlpReceiver, exported: Telemetry, token_env: Any) -> None:
    """One worker, two signatures submitted together, each slowed by the shim: the second waits
    in the queue while the first signs, and its span and duration include that wait. (A pool of
    its own for the key too: the session's shared pool may still be noticing an earlier shim
    test's unplug.)"""
    label = "queued-" + secrets.token_hex(3)
    settings = PoolSettings(token_env.module, TokenSelector(token_env.label), workers=1, call_timeout=10.0,
                            retry_min=0.1, retry_max=0.5)
    single = Hsm(settings, Secret(token_env.pin)).start(wait=True)
    single.import_secret_key(label, Secret(secrets.token_bytes(32)))
    single.instrument(hsm_instrument(exported))
    token_env.set_shim(sign_delay_ms=QUEUED_DELAY_MS)
    try:
        with ThreadPoolExecutor(2) as callers:
            for answer in [callers.submit(single.sign, label, SignAlgorithm.HMAC_SHA256, b"x") for _ in range(2)]:
                answer.result()
    finally:
        token_env.set_shim(state="plugged")
        single.close()
    assert exported.force_flush()
    first, second = sorted(rx.wait_for_spans(lambda s: s.name == "hsm.sign"
                                             and s.attributes.get("hsm.key.label") == label, count=2),
                           key=lambda s: s.end_ns)
    # The second was submitted while the first was signing: its span begins before the first ends.
    assert second.start_ns < first.end_ns
    [point] = [p for p in rx.wait_for_metric("hsm.operation.duration")
               if p.attributes.get("hsm.operation") == "sign" and p.count == 2][-1:]
    # The two durations are the spans' lengths: one delay, and a delay of waiting plus one of signing.
    spans_total = (first.end_ns - first.start_ns + second.end_ns - second.start_ns) / 1e9
    assert point.total is not None and point.total == pytest.approx(spans_total, abs=0.05)
    # one delay, then a wait of one and a delay: three in all (the shim's clock and the spans' differ by
    # fractions of a millisecond: 1.1997 s was seen for 3 x 0.4 s)
    assert spans_total >= 3 * QUEUED_DELAY_MS / 1000 - 0.005
