"""Hostile requests written byte by byte over a real TLS socket: what aiohttp's parser refuses
(bare LF, NUL in a header, a malformed request line, an over-long header, an unknown Expect),
bodies that stall, that are announced too large behind `Expect: 100-continue`, that stop half
way, that nest deeply or repeat a key, and certificates of CAs presented as a leaf's.

Every answer is problem+json 4xx, never 5xx, and never repeats the request; the bearer token and
the PIN never reach a log line, here (caplog) or from `spyrus-hsm serve` with either of
aiohttp's HTTP parsers (its stderr).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_harness import HOST, Leaf, ServiceHarness, free_port, new_leaf, problem_type, serve_config, verify_sas
from waiting import wait_for

from emulator.pki import EmulatorPki, Issued, PemFiles
from spyrus_hsm.hsm import Hsm

pytestmark = pytest.mark.timeout(120)

OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}
MAX_BODY = 4096
REQUEST_TIMEOUT = 1.0  # seconds: how long a stalled body is waited for here (15 s by default)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes  # everything the server sent, interim answers included

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    svc: ServiceHarness
    leaf: Leaf
    pin: bytes

    def connect(self) -> ssl.SSLSocket:
        # from the session's own address, so that the audit's remote is known
        sock = socket.create_connection((HOST, self.svc.port), timeout=10, source_address=(HOST, 0))
        return self.svc.client_context().wrap_socket(sock, server_hostname=HOST)

    def send(self, data: bytes) -> Answer:
        with self.connect() as conn:
            conn.sendall(data)
            return read_answer(conn)

    def request(self, body: bytes, *, extra: bytes = b"") -> bytes:
        """A well-formed token request with `body` sent as it is."""
        return (b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + self.leaf.bearer.encode()
                + b"\r\nContent-Type: application/json\r\n" + extra
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def read_answer(conn: socket.socket) -> Answer:
    """One HTTP/1.1 response: status line, headers, Content-Length bytes of body (or up to EOF)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before a complete answer: {raw!r}"
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if status < 200 else int(headers.get("content-length", "-1"))
    body = rest
    while len(body) < length or length < 0:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status, headers, body, head + b"\r\n\r\n" + body)


def assert_refused(answer: Answer, site: Site, status: int | None = None) -> str:
    """A problem+json 4xx that quotes nothing of the request; returns its short type."""
    assert 400 <= answer.status < 500, answer.raw
    assert status is None or answer.status == status, answer.raw
    kind = problem_type(answer.headers, answer.json())
    assert site.leaf.bearer.encode() not in answer.raw
    assert b"Authorization" not in answer.raw and b"Bearer" not in answer.raw
    return kind


def assert_log_clean(caplog: pytest.LogCaptureFixture, site: Site) -> None:
    text = caplog.text
    assert site.leaf.bearer not in text and site.pin.decode() not in text
    assert "Traceback" not in text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


