"""`spyrus-hsm serve` as the edge runtime starts it: Prometheus text on its metrics port, read
with prometheus-client's own parser, moving as leaves make requests, labelled as edgeHub labels
its metrics; and log lines in the IoT Edge format (`<N> YYYY-MM-DD HH:MM:SS.fff +00:00 `).

The IOTEDGE_* variables point at a workload socket that does not exist: the module's edgeHub
client keeps retrying (and says so in the log), which changes nothing in what is tested here.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import (
    HOST,
    ask_sas_token,
    free_port,
    serve_config,
    stop_process,
    store_hsm_certificate,
    wait_for_lines,
)
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(120)

EDGE = {"IOTEDGE_IOTHUBHOSTNAME": "fleet-hub.azure-devices.net", "IOTEDGE_DEVICEID": "edge-07",
        "IOTEDGE_MODULEID": "spyrus_hsm", "IOTEDGE_GATEWAYHOSTNAME": "edge-07.local",
        "IOTEDGE_MODULEGENERATIONID": "gen-1", "IOTEDGE_APIVERSION": "2019-01-30"}
EDGE_LABELS = {"iothub": "fleet-hub.azure-devices.net", "edge_device": "edge-07", "module_name": "spyrus_hsm"}
POLICY = [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["metrics-*"]}]
EDGE_LINE = re.compile(r"^<[0-7]> \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} \+00:00 \S")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    api_port: int
    metrics_port: int
    bearer: str
    device: str
    ctx: ssl.SSLContext
    stderr: Path
    cert_label: str  # this module's own certificate: the token is shared with other modules
    cert_not_after: float


@pytest.fixture(scope="module")
def served(hsm: Hsm, token_env, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
           emulator_pki: EmulatorPki) -> Iterator[Served]:
    """`serve` with the token cache off: every token is signed."""
    yield from _serve(hsm, token_env, tmp_path_factory, emulator_pki, cache_reuse_fraction=0)


@pytest.fixture(scope="module")
def served_cached(hsm: Hsm, token_env, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
                  emulator_pki: EmulatorPki) -> Iterator[Served]:
    """`serve` with the token cache on (reusing a token for half its life)."""
    yield from _serve(hsm, token_env, tmp_path_factory, emulator_pki, cache_reuse_fraction=0.5)


def _serve(hsm: Hsm, token_env, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
           emulator_pki: EmulatorPki, cache_reuse_fraction: float) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("metrics")
    device = f"metrics-{secrets.token_hex(3)}"
    hsm.import_secret_key(device, Secret(secrets.token_bytes(32)))
    cert_label = f"metrics-cert-{secrets.token_hex(3)}"
    cert = store_hsm_certificate(hsm, cert_label, emulator_pki)
    bearer = secrets.token_urlsafe(24)
    config = serve_config(tmp, token_env, emulator_pki, {
        "bearer": {"gateway": bearer}, "policy": POLICY, "cache_reuse_fraction": cache_reuse_fraction,
        "rate_limit_per_second": 0})
    document = json.loads(config.read_text())
    document["metrics"] = {"host": HOST, "port": free_port()}
    config.write_text(json.dumps(document))
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="false",
                        IOTEDGE_WORKLOADURI=f"unix://{tmp / 'no-workload.sock'}", **EDGE)
    err = tmp / "serve.err"
    with err.open("wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "-v", "serve"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file)
    try:
        lines = wait_for_lines(proc, ("API on https://", "metrics on http://"), within=30)
        api_port = int(lines["API on https://"].rsplit(":", 1)[1])
        metrics_port = int(lines["metrics on http://"].rsplit(":", 1)[1].split("/")[0])
        ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
        yield Served(proc, api_port, metrics_port, bearer, device, ctx, err, cert_label,
                     cert.not_valid_after_utc.timestamp())
    finally:
        stop_process(proc)


def scrape(served: Served) -> tuple[str, Samples]:
    conn = http.client.HTTPConnection(HOST, served.metrics_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain"), text
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def request(served: Served, bearer: str) -> int:
    return ask_sas_token(served.api_port, served.ctx, bearer, served.device)


def wait_ready(served: Served) -> Samples:
    def ready() -> Samples | None:
        _, samples = scrape(served)
        expiry = total(samples, "spyrus_hsm_certificate_not_after_timestamp_seconds", label=served.cert_label)
        return samples if total(samples, "spyrus_hsm_hsm_ready") == 1 and expiry else None

    return wait_for(ready, 30, "the HSM ready and this module's certificate reported", every=0.2)


def test_every_series_carries_edgehubs_labels_and_the_prefix(served: Served) -> None:
    wait_ready(served)
    _, samples = scrape(served)
    assert samples
    for name, labels in samples:
        assert name.startswith("spyrus_hsm_"), name
        assert EDGE_LABELS.items() <= dict(labels).items(), (name, dict(labels))
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
                            dict(labels)["instance_number"]), (name, dict(labels))


def test_values_move_as_requests_are_made(served: Served) -> None:
    before = wait_ready(served)
    assert [request(served, served.bearer) for _ in range(3)] == [200] * 3
    assert [request(served, "not-a-token") for _ in range(2)] == [401] * 2
    text, after = scrape(served)
    print("\n" + text)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = {"http_route": "/v1/sas-tokens"}
    assert moved("spyrus_hsm_http_server_request_duration_seconds_count",
                 http_response_status_code="200", **route) == 3
    assert moved("spyrus_hsm_http_server_request_duration_seconds_count",
                 http_response_status_code="401", **route) == 2
    assert moved("spyrus_hsm_http_server_request_duration_seconds_bucket",
                 http_response_status_code="200", le="+Inf", **route) == 3
    assert moved("spyrus_hsm_http_server_request_duration_seconds_sum", **route) > 0
    assert moved("spyrus_hsm_hsm_operation_duration_seconds_count", hsm_operation="sign", hsm_outcome="ok") == 3
    assert moved("spyrus_hsm_hsm_signatures_total", hsm_outcome="ok") == 3
    assert moved("spyrus_hsm_cache_misses_total") == 3
    assert total(after, "spyrus_hsm_hsm_ready") == 1
    assert total(after, "spyrus_hsm_hsm_recoveries_total") == 0
    assert total(after, "spyrus_hsm_hsm_pin_refused") == 0
    assert total(after, "spyrus_hsm_hsm_restart_required") == 0
    token = [labels for (name, labels) in after if name == "spyrus_hsm_hsm_token_info"]
    assert len(token) == 1 and dict(token[0])["hsm_token_serial"], token
    assert total(after, "spyrus_hsm_hsm_queue_depth") == 0
    assert total(after, "spyrus_hsm_hsm_queue_limit") == 256
    assert total(after, "spyrus_hsm_audit_dropped_total") == 0

    # This module's own certificate only: other modules add and remove credentials on the
    # shared token while this one runs.
    assert total(after, "spyrus_hsm_certificate_not_after_timestamp_seconds",
                 label=served.cert_label) == served.cert_not_after


def test_under_iot_edge_every_log_line_carries_its_syslog_severity(served: Served) -> None:
    wait_ready(served)
    lines = served.stderr.read_text().splitlines()
    assert lines
    bad = [line for line in lines if not EDGE_LINE.match(line)]
    assert not bad, bad[:5]
    assert any(line.startswith("<6> ") and "HSM ready" in line for line in lines)
    assert any(line.startswith("<4> ") for line in lines), "the edgeHub client's retries are warnings"


def test_cache_hits_and_misses_are_counted(served_cached: Served) -> None:
    before = wait_ready(served_cached)
    assert [request(served_cached, served_cached.bearer) for _ in range(3)] == [200] * 3
    text, after = scrape(served_cached)
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith("spyrus_hsm_cache_")))

    def moved(name: str) -> float:
        return total(after, name) - total(before, name)

    assert moved("spyrus_hsm_cache_misses_total") == 1  # the first is signed ...
    assert moved("spyrus_hsm_cache_hits_total") == 2    # ... the other two are the same token again
    assert moved("spyrus_hsm_hsm_signatures_total") == 1
