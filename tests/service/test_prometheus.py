"""The metrics endpoint as Prometheus itself meets it, outside IoT Edge: `promtool check metrics`
on a live scrape of `spyrus-hsm serve`, and a real Prometheus server (Debian's `prometheus`,
installed by `make deps`) scraping it, asked through its HTTP API whether the target is up,
whether a request moves the counters, and whether the shipped alert rules load against it.

Addresses: serve's metrics and Prometheus each on one of the test session's own (tests/addresses.py);
Prometheus runs in a temporary directory under `timeout` (it cannot outlive the run) and is
stopped at teardown.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import addresses
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import ask_sas_token, serve_config, stop_process, store_hsm_certificate, wait_for_lines
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deployments" / "prometheus" / "alerts.yml"
METRICS_HOST = addresses.host()
PROMETHEUS_HOST = addresses.host()
POLICY = [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["prom-*"]}]
REQUESTS = "sum(spyrus_hsm_http_server_request_duration_seconds_count)"
SIGNATURES = "sum(spyrus_hsm_hsm_signatures_total)"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is missing: Debian's 'prometheus' package provides it (run 'make deps')"
        if os.environ.get("SPYRUS_TOOLS_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Served:
    api_port: int
    metrics_port: int
    bearer: str
    device: str
    cert_label: str
    not_after: dt.datetime
    ctx: ssl.SSLContext

    def request(self) -> int:
        return ask_sas_token(self.api_port, self.ctx, self.bearer, self.device)

    def scrape(self) -> str:
        conn = http.client.HTTPConnection(METRICS_HOST, self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200, text
            return text
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(hsm: Hsm, token_env, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
           emulator_pki: EmulatorPki) -> Iterator[Served]:
    """`serve` outside IoT Edge (no IOTEDGE_* variables, no hub configured for the cloud side)."""
    tmp = tmp_path_factory.mktemp("prometheus-serve")
    device = f"prom-{secrets.token_hex(3)}"
    hsm.import_secret_key(device, Secret(secrets.token_bytes(32)))
    cert_label = f"prom-cert-{secrets.token_hex(3)}"
    cert = store_hsm_certificate(hsm, cert_label, emulator_pki)
    bearer = secrets.token_urlsafe(24)
    config = serve_config(tmp, token_env, emulator_pki, {
        "bearer": {"gateway": bearer}, "policy": POLICY, "cache_reuse_fraction": 0, "rate_limit_per_second": 0})
    document = json.loads(config.read_text())
    document["metrics"] = {"host": METRICS_HOST, "port": addresses.port(METRICS_HOST)}
    config.write_text(json.dumps(document))
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="false")
    env = {k: v for k, v in env.items() if not k.startswith("IOTEDGE_")}
    with (tmp / "serve.err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        lines = wait_for_lines(proc, ("API on https://", "metrics on http://"), within=30)
        api_port = int(lines["API on https://"].rsplit(":", 1)[1])
        metrics_port = int(lines["metrics on http://"].rsplit(":", 1)[1].split("/")[0])
        ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
        served = Served(api_port, metrics_port, bearer, device, cert_label, cert.not_valid_after_utc, ctx)
        wait_until_ready(served)
        yield served
    finally:
        stop_process(proc)


def wait_until_ready(served: Served) -> None:
    """The API answers before the HSM is ready (with 503): wait for the HSM, as a leaf would."""
    wait_for(lambda: re.search(r"^spyrus_hsm_hsm_ready\{[^}]*\} 1\.0$", served.scrape(), re.M), 60,
             "the HSM ready", every=0.2)


def wait_for_certificate_series(served: Served) -> str:
    """A scrape once the HSM is ready and this module's certificate's expiry has been read (the
    token is shared: another module's credentials may be there before it)."""
    def scraped() -> str:
        text = served.scrape()
        series = rf'^spyrus_hsm_certificate_not_after_timestamp_seconds\{{[^}}]*label="{re.escape(served.cert_label)}"'
        mine = re.search(series, text, re.M)
        return text if mine and "spyrus_hsm_hsm_ready{" in text else ""

    return wait_for(scraped, 30, "this module's expiry series", every=0.2)


def test_a_live_scrape_is_clean_under_promtool_check_metrics(served: Served) -> None:
    promtool = tool("promtool")
    assert served.request() == 200  # histograms and counters with points in them
    text = wait_for_certificate_series(served)
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    report = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and not report.strip(), report


def test_outside_iot_edge_no_label_is_sent_empty_and_instance_number_is_a_guid(served: Served) -> None:
    text = wait_for_certificate_series(served)
    assert '=""' not in text
    instances = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert all(sample.labels.values()), (sample.name, sample.labels)
            assert not {"iothub", "edge_device", "module_name"} & set(sample.labels), (sample.name, sample.labels)
            instances.add(sample.labels["instance_number"])
    assert len(instances) == 1
    assert uuid.UUID(instances.pop()).version == 4


def test_expiry_is_a_unix_timestamp_per_credential(served: Served) -> None:
    text = wait_for_certificate_series(served)
    series = {s.labels["label"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "spyrus_hsm_certificate_not_after_timestamp_seconds"}
    assert series[served.cert_label] == served.not_after.timestamp()
    assert "spyrus_hsm_certificate_earliest_expiry_days" not in text


# --- a real Prometheus server ----------------------------------------------------------------


@dataclass
class Prometheus:
    port: int

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection(PROMETHEUS_HOST, self.port, timeout=10)
        try:
            conn.request("GET", f"/api/v1/{path}" + (f"?{query}" if query else ""))
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, check: Any, within: float = 60) -> Any:
        return wait_for(check, within, f"Prometheus: {what}", every=0.25)


@pytest.fixture(scope="module")
def prometheus(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = addresses.port(PROMETHEUS_HOST)
    (tmp / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "spyrus-hsm",
                            "static_configs": [{"targets": [f"{METRICS_HOST}:{served.metrics_port}"]}]}],
    }))
    log = (tmp / "prometheus.log").open("wb")
    # `timeout` bounds the run even if teardown never comes (a killed pytest).
    proc = subprocess.Popen(["timeout", "600", binary, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={PROMETHEUS_HOST}:{port}",
                             "--storage.tsdb.retention.time=1h"],
                            cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        prom = Prometheus(port)
        end = time.monotonic() + 30
        while True:
            try:
                prom.api("status/buildinfo")
                break
            except (OSError, http.client.HTTPException):
                assert proc.poll() is None and time.monotonic() < end, (tmp / "prometheus.log").read_text()[-3000:]
                time.sleep(0.2)
        yield prom
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_prometheus_scrapes_serve_and_sees_the_target_up(prometheus: Prometheus, served: Served) -> None:
    def target() -> dict[str, Any] | None:
        active = prometheus.api("targets")["activeTargets"]
        return next((t for t in active if t["health"] == "up"), None)

    up = prometheus.wait_for("the spyrus-hsm target up", target)
    assert up["labels"]["job"] == "spyrus-hsm"
    assert up["scrapeUrl"] == f"http://{METRICS_HOST}:{served.metrics_port}/metrics"
    assert up["lastError"] == ""
    assert prometheus.value('up{job="spyrus-hsm"}') == 1
    ready = prometheus.wait_for("spyrus_hsm_hsm_ready",
                                lambda: prometheus.api("query", query="spyrus_hsm_hsm_ready")["result"])
    assert ready[0]["value"][1] == "1"
    assert re.fullmatch(r"[0-9a-f-]{36}", ready[0]["metric"]["instance_number"])


def test_a_request_moves_the_counters_prometheus_stores(prometheus: Prometheus, served: Served) -> None:
    prometheus.wait_for("a first scrape", lambda: prometheus.value('up{job="spyrus-hsm"}') == 1)
    before_requests = prometheus.value(REQUESTS) or 0.0
    before_signatures = prometheus.value(SIGNATURES) or 0.0
    assert [served.request() for _ in range(3)] == [200] * 3
    moved = prometheus.wait_for("the three requests", lambda: (prometheus.value(REQUESTS) or 0) >= before_requests + 3)
    assert moved
    assert prometheus.value(REQUESTS) == before_requests + 3
    assert prometheus.wait_for("the three signatures",
                               lambda: prometheus.value(SIGNATURES) == before_signatures + 3)


def test_the_shipped_alert_rules_load_and_evaluate_against_the_live_series(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    prometheus.wait_for("a scrape", lambda: prometheus.value('up{job="spyrus-hsm"}') == 1)
    rules = prometheus.wait_for("the alert rules evaluated", evaluated)
    assert {r["health"] for r in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
    # A healthy module with a certificate valid for a day: only the expiry alert may be pending/firing.
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert firing <= {"SpyrusHsmCertificateExpiringSoon"}, firing