@pytest.fixture(scope="module")
def site(hsm: Hsm, token_env: Any, emulator_pki: EmulatorPki,  # TokenEnv (a shadowed conftest)
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    leaf = new_leaf(hsm, "hostile")
    with ServiceHarness(hsm, tmp_path_factory.mktemp("hostile"), emulator_pki, policy=[OWN_DEVICE],
                        bearer={leaf.name: leaf.bearer}, max_body_bytes=MAX_BODY,
                        request_timeout=REQUEST_TIMEOUT, rate_limit_per_second=0.0) as svc:
        yield Site(svc, leaf, token_env.pin)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


# --- what the HTTP parser refuses ----------------------------------------------------------------

BEARER = b"@BEARER@"  # replaced by the leaf's real token
MALFORMED = {
    "bare LF": b"POST /v1/sas-tokens HTTP/1.1\nHost: x\nAuthorization: Bearer @BEARER@\n"
               b"Content-Type: application/json\nContent-Length: 2\n\n{}",
    "NUL after the token": b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @BEARER@\x00\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "space in a header name": b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @BEARER@\r\n"
                              b"Bad Name: @BEARER@\r\nContent-Length: 2\r\n\r\n{}",
    "malformed request line": b"POST /v1/sas-tokens?@BEARER@ HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "not HTTP": b"\x16\x03\x01 @BEARER@\r\n\r\n",
    "bad chunked body": b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @BEARER@\r\n"
                        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"zz@BEARER@\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_the_parser_refuses_is_400_without_echo_and_one_warning(
        site: Site, logs: pytest.LogCaptureFixture, request_bytes: bytes) -> None:
    answer = site.send(request_bytes.replace(BEARER, site.leaf.bearer.encode()))
    kind = assert_refused(answer, site, 400)
    assert kind in ("malformed-request", "invalid-request")
    assert_log_clean(logs, site)
    warnings = [r for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, logs.text


def test_an_over_long_header_is_431(site: Site, logs: pytest.LogCaptureFixture) -> None:
    answer = site.send(site.request(b"{}", extra=b"X-Padding: " + b"a" * 9000 + b"\r\n"))
    assert assert_refused(answer, site, 431) == "header-too-large"
    assert_log_clean(logs, site)
    assert [r.levelno for r in logs.records if r.name.startswith(("aiohttp", "spyrus_hsm"))] == [logging.WARNING]


def test_an_unknown_expectation_is_417_without_echo(site: Site, logs: pytest.LogCaptureFixture) -> None:
    secret = secrets.token_urlsafe(12)
    answer = site.send(site.request(b"{}", extra=b"Expect: " + secret.encode() + b"\r\n"))
    assert assert_refused(answer, site, 417) == "expectation-failed"
    assert secret.encode() not in answer.raw
    assert_log_clean(logs, site)


# --- bodies --------------------------------------------------------------------------------------


def test_a_stalled_body_is_408_the_clients_fault(site: Site, logs: pytest.LogCaptureFixture) -> None:
    with site.connect() as conn:
        conn.sendall(site.request(b'{"deviceId": "' + site.leaf.name.encode() + b'"}')[:-10])  # 10 bytes short
        answer = read_answer(conn)  # after REQUEST_TIMEOUT
    assert assert_refused(answer, site, 408) == "body-timeout"
    assert_log_clean(logs, site)


def test_a_slow_body_trickling_in_is_408(site: Site, logs: pytest.LogCaptureFixture) -> None:
    body = b'{"deviceId": "' + site.leaf.name.encode() + b'"}'
    with site.connect() as conn:
        whole = site.request(body)
        conn.sendall(whole[:-len(body)])
        conn.settimeout(0.3)
        answer = None
        for byte in body:  # one byte each 0.3 s: the body takes longer than the request timeout
            try:
                conn.sendall(bytes([byte]))
                answer = read_answer(conn)
                break
            except TimeoutError:
                continue
        assert answer is not None, "the whole body was read"
    assert assert_refused(answer, site, 408) == "body-timeout"


def test_an_oversize_body_behind_expect_100_continue_is_413_at_once(site: Site) -> None:
    head = (b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + site.leaf.bearer.encode()
            + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: "
            + str(MAX_BODY + 1).encode() + b"\r\n\r\n")
    with site.connect() as conn:
        conn.sendall(head)
        # Well before the request timeout: the body is refused without waiting for it.
        conn.settimeout(REQUEST_TIMEOUT / 2)
        answer = read_answer(conn)
    assert assert_refused(answer, site, 413) == "payload-too-large"


def test_a_body_that_fits_behind_expect_100_continue_is_invited_and_served(site: Site) -> None:
    body = json.dumps({"deviceId": site.leaf.name}).encode()
    with site.connect() as conn:
        conn.sendall(site.request(body, extra=b"Expect: 100-continue\r\n")[:-len(body)])
        interim = read_answer(conn)
        assert interim.status == 100
        conn.sendall(body)
        answer = read_answer(conn)
    assert answer.status == 200, answer.raw
    verify_sas(answer.json()["token"], site.leaf.key)


def test_a_client_that_disconnects_mid_body_is_audited_as_aborted(site: Site, logs: pytest.LogCaptureFixture) -> None:
    request_id = secrets.token_hex(8)
    with site.connect() as conn:
        conn.sendall(site.request(b'{"deviceId": "' + site.leaf.name.encode() + b'"}',
                                  extra=f"X-Request-Id: {request_id}\r\n".encode())[:-5])
    found = wait_for(lambda: [r for r in site.svc.audit_records() if r["requestId"] == request_id], 10,
                     "the aborted request's audit record", every=0.05)
    assert len(found) == 1, found
    record = found[0]
    assert record["outcome"] == "aborted" and record["status"] is None, record
    assert record["remote"] == HOST
    assert_log_clean(logs, site)
    assert any("disconnected" in r.getMessage() for r in logs.records if r.levelno == logging.INFO), logs.text


@pytest.mark.parametrize("depth", [100, 990, 2000])
def test_deeply_nested_json_under_the_size_limit_is_400(site: Site, logs: pytest.LogCaptureFixture,
                                                         depth: int) -> None:
    body = b'{"deviceId": "x", "moduleId": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) <= MAX_BODY
    answer = site.send(site.request(body))
    assert assert_refused(answer, site, 400) == "invalid-request"
    assert_log_clean(logs, site)


@pytest.mark.parametrize("body, key", [
    (b'{"deviceId": "a", "deviceId": "b"}', "deviceId"),
    (b'{"deviceId": "a", "moduleId": {"m": 1, "n": {"m": 2, "m": 3}}}', "m"),
], ids=["top level", "nested"])
def test_a_duplicate_key_is_400_naming_it(site: Site, body: bytes, key: str) -> None:
    answer = site.send(site.request(body))
    assert assert_refused(answer, site, 400) == "invalid-request"
    assert f"'{key}' appears more than once" in answer.json()["detail"]


# --- certificates of CAs presented as a leaf's -----------------------------------------------


def issued_by(pki: EmulatorPki, cn: str, *, ca: bool, cert_sign: bool, client_auth: bool) -> PemFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(pki.intermediate.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                                            crl_sign=cert_sign, encipher_only=False, decipher_only=False),
                              critical=True))
    if client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(pki.intermediate.key, hashes.SHA256())
    return Issued(cert, key, (pki.intermediate.cert,)).write(pki.directory, f"ca-leaf-{secrets.token_hex(3)}")


