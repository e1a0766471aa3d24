"""The signing service's traces and metrics, exported over OTLP/HTTP to a real receiver.

One request is one trace: the server span is named by the route template ("METHOD /route"),
the service's own span (sas.mint) is its child, and the HSM call, made on a pool worker thread,
is a child of that. A caller's `traceparent` is continued. Spans carry labels, mechanisms,
outcomes and status codes, and never a PIN, a key, a bearer token, a SAS token, data to sign
or a signature.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from otlp_receiver import OtlpReceiver, SpanRecord, all_attribute_values
from service_harness import ServiceHarness, store_hsm_certificate, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, Secret, ecdsa_raw_to_der
from spyrus_hsm.telemetry import Telemetry

pytestmark = pytest.mark.timeout(60)

SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2  # OTLP's SpanKind numbers
POLICY = [
    {"principals": ["leaf-*"], "operations": ["sas-token"], "devices": ["{cn}", "{cn}-*"]},
    {"principals": ["leaf-*"], "operations": ["signature", "certificate"], "keys": ["{cn}", "{cn}-*"]},
]


@dataclass(frozen=True)
class Leaf:
    name: str     # principal, device id and HSM key label
    key: bytes    # the device key, imported into the HSM
    bearer: str   # the leaf's bearer token


@pytest.fixture
def leaf(hsm: Hsm) -> Leaf:
    name = "leaf-" + secrets.token_hex(4)
    key = secrets.token_bytes(32)
    hsm.import_secret_key(name, Secret(key))
    return Leaf(name, key, "bearer-" + secrets.token_urlsafe(24))


@pytest.fixture
def service(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, telemetry: Telemetry,
            leaf: Leaf) -> Iterator[ServiceHarness]:
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, bearer={leaf.name: leaf.bearer},
                        telemetry=telemetry, signing_keys=("*-jws",)) as svc:
        yield svc


def one(spans: list[SpanRecord], name: str) -> SpanRecord:
    [span] = [s for s in spans if s.name == name]
    return span


def exported_trace(rx: OtlpReceiver, telemetry: Telemetry, server_span: str, count: int) -> list[SpanRecord]:
    """The `count` spans of the one trace whose server span is `server_span`."""
    assert telemetry.force_flush()
    [server] = rx.wait_for_spans(lambda s: s.name == server_span)
    return rx.wait_for_spans(lambda s: s.trace_id == server.trace_id, count=count)


# --- one trace per request ------------------------------------------------------------------


def test_sas_token_request_is_server_span_then_sas_mint_then_hsm_sign(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    status, _, body = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 200, body
    verify_sas(body["token"], leaf.key)

    spans = exported_trace(rx, telemetry, "POST /v1/sas-tokens", count=3)
    assert sorted(s.name for s in spans) == ["POST /v1/sas-tokens", "hsm.sign", "sas.mint"]
    server, mint, sign = (one(spans, n) for n in ("POST /v1/sas-tokens", "sas.mint", "hsm.sign"))
    assert server.parent_span_id is None
    assert mint.parent_span_id == server.span_id
    assert sign.parent_span_id == mint.span_id  # made on an HSM worker thread, in the request's context
    assert server.trace_id == mint.trace_id == sign.trace_id
    assert (server.kind, mint.kind, sign.kind) == (SPAN_KIND_SERVER, SPAN_KIND_INTERNAL, SPAN_KIND_INTERNAL)

    assert server.attributes["http.route"] == "/v1/sas-tokens"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["enduser.id"] == leaf.name
    assert server.status_code == "UNSET"
    assert mint.attributes["hsm.key.label"] == leaf.name
    assert server.attributes["sas.cache_hit"] is False
    assert sign.attributes == {"hsm.operation": "sign", "hsm.key.label": leaf.name,
                               "hsm.mechanism": "CKM_SHA256_HMAC", "hsm.outcome": "ok"}
    assert sign.resource["service.name"] == "spyrus-hsm-test"


def test_concurrent_requests_each_get_their_own_trace_down_to_their_own_hsm_call(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf, hsm: Hsm) -> None:
    # Requests arriving together share HSM worker jobs (the pool batches them): each signature's
    # span must still hang under its own request.
    devices = {f"{leaf.name}-{i}": secrets.token_bytes(32) for i in range(12)}
    for name, key in devices.items():
        hsm.import_secret_key(name, Secret(key))

    async def burst() -> list[tuple[int, dict[str, str]]]:
        headers = {"Authorization": f"Bearer {leaf.bearer}"}
        connector = aiohttp.TCPConnector(ssl=service.client_context(), limit=len(devices))
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one_token(device: str) -> tuple[int, dict[str, str]]:
                async with session.post(f"{service.url}/v1/sas-tokens", json={"deviceId": device},
                                        headers=headers) as resp:
                    return resp.status, await resp.json()
            return await asyncio.gather(*(one_token(d) for d in devices))

    answers = asyncio.run(burst())
    for (status, body), (device, key) in zip(answers, devices.items(), strict=True):
        assert status == 200, body
        assert verify_sas(body["token"], key)["sr"] == f"hub.example/devices/{device}"

    assert telemetry.force_flush()
    servers = rx.wait_for_spans(lambda s: s.name == "POST /v1/sas-tokens", count=len(devices))
    signs = rx.wait_for_spans(lambda s: s.name == "hsm.sign", count=len(devices))
    mints = {m.span_id: m for m in rx.wait_for_spans(lambda s: s.name == "sas.mint", count=len(devices))}
    assert len({s.trace_id for s in servers}) == len(devices)
    for sign in signs:
        mint = mints[sign.parent_span_id]  # type: ignore[index]
        assert sign.trace_id == mint.trace_id
        assert sign.attributes["hsm.key.label"] == mint.attributes["hsm.key.label"]
        [server] = [s for s in servers if s.span_id == mint.parent_span_id]
        assert server.trace_id == mint.trace_id
    assert sorted(s.attributes["hsm.key.label"] for s in signs) == sorted(devices)


def test_a_cached_token_is_a_trace_without_an_hsm_span(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    first = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert telemetry.force_flush()
    rx.wait_for_spans(lambda s: s.name == "hsm.sign")
    again = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert first[0] == again[0] == 200 and first[2]["token"] == again[2]["token"]

    assert telemetry.force_flush()
    servers = rx.wait_for_spans(lambda s: s.name == "POST /v1/sas-tokens", count=2)
    [hit] = [s for s in servers if s.attributes["sas.cache_hit"]]
    assert [s.name for s in rx.spans if s.trace_id == hit.trace_id] == ["POST /v1/sas-tokens"]  # no sas.mint
    assert [s.name for s in rx.spans if s.trace_id == hit.trace_id and s.name.startswith("hsm.")] == []


def test_route_with_a_parameter_is_named_by_its_template_not_the_path(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf,
        hsm: Hsm, emulator_pki: EmulatorPki) -> None:
    label = leaf.name + "-tls"
    cert = store_hsm_certificate(hsm, label, emulator_pki)
    status, headers, pem = service.call("GET", f"/v1/certificates/{label}", bearer=leaf.bearer)
    assert status == 200, pem
    assert headers["content-type"] == "application/pem-certificate-chain"
    assert x509.load_pem_x509_certificates(pem.encode())[0] == cert
    status, _, problem = service.call("GET", f"/v1/certificates/{leaf.name}-none", bearer=leaf.bearer)
    assert status == 404, problem

    assert telemetry.force_flush()
    servers = rx.wait_for_spans(lambda s: s.name == "GET /v1/certificates/{label}", count=2)
    assert sorted(s.attributes["http.response.status_code"] for s in servers) == [200, 404]
    assert {s.attributes["http.route"] for s in servers} == {"/v1/certificates/{label}"}
    assert not [s for s in rx.spans if label in s.name]  # the raw path names no span
    found = next(s for s in servers if s.attributes["http.response.status_code"] == 200)
    [read] = rx.wait_for_spans(lambda s: s.trace_id == found.trace_id and s.name == "hsm.read_certificates")
    assert read.parent_span_id == found.span_id
    assert (read.attributes["hsm.key.label"], read.attributes["hsm.outcome"]) == (label, "ok")


def test_a_client_traceparent_is_continued(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    status, _, body = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer,
                                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert status == 200, body

    assert telemetry.force_flush()
    spans = rx.wait_for_spans(lambda s: s.trace_id == trace_id, count=3)
    server = one(spans, "POST /v1/sas-tokens")
    assert server.parent_span_id == parent_id
    assert one(spans, "sas.mint").parent_span_id == server.span_id
    assert one(spans, "hsm.sign").parent_span_id == one(spans, "sas.mint").span_id


def test_a_failed_hsm_call_is_recorded_by_outcome_and_error_type(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    no_key = {"deviceId": leaf.name + "-spare"}  # allowed by the policy; no key is stored for it
    status, _, problem = service.call("POST", "/v1/sas-tokens", no_key, bearer=leaf.bearer)
    assert status == 404, problem

    spans = exported_trace(rx, telemetry, "POST /v1/sas-tokens", count=3)
    server, sign = one(spans, "POST /v1/sas-tokens"), one(spans, "hsm.sign")
    assert sign.attributes["hsm.outcome"] == "error"
    assert sign.attributes["error.type"] == "ObjectNotFound"
    assert (sign.status_code, sign.events) == ("ERROR", [])
    assert server.attributes["http.response.status_code"] == 404
    assert server.status_code == "UNSET"  # a 4xx is the client's error, not the server's


# --- what never reaches the collector -------------------------------------------------------


def test_no_secret_reaches_the_collector_the_logs_the_audit_trail_or_an_error_answer(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf, token_env,  # type: ignore[no-untyped-def]
        hsm: Hsm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, sas = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name, "ttlSeconds": 900},
                                  bearer=leaf.bearer)
    assert status == 200, sas
    data = ("to-sign-" + secrets.token_hex(8)).encode()
    hsm.generate_keypair(f"{leaf.name}-jws", KeyAlgorithm.EC_P256)  # declared for signing (signing_keys)
    sign_request = {"key": f"{leaf.name}-jws", "algorithm": "ES256", "data": base64.b64encode(data).decode()}
    status, _, signed = service.call("POST", "/v1/signatures", sign_request, bearer=leaf.bearer)
    assert status == 200, signed
    signature = base64.b64decode(signed["signature"])
    public = hsm.public_key(f"{leaf.name}-jws")
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(ecdsa_raw_to_der(signature), data, ec.ECDSA(hashes.SHA256()))
    wrong_bearer = "bearer-" + secrets.token_urlsafe(24)
    errors = [  # answers that fail, each holding secrets in the request
        service.call("POST", "/v1/signatures", {**sign_request, "algorithm": "HMAC-SHA256"}, bearer=leaf.bearer),
        service.call("POST", "/v1/signatures", {**sign_request, "key": "someone-else"}, bearer=leaf.bearer),
        service.call("POST", "/v1/signatures", {**sign_request, "extra": leaf.bearer}, bearer=leaf.bearer),
        service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=wrong_bearer),
    ]
    assert [e[0] for e in errors][1:] == [403, 400, 401] and 400 <= errors[0][0] < 500, errors

    assert telemetry.force_flush()
    rx.wait_for_spans(lambda s: s.name == "hsm.sign", count=2)  # the SAS token and the ES256 signature
    rx.wait_for_spans(lambda s: s.name.startswith("POST "), count=6)
    rx.wait_for_metric("hsm.operation.duration")
    sig = parse_qs(sas["token"].removeprefix("SharedAccessSignature "))["sig"][0]
    secret_texts = {
        "PIN": token_env.pin.decode(),
        "device key (base64)": base64.b64encode(leaf.key).decode(),
        "device key (base64url)": base64.urlsafe_b64encode(leaf.key).decode().rstrip("="),
        "device key (hex)": leaf.key.hex(),
        "bearer token": leaf.bearer,
        "wrong bearer token": wrong_bearer,
        "SAS token": sas["token"],
        "SAS signature": sig,
        "SAS signature (as sent)": sas["token"].split("sig=")[1].split("&")[0],
        "data to sign": data.decode(),
        "data to sign (base64)": base64.b64encode(data).decode(),
        "signature (base64)": signed["signature"],
        "signature (hex)": signature.hex(),
    }
    texts = all_attribute_values(rx)
    assert any(f"hsm.key.label={leaf.name!r}" in t for t in texts)  # the scan sees attributes at all
    places = {"exported telemetry": "\n".join(texts), "logs": caplog.text,
              "audit trail": service.audit_file.read_text(), "error answers": repr(errors)}
    leaked = [(what, where) for what, value in secret_texts.items() for where, text in places.items()
              if value in text]
    assert leaked == []


# --- metrics ----------------------------------------------------------------------------------


def test_request_hsm_cache_and_queue_metrics_arrive(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    for _ in range(2):  # a miss that signs, then a hit from the cache
        status, _, body = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
        assert status == 200, body

    def latest(name: str, **attributes: object) -> float:
        points = rx.wait_for_metric(name)
        matching = [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
        assert matching, f"no {name} point with {attributes}: {[p.attributes for p in points]}"
        last = matching[-1]
        return float(last.count if last.count is not None else last.value or 0)

    assert telemetry.force_flush()
    assert latest("http.server.request.duration", **{
        "http.route": "/v1/sas-tokens", "http.request.method": "POST", "http.response.status_code": 200}) >= 2
    assert latest("hsm.operation.duration", **{
        "hsm.operation": "sign", "hsm.mechanism": "CKM_SHA256_HMAC", "hsm.outcome": "ok"}) >= 1
    assert latest("cache.misses") >= 1
    assert latest("cache.hits") >= 1
    [depth] = rx.wait_for_metric("hsm.queue.depth")[-1:]
    assert depth.kind == "gauge" and depth.value == 0  # nothing waiting once the requests are answered
    http_point = rx.wait_for_metric("http.server.request.duration")[-1]
    assert (http_point.kind, http_point.unit) == ("histogram", "s")


def test_a_requests_span_and_duration_include_its_wait_for_a_turn(
        rx: OtlpReceiver, telemetry: Telemetry, service: ServiceHarness, leaf: Leaf) -> None:
    """In a storm requests wait for the pacer (service/pacing.py) before their work starts; that
    wait is part of what a leaf sees. Before, the pacer sat outside the telemetry middleware and
    the span and http.server.request.duration left it out. Here every turn takes 0.3 s."""
    from spyrus_hsm.service.appkeys import PACER

    assert service.listeners is not None
    [pacer] = [r.app[PACER] for r in service.listeners.runners if PACER in r.app]
    original = pacer.turn

    async def slow_turn() -> None:
        await asyncio.sleep(0.3)
        await original()

    pacer.turn = slow_turn  # type: ignore[method-assign]
    status, _, body = service.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 200, body
    assert telemetry.force_flush()
    [server] = rx.wait_for_spans(lambda s: s.name == "POST /v1/sas-tokens")
    assert server.end_ns - server.start_ns >= 300_000_000
