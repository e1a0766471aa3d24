"""Prometheus text on http://<host>:9600/metrics, as edgeHub and edgeAgent serve theirs, for
IoT Edge's metrics-collector (it scrapes the URLs listed in its `MetricsEndpointsCSV`).

The values are those of the package's OpenTelemetry instruments (`telemetry.Metrics`), read
through a pull reader of the same MeterProvider at each scrape, so the OTLP export and this
endpoint never disagree. Each name gets the prefix `spyrus_hsm_`, its unit as a suffix and
`_total` on counters (Prometheus's conventions); each series gets the labels edgeHub puts on its
own, `iothub`, `edge_device` and `instance_number` (a GUID per process start, so a restart shows
as a new instance and counters that went back to zero are not read as a fall), plus
`module_name`, so one dashboard query covers a fleet. A label with no value (outside IoT Edge,
no hub configured) is left out rather than sent empty. `promtool check metrics` passes on a
scrape (tests/service/test_prometheus.py).

Rendering uses prometheus-client's exposition (the format is its reference implementation);
the endpoint is a plain-HTTP aiohttp listener on the module network, like the health listener.
A scrape runs the SDK's collection off the event loop: it calls the observable instruments'
callbacks, which read counters and cached values only, never the HSM.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromMetric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .listening import listen
from .threads import Lane

log = logging.getLogger(__name__)
PREFIX = "spyrus_hsm_"
RENDER_DEADLINE = 10.0  # seconds for one scrape to be rendered
# OpenTelemetry unit -> Prometheus suffix; units in braces ({call}, {hit}) are annotations.
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "d": "days", "1": ""}
_INVALID = re.compile(r"[^a-zA-Z0-9_]")
# edgeHub's instance_number: new at each start of the process.
INSTANCE_NUMBER = str(uuid.uuid4())


@dataclass(frozen=True)
class EdgeLabels:
    """edgeHub's identifying labels: hub host name, device id, module id ("" when unknown, and
    then not sent) and this process's instance number."""

    iothub: str = ""
    edge_device: str = ""
    module_name: str = ""
    instance_number: str = INSTANCE_NUMBER

    def as_dict(self) -> dict[str, str]:
        labels = {"iothub": self.iothub, "edge_device": self.edge_device,
                  "instance_number": self.instance_number, "module_name": self.module_name}
        return {name: value for name, value in labels.items() if value}


def prometheus_name(name: str, unit: str) -> str:
    """`hsm.operation.duration` in `s` -> `spyrus_hsm_hsm_operation_duration_seconds`."""
    base = PREFIX + _INVALID.sub("_", name)
    suffix = "" if unit.startswith("{") else _UNITS.get(unit, _INVALID.sub("_", unit))
    return f"{base}_{suffix}" if suffix and not base.endswith(suffix) else base


def _label_name(key: str) -> str:
    return _INVALID.sub("_", key)


class OpenTelemetryCollector(Collector):
    """A prometheus-client collector that reads the SDK's pull reader at each scrape."""

    def __init__(self, reader: InMemoryMetricReader, labels: EdgeLabels) -> None:
        self.reader = reader
        self.labels = labels.as_dict()

    def collect(self) -> Iterator[PromMetric]:
        data = self.reader.get_metrics_data()
        if data is None:
            return
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    family = self._family(metric)
                    if family is not None:
                        yield family

    def _family(self, metric: Metric) -> PromMetric | None:
        name = prometheus_name(metric.name, metric.unit or "")
        doc = metric.description or metric.name
        points: list[NumberDataPoint | HistogramDataPoint] = list(metric.data.data_points)  # type: ignore[arg-type]
        keys = sorted({_label_name(k) for p in points for k in (p.attributes or {})} - set(self.labels))
        label_names = [*self.labels, *keys]
        data = metric.data
        if isinstance(data, Histogram):
            hist = HistogramMetricFamily(name, doc, labels=label_names)
            for point in points:
                assert isinstance(point, HistogramDataPoint)
                hist.add_metric(self._values(point.attributes, keys), _buckets(point), point.sum)
            return _without_empty_labels(hist)
        family: CounterMetricFamily | GaugeMetricFamily
        if isinstance(data, Sum) and data.is_monotonic:
            family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=label_names)
        elif isinstance(data, (Sum, Gauge)):
            family = GaugeMetricFamily(name, doc, labels=label_names)
        else:
            return None
        for point in points:
            assert isinstance(point, NumberDataPoint)
            family.add_metric(self._values(point.attributes, keys), point.value)
        return _without_empty_labels(family)

    def _values(self, attributes: Mapping[str, object] | None, keys: list[str]) -> list[str]:
        named = {_label_name(k): str(v) for k, v in (attributes or {}).items()}
        return [*self.labels.values(), *(named.get(k, "") for k in keys)]


def _without_empty_labels(family: PromMetric) -> PromMetric:
    """A series's labels without those that have no value (an attribute only some points carry):
    Prometheus reads an empty label as an absent one, so sending it only adds noise."""
    family.samples = [s._replace(labels={k: v for k, v in s.labels.items() if v != ""}) for s in family.samples]
    return family


def _buckets(point: HistogramDataPoint) -> list[tuple[str, float]]:
    """OpenTelemetry's per-bucket counts as Prometheus's cumulative `le` buckets."""
    out, running = [], 0
    for bound, count in zip([*point.explicit_bounds, float("inf")], point.bucket_counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return out


def registry(reader: InMemoryMetricReader, labels: EdgeLabels) -> CollectorRegistry:
    """A registry holding only our metrics (not the client library's process/GC defaults)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(OpenTelemetryCollector(reader, labels))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


class MetricsEndpoint:
    """GET /metrics over plain HTTP on (host, port); port 0 picks a free one (tests)."""

    def __init__(self, reg: CollectorRegistry, host: str, port: int) -> None:
        self.reg = reg
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._render = Lane("metrics-render", 1)  # a scrape renders off the loop, one at a time

    async def start(self) -> int:
        """Listen; ListenError (the port taken, the address not ours) leaves nothing behind."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = await listen(runner, self.host, self.port, None, "metrics.port")
        self._runner = runner
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = await self._render.run(lambda: render(self.reg), RENDER_DEADLINE, "rendering the metrics")
        except TimeoutError as exc:
            log.warning("%s", exc)
            return web.Response(status=503, text="metrics not rendered in time; retry\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