@pytest.mark.parametrize("ca, cert_sign, client_auth, fragment", [
    (True, True, True, "CA:TRUE"),
    (True, True, False, "CA:TRUE"),
    (True, False, True, "CA:TRUE"),
    (False, True, True, "keyCertSign"),
], ids=["CA with clientAuth", "CA without EKU", "CA:TRUE only", "keyCertSign only"])
def test_a_ca_certificate_is_not_accepted_as_a_leaf(site: Site, emulator_pki: EmulatorPki, ca: bool,
                                                    cert_sign: bool, client_auth: bool, fragment: str) -> None:
    cert = issued_by(emulator_pki, site.leaf.name, ca=ca, cert_sign=cert_sign, client_auth=client_auth)
    status, headers, body = site.svc.call("POST", "/v1/sas-tokens", {"deviceId": site.leaf.name}, cert=cert)
    assert status == 401 and problem_type(headers, body) == "certificate-rejected", body
    assert fragment in body["detail"]
    assert "token" not in body


def test_a_leaf_certificate_from_the_same_ca_is_accepted(site: Site, emulator_pki: EmulatorPki) -> None:
    """The refusals above are about the CA flags, not the way the certificates are made."""
    cert = issued_by(emulator_pki, site.leaf.name, ca=False, cert_sign=False, client_auth=True)
    status, _, body = site.svc.call("POST", "/v1/sas-tokens", {"deviceId": site.leaf.name}, cert=cert)
    assert status == 200, body
    verify_sas(body["token"], site.leaf.key)


# --- the real process, with either HTTP parser -----------------------------------------------------


@pytest.mark.parametrize("parser", ["C", "pure Python"])
def test_serve_logs_no_request_bytes_with_either_parser(parser: str, hsm: Hsm, token_env: Any, tmp_path: Path,
                                                        emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm, "hostile")
    port, health_port = free_port(), free_port()
    config = serve_config(tmp_path, token_env, emulator_pki, {
        "port": port, "health_port": health_port, "policy": [OWN_DEVICE], "bearer": {leaf.name: leaf.bearer}})
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
    if parser == "pure Python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
    err_file = tmp_path / "serve.err"
    with err_file.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "-v", "serve"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        answers = []
        try:
            wait_until_ready(health_port, proc)
            body = json.dumps({"deviceId": leaf.name}).encode()
            odd_id = (b"POST /v1/sas-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @BEARER@\r\n"
                      b"X-Request-Id: \xff\xfeid\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            for request_bytes in (MALFORMED["bare LF"], MALFORMED["NUL after the token"],
                                  MALFORMED["bad chunked body"], odd_id):
                with socket.create_connection((HOST, port), timeout=10) as sock, \
                        ctx.wrap_socket(sock, server_hostname=HOST) as conn:
                    conn.sendall(request_bytes.replace(BEARER, leaf.bearer.encode()))
                    answers.append(read_answer(conn))
            with socket.create_connection((HOST, health_port), timeout=10) as plain:  # the health listener
                plain.sendall(MALFORMED["bare LF"].replace(BEARER, leaf.bearer.encode()))
                answers.append(read_answer(plain))
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0].decode()
    log = err_file.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert [a.status for a in answers] == [400, 400, 400, 200, 400], [a.raw for a in answers]
    assert re.fullmatch("[0-9a-f]{32}", answers[3].headers["x-request-id"])  # a fresh id, not the odd bytes
    assert all(leaf.bearer.encode() not in a.raw for a in answers)
    assert leaf.bearer not in out + log and token_env.pin.decode() not in out + log
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert log.count("refused a malformed request") == 4, log[-3000:]


def wait_until_ready(health_port: int, proc: subprocess.Popen[bytes], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        conn = http.client.HTTPConnection(HOST, health_port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise AssertionError(f"serve was not ready within {within} s")
