"""A real OTLP/HTTP receiver for tests, and collectors that misbehave.

`OtlpReceiver` listens on 127.0.0.1 (free port) in a thread, accepts POST /v1/traces and
/v1/metrics in protobuf (gzip or deflate when Content-Encoding says so), decodes them with the
official proto classes and keeps what arrived as plain records:

    with OtlpReceiver() as rx:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        ...
        [span] = rx.wait_for_spans(lambda s: s.name == "hsm.sign")

`SilentCollector` accepts connections and never answers (the collector that hangs);
`closed_port_endpoint()` gives a loopback URL on which nothing listens.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import addresses
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class SpanRecord:
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str | None
    kind: int
    attributes: dict[str, Any]
    status_code: str  # UNSET | OK | ERROR
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str
    start_ns: int = 0  # start and end times (Unix ns)
    end_ns: int = 0


@dataclass(frozen=True)
class MetricPoint:
    name: str
    unit: str
    kind: str  # sum | gauge | histogram | exponential_histogram | summary
    attributes: dict[str, Any]
    value: float | None  # sum and gauge points
    count: int | None  # histogram points
    total: float | None  # histogram sum
    resource: dict[str, Any]


@dataclass(frozen=True)
class RequestRecord:
    path: str
    content_type: str
    content_encoding: str
    size: int


def decode_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return getattr(value, kind)


def decode_attributes(attributes: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(attributes)
    return {kv.key: decode_value(kv.value) for kv in items}


def _spans(request: ExportTraceServiceRequest) -> Iterator[SpanRecord]:
    for rs in request.resource_spans:
        resource = decode_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield SpanRecord(
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex() or None,
                    kind=s.kind,
                    attributes=decode_attributes(s.attributes),
                    status_code=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    status_message=s.status.message,
                    events=[(e.name, decode_attributes(e.attributes)) for e in s.events],
                    resource=resource,
                    scope=ss.scope.name,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                )


def _metric_points(request: ExportMetricsServiceRequest) -> Iterator[MetricPoint]:
    for rm in request.resource_metrics:
        resource = decode_attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data") or ""
                for p in getattr(m, kind).data_points if kind else []:
                    number = p.WhichOneof("value") if kind in ("sum", "gauge") else None
                    yield MetricPoint(
                        name=m.name,
                        unit=m.unit,
                        kind=kind,
                        attributes=decode_attributes(p.attributes),
                        value=float(getattr(p, number)) if number else None,
                        count=int(p.count) if kind.endswith("histogram") else None,
                        total=float(p.sum) if kind.endswith("histogram") else None,
                        resource=resource,
                    )


@dataclass
class _Store:
    spans: list[SpanRecord] = field(default_factory=list)
    metrics: list[MetricPoint] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        content_type = self.headers.get("Content-Type", "")
        encoding = self.headers.get("Content-Encoding", "").lower()
        store = self.server.store
        with store.changed:
            store.requests.append(RequestRecord(self.path, content_type, encoding, len(body)))
        if self.path not in ("/v1/traces", "/v1/metrics"):
            self._reply(404, b"")
            return
        if content_type.split(";")[0].strip() != PROTOBUF:
            self._reply(415, b"")
            return
        try:
            self._accept(self.path, _decompress(body, encoding))
        except Exception:
            self._reply(400, b"")
            return
        response = ExportTraceServiceResponse() if self.path == "/v1/traces" else ExportMetricsServiceResponse()
        self._reply(200, response.SerializeToString())

    def _accept(self, path: str, data: bytes) -> None:
        store = self.server.store
        if path == "/v1/traces":
            spans = list(_spans(ExportTraceServiceRequest.FromString(data)))
            with store.changed:
                store.spans.extend(spans)
                store.changed.notify_all()
        else:
            points = list(_metric_points(ExportMetricsServiceRequest.FromString(data)))
            with store.changed:
                store.metrics.extend(points)
                store.changed.notify_all()

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", PROTOBUF)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) collector on 127.0.0.1 that remembers what it received."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.store = _Store()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """Base URL, for OTEL_EXPORTER_OTLP_ENDPOINT."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def spans(self) -> list[SpanRecord]:
        with self._server.store.changed:
            return list(self._server.store.spans)

    @property
    def metrics(self) -> list[MetricPoint]:
        with self._server.store.changed:
            return list(self._server.store.metrics)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._server.store.changed:
            return list(self._server.store.requests)

    def wait_for_spans(
        self, predicate: Callable[[SpanRecord], bool] = lambda s: True, timeout: float = 10.0, count: int = 1
    ) -> list[SpanRecord]:
        """The received spans matching `predicate`, once there are at least `count` of them."""
        return self._wait(lambda: [s for s in self._server.store.spans if predicate(s)], count, timeout, "spans")

    def wait_for_metric(self, name: str, timeout: float = 10.0, count: int = 1) -> list[MetricPoint]:
        """The received points of metric `name`, once there are at least `count` of them."""
        return self._wait(lambda: [p for p in self._server.store.metrics if p.name == name], count, timeout, "metrics")

    def _wait(self, select: Callable[[], list[Any]], count: int, timeout: float, what: str) -> list[Any]:
        store = self._server.store
        end = time.monotonic() + timeout
        with store.changed:
            while len(found := select()) < count:
                left = end - time.monotonic()
                if left <= 0:
                    seen = sorted({x.name for x in getattr(store, what)})
                    raise AssertionError(f"{len(found)} of {count} {what} after {timeout} s; names seen: {seen}")
                store.changed.wait(left)
            return found

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def all_attribute_values(rx: OtlpReceiver) -> list[str]:
    """Every attribute value, status message, event and span/metric name received, as text."""
    texts: list[str] = []

    def add(attributes: dict[str, Any]) -> None:
        texts.extend(f"{key}={value!r}" for key, value in attributes.items())

    for s in rx.spans:
        texts += [s.name, s.status_message]
        add(s.attributes)
        add(s.resource)
        for name, attributes in s.events:
            texts.append(name)
            add(attributes)
    for p in rx.metrics:
        texts.append(p.name)
        add(p.attributes)
        add(p.resource)
    return texts


class SilentCollector:
    """Accepts TCP connections on 127.0.0.1, reads nothing and never answers: a hung collector."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-collector", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def connections(self) -> int:
        """How many connections (export attempts) it has accepted and is holding."""
        return len(self._held)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def __enter__(self) -> SilentCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._held:
            conn.close()
        self._listener.close()


def closed_port_endpoint() -> str:
    """A loopback URL on which nothing listens (connections are refused at once): a fresh
    address of this test session's own (tests/addresses.py)."""
    host = addresses.host()
    return f"http://{host}:{addresses.port(host)}"
