"""The HTTP service started for real in a test: its own event loop on a thread, a real HTTPS
socket on loopback, the session's SoftHSM token, a PKI for server and leaf certificates.

    with ServiceHarness(hsm, tmp_path, pki, policy=[...], bearer={"gw": token}) as svc:
        status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": "d"}, bearer=token)
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import addresses
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from emulator.pki import EmulatorPki, Issued, PemFiles, issue_from_csr, make_ca
from spyrus_hsm.config import CloudConfig, PolicyRule, ServiceConfig, service_section
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, Secret
from spyrus_hsm.identity.csr import build_csr
from spyrus_hsm.service.api_tls import ServerTls
from spyrus_hsm.service.audit import AuditLog
from spyrus_hsm.service.core import Deps, Service
from spyrus_hsm.service.problems import TYPE_BASE
from spyrus_hsm.service.server import Listeners, probe_forever
from spyrus_hsm.telemetry import Telemetry, disabled, hsm_instrument

HOST = addresses.host()  # the services started here listen on this session's own address


def rules(*specs: dict[str, Any]) -> tuple[PolicyRule, ...]:
    return service_section({"policy": list(specs), "tls_cert_file": "x", "tls_key_file": "y"}, "test").policy


class ServiceHarness:
    def __init__(self, hsm: Hsm, directory: Path, pki: EmulatorPki, *, policy: list[dict[str, Any]] | None = None,
                 bearer: dict[str, str] | None = None, telemetry: Telemetry | None = None,
                 cloud: CloudConfig | None = None, audit_file: Path | None = None, probe: bool = False,
                 **overrides: Any) -> None:
        self.hsm = hsm
        self.directory = directory
        self.pki = pki
        server = pki.server([HOST])
        self.server_ca = pki.ca_file
        self.leaf_ca = directory / "leaf-ca.pem"
        self.leaf_ca.write_text(pki.intermediate.cert_pem)
        raw = {
            "host": HOST, "port": 0, "health_host": HOST, "health_port": 0, "tls_cert_file": str(server.cert_file),
            "tls_key_file": str(server.key_file), "client_ca_file": str(self.leaf_ca),
            "bearer_tokens": {name: hashlib.sha256(tok.encode()).hexdigest() for name, tok in (bearer or {}).items()},
            "policy": policy or [], "hub": "hub.example",
        }
        self.cfg: ServiceConfig = replace(service_section(raw, "test"), **overrides)
        self.telemetry = telemetry or disabled()
        self.audit_file = audit_file or directory / "audit.log"
        self.cloud = cloud or CloudConfig()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="service-loop", daemon=True)
        self.service: Service | None = None
        self.listeners: Listeners | None = None
        self.port = 0
        self.health_port: int | None = None
        self.probe = probe  # run the HSM probe as `serve` does (/readyz notices an idle unplug)
        self._probe_stop: asyncio.Event | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> ServiceHarness:
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _start(self) -> None:
        # Wired as runtime.Module wires it: HSM spans and the queue-depth gauge.
        self.hsm.instrument(hsm_instrument(self.telemetry))
        self.telemetry.metrics.watch_queue_depth(self.hsm.queue_depth)
        deps = Deps(self.hsm, self.telemetry, self.directory / "state", self.cloud, lambda: None, 3600, None)
        self.service = Service(self.cfg, deps, AuditLog(str(self.audit_file), self.cfg.audit_fail_closed))
        self.listeners = Listeners(self.service)
        await self.listeners.start_api(await asyncio.to_thread(ServerTls, self.cfg, self.hsm, self.directory / "tls"))
        assert self.listeners.api_port
        self.port = self.listeners.api_port
        await self.listeners.start_health()  # only with health_port=<a free port>: 0 means none
        self.health_port = self.listeners.health_port
        if self.probe:
            self._probe_stop = asyncio.Event()
            self._probe_task = asyncio.ensure_future(probe_forever(self.hsm, self._probe_stop))

    async def _stop_probe(self) -> None:
        if self._probe_stop is not None and self._probe_task is not None:
            self._probe_stop.set()
            await self._probe_task

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        self.run(self._stop_probe())
        if self.listeners is not None:
            self.run(self.listeners.stop())
            self.listeners = None
        self.hsm.instrument(None)
        if self.service is not None:
            self.service.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- clients --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def client_context(self, cert: PemFiles | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.server_ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
        return ctx

    def call(self, method: str, path: str, body: Any = None, *, bearer: str | None = None,
             cert: PemFiles | None = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPSConnection(HOST, self.port, context=self.client_context(cert), timeout=30)
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if bearer is not None:
            hdrs["Authorization"] = f"Bearer {bearer}"
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        ctype = resp.headers.get("Content-Type", "")
        parsed: Any = json.loads(payload) if "json" in ctype else payload.decode()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, parsed

    def audit_records(self) -> list[dict[str, Any]]:
        if self.service is not None:
            self.service.audit.flush()  # records nobody waited for are written behind the answers
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines() if line]


@dataclass(frozen=True)
class Leaf:
    """A leaf device: its primary key is in the HSM under its name, and it has a bearer token."""
    name: str
    key: bytes
    bearer: str


def new_leaf(hsm: Hsm, prefix: str = "leaf") -> Leaf:
    """A leaf with a unique name (the session's token is shared by every test)."""
    leaf = Leaf(f"{prefix}-{secrets.token_hex(3)}", secrets.token_bytes(32), secrets.token_urlsafe(24))
    hsm.import_secret_key(leaf.name, Secret(leaf.key))
    return leaf


def problem_type(headers: dict[str, str], body: Any) -> str:
    """The short type of an RFC 9457 answer (TYPE_BASE removed); fails if the answer is not one."""
    assert headers["content-type"].startswith("application/problem+json"), body
    assert isinstance(body, dict) and body["type"].startswith(TYPE_BASE), body
    return str(body["type"][len(TYPE_BASE):])


def other_ca_leaf(pki: EmulatorPki, cn: str) -> PemFiles:
    """A leaf certificate from a CA the service does not trust."""
    return pki.device(cn, make_ca("Some Other CA"), name=f"other-{cn}")


def verify_sas(token: str, key: bytes) -> dict[str, str]:
    """Check a SAS token the way IoT Hub does (software HMAC with the device key)."""
    assert token.startswith("SharedAccessSignature ")
    fields = {k: v[0] for k, v in parse_qs(token[len("SharedAccessSignature "):]).items()}
    expected = base64.b64encode(hmac.new(
        key, f"{quote(fields['sr'], safe='')}\n{fields['se']}".encode(), hashlib.sha256).digest()).decode()
    assert hmac.compare_digest(fields["sig"], expected), "SAS signature does not verify"
    return fields


def store_hsm_certificate(hsm: Hsm, label: str, pki: EmulatorPki, *, server_ip: str | None = None,
                          issuing: bool = False,
                          valid: tuple[dt.timedelta, dt.timedelta] | None = None) -> x509.Certificate:
    """A key pair generated in the HSM and a certificate for it from the PKI's intermediate CA,
    stored beside it with the intermediate; with `server_ip`, a TLS server certificate for it
    and `localhost`; with `issuing` too, one that can certify the API's short-lived keys, in the
    profile `make run`'s development PKI gives it (docs/security/api-tls.md): a path-length-0 CA
    with keyUsage keyCertSign + digitalSignature, extendedKeyUsage serverAuth only, and no
    nameConstraints, which mbedTLS and wolfSSL leaves cannot take. `valid`: its notBefore and
    notAfter relative to now (default: 5 minutes ago to a day from now; an issuing one, two days,
    as the API certifies with nothing that ends within identity.service_ca.BACKDATE)."""
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    now = dt.datetime.now(dt.UTC)
    issuer = pki.intermediate
    builder = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(f"CN={label}"))
               .issuer_name(issuer.cert.subject).public_key(hsm.public_key(label))
               .serial_number(x509.random_serial_number()))
    since, until = valid or (-dt.timedelta(minutes=5), dt.timedelta(days=2 if issuing else 1))
    builder = builder.not_valid_before(now + since).not_valid_after(now + until)
    if server_ip is not None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(server_ip))]
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if issuing:
            usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                  data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                                  encipher_only=False, decipher_only=False)
            builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                       .add_extension(usage, critical=True)
                       .add_extension(x509.SubjectKeyIdentifier.from_public_key(hsm.public_key(label)),  # type: ignore[arg-type]
                                      critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                                      critical=False))
    cert = builder.sign(issuer.key, hashes.SHA256())
    hsm.import_certificates(label, [cert, issuer.cert])
    return cert


