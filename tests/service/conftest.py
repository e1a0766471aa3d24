"""Fixtures shared by the service tests: a real OTLP/HTTP receiver and telemetry exporting to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from otlp_receiver import OtlpReceiver

from spyrus_hsm.telemetry import Telemetry, setup


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture
def telemetry(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    """Spans and metrics (every 200 ms) to `rx`; call force_flush() before looking at spans."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    t = setup("spyrus-hsm-test")
    yield t
    t.shutdown(deadline=3)