def certify_hsm_key(hsm: Hsm, label: str, common_name: str, issuer: Issued, *, server: bool = False,
                    validity: dt.timedelta = dt.timedelta(days=1)) -> x509.Certificate:
    """A key pair generated in the HSM, a CSR signed there with CN=`common_name`, and the
    certificate `issuer` issues for it (a client one, or with `server` a TLS server one for that
    DNS name), stored beside the key with the issuer's chain."""
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    csr = x509.load_der_x509_csr(build_csr(hsm, label, f"CN={common_name}"))
    cert = issue_from_csr(issuer, csr, validity, server_names=(common_name,) if server else ())
    hsm.import_certificates(label, [cert, issuer.cert, *issuer.chain])
    return cert


# --- `spyrus-hsm serve` in a subprocess ---------------------------------------------------------------


def free_port() -> int:
    """A port on HOST that this test session has given to no one else (tests/addresses.py)."""
    return addresses.port(HOST)


def serve_config(directory: Path, token_env: Any, pki: EmulatorPki, service: dict[str, Any]) -> Path:
    """A config file for `serve` on the session's token (token_env: conftest's TokenEnv), serving
    HTTPS on HOST with a certificate from `pki`. `service` overrides the service section; its
    'bearer' maps principals to tokens (their digests are written); None removes a setting."""
    server = pki.server([HOST])
    section = {
        "host": HOST, "port": 0, "health_host": HOST, "health_port": 0,
        "tls_cert_file": str(server.cert_file), "tls_key_file": str(server.key_file), "hub": "hub.example",
    }
    overrides = dict(service)
    bearer = overrides.pop("bearer", {})
    section["bearer_tokens"] = {name: hashlib.sha256(tok.encode()).hexdigest() for name, tok in bearer.items()}
    section.update(overrides)
    section = {k: v for k, v in section.items() if v is not None}
    config = {
        "hsm": {"module": token_env.module, "token_label": token_env.label, "pin_file": str(token_env.pin_file)},
        "state_dir": str(directory / "state"),
        "service": section,
    }
    path = directory / "serve.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def wait_for_lines(proc: subprocess.Popen[bytes], markers: tuple[str, ...], within: float) -> dict[str, str]:
    """The first line of `serve`'s standard output containing each of `markers` (e.g. "API on
    https://"), read as they come; AssertionError if they do not all come within `within` s."""
    assert proc.stdout is not None
    found: dict[str, str] = {}
    end = time.monotonic() + within
    while time.monotonic() < end and len(found) < len(markers):
        line = proc.stdout.readline().decode()
        if not line:
            break
        found.update({m: line.strip() for m in markers if m in line and m not in found})
    assert len(found) == len(markers), f"serve printed {found} (exit code {proc.poll()})"
    return found


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as edgeAgent stops a module; killed if still running 10 s later."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask_sas_token(port: int, ctx: ssl.SSLContext, bearer: str, device: str) -> int:
    """POST /v1/sas-tokens for `device` on a fresh connection; the status."""
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/sas-tokens", body=json.dumps({"deviceId": device}),
                     headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def slot_of(token_env: Any, label: str) -> int:
    """The slot id of token `label` as a new process sees it (what `serve` and the shim's
    unplug_slot use): SoftHSM2 numbers slots anew when it loads, so the ids in a process that
    created the tokens after loading it differ."""
    code = ("import sys, pkcs11\n"
            "lib = pkcs11.lib(sys.argv[1])\n"
            "print(next(s.slot_id for s in lib.get_slots(token_present=True) if s.get_token().label == sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, "/usr/lib/softhsm/libsofthsm2.so", label], env=token_env.env(),
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


class ClientThreads:
    """`clients` threads, each calling `one(n)` (n counting up from its index, by `clients`) until
    the `with` block ends; what `one` raises is kept in `bad` as the failure of that request."""

    def __init__(self, clients: int) -> None:
        self.bad: list[str] = []
        self._clients = clients
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def one(self, n: int) -> None:
        raise NotImplementedError

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            try:
                self.one(n)
            except Exception as exc:  # the test shows them
                self.bad.append(repr(exc))
            n += self._clients

    def __enter__(self) -> Any:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
