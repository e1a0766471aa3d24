"""IoT Hub and DPS with credentials in the HSM, end to end: real SDK, real MQTT over TLS, real
SoftHSM2, real pkcs11-provider, against tests/emulator (which checks credentials for real)."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import addresses
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from service_harness import certify_hsm_key
from tls_client import client_context
from token_matrix import HMAC_IMPORT, TOKEN_INIT, needs
from waiting import wait_for

from emulator import pki as epki
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner, RegistrationError
from spyrus_hsm.cloud.hub import HubClient, HubIdentity
from spyrus_hsm.files import read_json, write_json_atomic
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, Secret
from spyrus_hsm.identity import tls
from spyrus_hsm.identity import x509 as x509_id
from spyrus_hsm.identity.csr import build_csr
from spyrus_hsm.sdkerrors import HubCredentialRefused, HubTimeout

pytestmark = pytest.mark.timeout(90)
HOST = addresses.host()
SCOPE = "0ne000C10D"


def _x509_client(hsm: Hsm, label: str, device_id: str, ca_pem: str, state: Path) -> HubClient:
    cred = x509_id.select(hsm, label=label)
    files = x509_id.write_tls_files(cred, hsm.state.token_label or "", state)
    return HubClient(hsm, HubIdentity(HOST, device_id, x509=files, server_ca_pem=ca_pem))


# --- IoT Hub, X.509 --------------------------------------------------------------------------

@pytest.mark.token_matrix
def test_x509_device_with_its_key_in_the_hsm_connects_and_sends_telemetry(
        hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    device = "x509-" + label
    certify_hsm_key(hsm, label, device, emulator_pki.intermediate)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    client = _x509_client(hsm, label, device, emulator_pki.ca_pem, tmp_path).connect()
    try:
        client.send(json.dumps({"temp": 21.5}))
        emu.wait_for(lambda: any(t.device_id == device for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()
    sent = [t for t in emu.received.telemetry if t.device_id == device]
    assert sent[0].json() == {"temp": 21.5}
    assert any(c.client_id == device and c.auth_method == "x509" and c.accepted for c in emu.received.connects)


@pytest.mark.token_matrix
def test_x509_certificate_from_another_ca_is_refused(hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other_ca = epki.make_ca("Other Fleet CA")
    emu.add_device("other-fleet-device", x509_ca_pem=other_ca.cert_pem)
    device = "x509-" + label
    certify_hsm_key(hsm, label, device, other_ca)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    client = _x509_client(hsm, label, device, emulator_pki.ca_pem, tmp_path)
    with pytest.raises(HubCredentialRefused, match=f"IoT Hub {HOST} .* refused the credential"):
        client.connect()
    client.shutdown()


@pytest.mark.token_matrix
def test_x509_certificate_with_another_cn_is_refused(hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    device = "x509-" + label
    certify_hsm_key(hsm, label, device + "-not-me", emulator_pki.intermediate)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    client = _x509_client(hsm, label, device, emulator_pki.ca_pem, tmp_path)
    with pytest.raises(HubCredentialRefused, match=f"IoT Hub {HOST} .* refused the credential"):
        client.connect()
    client.shutdown()


# --- IoT Hub, SAS ------------------------------------------------------------------------------

def _sas_key(hsm: Hsm, label: str) -> str:
    import base64

    raw = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(raw))
    return base64.b64encode(raw).decode()


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_sas_device_renews_through_the_hsm_and_stays_connected(hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    device = "sas-" + label
    emu.add_device(device, symmetric_key=_sas_key(hsm, label))
    client = HubClient(hsm, HubIdentity(HOST, device, sas_key=label, server_ca_pem=emulator_pki.ca_pem),
                       sas_ttl=5, renew_at=0.6).connect()
    try:
        wait_for(lambda: client.stats.renewals >= 3, 20, "three SAS renewals", every=0.2)

        def accepted() -> list[object]:
            return [c for c in emu.received.connects if c.client_id == device and c.accepted]

        # the first connection and one re-authorisation per renewal
        wait_for(lambda: len(accepted()) >= 4, 10, "four accepted connects")
        assert client.connected
        client.send("still here")
        emu.wait_for(lambda: any(t.device_id == device for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()
    assert client.stats.rebuilds == 0
    assert not [d for d in emu.received.disconnects if d.client_id == device and "expired" in d.reason]


def test_module_identity_with_hsm_sas(hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    device, module = "edge-" + label, "spyrus_hsm"
    emu.add_device(device, symmetric_key=_sas_key(hsm, label + "-dev"))
    emu.add_module(device, module, symmetric_key=_sas_key(hsm, label))
    client = HubClient(hsm, HubIdentity(HOST, device, module, sas_key=label,
                                        server_ca_pem=emulator_pki.ca_pem)).connect()
    try:
        client.send("from the module")
        emu.wait_for(lambda: any(t.module_id == module and t.device_id == device
                                 for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()


def test_sas_token_signed_with_another_key_is_refused(hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    import base64

    device = "sas-" + label
    emu.add_device(device, symmetric_key=base64.b64encode(secrets.token_bytes(32)).decode())
    _sas_key(hsm, label)  # a different key
    client = HubClient(hsm, HubIdentity(HOST, device, sas_key=label, server_ca_pem=emulator_pki.ca_pem))
    with pytest.raises(HubCredentialRefused, match=f"IoT Hub {HOST} .* refused the credential"):
        client.connect()
    client.shutdown()


# --- DPS -------------------------------------------------------------------------------------

def _req(reg: str, **kw) -> DpsRequest:  # type: ignore[no-untyped-def]
    return DpsRequest(id_scope=SCOPE, registration_id=reg, provisioning_host=HOST, **kw)


@pytest.mark.token_matrix
def test_dps_x509_registration_is_assigned_then_connects(hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpsx-" + label
    certify_hsm_key(hsm, label, reg, emulator_pki.intermediate)
    emu.add_individual_enrollment(reg, x509_ca_pem=emulator_pki.root.cert_pem, assigned_hub=HOST)
    a = Provisioner(hsm, tmp_path).register(_req(reg, attestation="x509", key=label,
                                                 server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert (a.status, a.assigned_hub, a.device_id) == ("assigned", HOST, reg)
    client = _x509_client(hsm, label, a.device_id, emulator_pki.ca_pem, tmp_path).connect()
    client.shutdown()


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_dps_symmetric_individual_is_assigned_and_persisted(hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpss-" + label
    emu.add_individual_enrollment(reg, symmetric_key=_sas_key(hsm, label), assigned_hub=HOST)
    prov = Provisioner(hsm, tmp_path)
    req = _req(reg, attestation="symmetricKey", key=label, server_ca_pem=emulator_pki.ca_pem,
               payload={"site": "plant-7"})
    a = prov.register(req, timeout=30)
    assert (a.status, a.device_id, a.substatus) == ("assigned", reg, "initialAssignment")
    assert read_json(prov.result_path(reg))["assigned_hub"] == HOST
    assert next(r.payload for r in emu.received.registrations if r.registration_id == reg) == {"site": "plant-7"}
    n = len(emu.received.registrations)
    assert prov.register(req) == a          # reused: the identity did not change
    assert len(emu.received.registrations) == n
    prov.register(req, force=True, timeout=30)  # asked for: registers again
    assert len(emu.received.registrations) == n + 1


def test_dps_group_enrollment_uses_a_device_key_derived_in_the_hsm(hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpsg-" + label
    emu.add_group_enrollment("group-" + label, symmetric_key=_sas_key(hsm, label), assigned_hub=HOST)
    a = Provisioner(hsm, tmp_path).register(
        _req(reg, attestation="symmetricKey", key=label, group=True, server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert a.status == "assigned" and a.key == f"{label}.{reg}"
    derived = next(o for o in hsm.list_objects() if o.label == a.key)
    assert (derived.sensitive, derived.extractable) == (True, False)


def test_dps_throttled_with_429_then_assigned(hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpst-" + label
    emu.add_individual_enrollment(reg, symmetric_key=_sas_key(hsm, label), assigned_hub=HOST)
    emu.throttle_dps(times=1, retry_after=1)
    a = Provisioner(hsm, tmp_path).register(
        _req(reg, attestation="symmetricKey", key=label, server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert a.status == "assigned"
    assert [r.status_code for r in emu.received.registrations if r.registration_id == reg][:1] == [429]


def test_dps_wrong_key_gives_a_clear_error_and_keeps_the_old_result(hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import base64

    reg = "dpsw-" + label
    emu.add_individual_enrollment(reg, symmetric_key=base64.b64encode(secrets.token_bytes(32)).decode())
    _sas_key(hsm, label)
    prov = Provisioner(hsm, tmp_path)
    with pytest.raises(RegistrationError, match="refused the credentials") as info:
        prov.register(_req(reg, attestation="symmetricKey", key=label, server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert SCOPE in str(info.value)
    assert prov.cached(reg) is None


def test_dps_incomplete_chain_is_refused_before_connecting(hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpsc-" + label
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    csr = x509.load_der_x509_csr(build_csr(hsm, label, f"CN={reg}"))
    now = dt.datetime.now(dt.UTC)
    leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(emulator_pki.intermediate.cert.subject)
            .public_key(csr.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(emulator_pki.intermediate.key, hashes.SHA256()))
    hsm.import_certificates(label, [leaf, emulator_pki.root.cert])  # the intermediate is missing
    n = len(emu.received.connects)
    with pytest.raises(x509_id.ChainError, match="is not issued by"):  # the credential's fault, not DPS's
        Provisioner(hsm, tmp_path).register(_req(reg, attestation="x509", key=label,
                                                 server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert len(emu.received.connects) == n


@pytest.mark.token_matrix
def test_dps_x509_credential_whose_cn_is_not_the_registration_id_is_a_credential_error(
        hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "dpsn-" + label
    certify_hsm_key(hsm, label, reg + "-other", emulator_pki.intermediate)
    n = len(emu.received.connects)
    with pytest.raises(x509_id.ChainError, match="must equal the registration id"):
        Provisioner(hsm, tmp_path).register(_req(reg, attestation="x509", key=label,
                                                 server_ca_pem=emulator_pki.ca_pem), timeout=30)
    assert len(emu.received.connects) == n


def _threads_and_sockets() -> tuple[int, int]:
    """Live threads, and open sockets of this process (the emulator's server side included).
    Garbage from earlier tests is collected first: its sockets closing during a test (SDK
    clients, emulators) made the count go down and the comparison fail."""
    gc.collect()
    sockets = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            sockets += os.readlink(fd).startswith("socket:")
    return threading.active_count(), sockets


def _leftovers(emu, before: tuple[int, int]) -> tuple[int, int, list[str]]:  # type: ignore[no-untyped-def]
    """What is left beyond `before` once closing connections have settled (a bounded wait)."""
    def extra() -> tuple[int, int, list[str]]:
        now = _threads_and_sockets()
        return now[0] - before[0], now[1] - before[1], emu.connected("dps")
    with contextlib.suppress(TimeoutError):
        emu.wait_for(lambda: extra() <= (0, 0, []), timeout=10)
    return extra()


def _registered_once(hsm, emu, emulator_pki, label, tmp_path) -> tuple[Provisioner, DpsRequest]:  # type: ignore[no-untyped-def]
    """An enrolled SAS device registered once, so everything made once per process exists."""
    reg = "dpsl-" + label
    emu.add_individual_enrollment(reg, symmetric_key=_sas_key(hsm, label), assigned_hub=HOST)
    prov = Provisioner(hsm, tmp_path)
    req = _req(reg, attestation="symmetricKey", key=label, server_ca_pem=emulator_pki.ca_pem)
    prov.register(req, timeout=30)
    return prov, req


def test_registrations_that_time_out_leave_no_thread_or_connection_behind(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prov, req = _registered_once(hsm, emu, emulator_pki, label, tmp_path)
    before = _threads_and_sockets()
    emu.polls_before_assigned = 1_000_000  # "assigning" for ever
    for attempt in range(5):
        emu.stall_dps(attempt % 2 == 1)     # or no answer at all
        with pytest.raises(RegistrationError, match="did not finish within 2 s"):
            prov.register(req, force=True, timeout=2)
    assert _leftovers(emu, before) == (0, 0, [])


def test_a_refused_registration_leaves_no_thread_or_connection_behind(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prov, req = _registered_once(hsm, emu, emulator_pki, label, tmp_path)
    before = _threads_and_sockets()
    emu.throttle_dps(times=1, status=400)
    with pytest.raises(RegistrationError, match="rejected the registration"):
        prov.register(req, force=True, timeout=30)
    assert _leftovers(emu, before) == (0, 0, [])


def test_a_killed_writer_leaves_the_old_or_the_new_result_never_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "registrations" / "dev.json"
    write_json_atomic(path, {"n": 0, "pad": "x" * 20000})
    writer = (
        "import sys\n"
        "from spyrus_hsm.files import write_json_atomic\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        f"    write_json_atomic({str(path)!r}, {{'n': n, 'pad': 'y' * 20000}})\n"
        "    if n == 1:\n"
        "        print('writing', flush=True)\n"
    )
    seen = set()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        time.sleep(secrets.randbelow(300) / 1000)  # a random kill point: the sleep is the test
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = read_json(path)  # raises if the file is a torn write
        assert set(data) == {"n", "pad"} and len(data["pad"]) == 20000
        seen.add(data["n"] > 0)
    assert True in seen
    # a kill between mkstemp and rename can leave a hidden temporary beside it, never a torn dev.json
    assert all(p.name == "dev.json" or p.name.startswith(".dev.json.") for p in path.parent.iterdir())


def test_no_file_written_by_the_module_holds_a_private_key(token_env, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    # Everything this package wrote during the run: token dir, state dirs, TLS files, configs.
    # (The emulator's own server keys are test fixtures and live in its PKI directory.)
    base = Path(str(tmp_path_factory.getbasetemp()))
    offenders = []
    for path in base.rglob("*"):
        if not path.is_file() or "emulator-pki" in str(path) or path.stat().st_size > 1 << 20:
            continue
        text = path.read_bytes()
        if b"PRIVATE KEY-----" in text:
            offenders.append(str(path))
    assert offenders == []


# --- the CLI and the module process ----------------------------------------------------------

def test_register_command_prints_the_assignment(cli, hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    reg = "cli-" + label
    emu.add_individual_enrollment(reg, symmetric_key=_sas_key(hsm, label), assigned_hub=HOST)
    res = cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label,
              "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file), "--payload", '{"a": 1}')
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert (out["status"], out["assignedHub"], out["deviceId"], out["registrationId"]) == ("assigned", HOST, reg, reg)


@pytest.mark.token_matrix
def test_register_command_with_x509_exits_cleanly_with_the_provider_loaded(
        cli, hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    reg = "clix-" + label
    certify_hsm_key(hsm, label, reg, emulator_pki.intermediate)
    emu.add_individual_enrollment(reg, x509_ca_pem=emulator_pki.root.cert_pem, assigned_hub=HOST)
    res = cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--x509", label,
              "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file))
    assert res.code == 0, res.err  # not 139: the provider's SoftHSM teardown crash is avoided
    assert json.loads(res.out)["deviceId"] == reg


def test_register_command_reports_refused_credentials(cli, hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    import base64

    reg = "cliw-" + label
    emu.add_individual_enrollment(reg, symmetric_key=base64.b64encode(secrets.token_bytes(32)).decode())
    _sas_key(hsm, label)
    res = cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label,
              "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file))
    assert res.code == 1 and "refused the credentials" in res.err and "Traceback" not in res.err


@pytest.mark.token_matrix
def test_module_process_with_the_provider_loaded_exits_0_within_5_s_on_sigterm(
        hsm, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    device = "mod-" + label
    certify_hsm_key(hsm, label, device, emulator_pki.intermediate)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"hsm:\n  module: {token_env.module}\n  token_label: {token_env.label}\n  pin_file: {token_env.pin_file}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"cloud:\n  hub: {HOST}\n  device_id: {device}\n  attestation: x509\n  key: {label}\n"
        f"  server_ca_file: {emulator_pki.ca_file}\n")
    proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "-v", "serve"],
                            env=token_env.env(SPYRUS_HSM_CONFIG=str(config)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        emu.wait_for(lambda: any(c.client_id == device and c.accepted for c in emu.received.connects), timeout=30)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=5)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert code == 0, err.decode()
    assert stopped_in < 5
    assert token_env.pin.decode() not in (out + err).decode()


def test_watchdog_rebuilds_a_client_that_stays_disconnected(hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    device = "wd-" + label
    emu.add_device(device, symmetric_key=_sas_key(hsm, label))
    # The SDK's own retry is off, so only the watchdog can bring the connection back.
    client = HubClient(hsm, HubIdentity(HOST, device, sas_key=label, server_ca_pem=emulator_pki.ca_pem),
                       reconnect_after=0.5, watch_interval=0.1,
                       sdk_options={"connection_retry": False}).connect()
    try:
        emu.drop_connection(device)
        wait_for(lambda: client.stats.rebuilds >= 1 and client.connected, 15, "rebuilt and connected", every=0.1)
        client.send("back")
        emu.wait_for(lambda: any(t.device_id == device for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()


def test_a_hung_hub_blocks_neither_the_caller_nor_shutdown_and_holds_at_most_two_threads(
        hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    device = "hang-" + label
    emu.add_device(device, symmetric_key=_sas_key(hsm, label))
    client = HubClient(hsm, HubIdentity(HOST, device, sas_key=label, server_ca_pem=emulator_pki.ca_pem),
                       call_timeout=0.5).connect()
    emu.stall_hub(True)  # publishes and twin requests get no answer: the SDK would wait for ever
    stopped = threading.Event()
    try:
        for _ in range(4):
            with pytest.raises(HubTimeout, match=f"IoT Hub {HOST} .*did not answer"):
                client.send("unanswered")
        with pytest.raises(HubTimeout):
            client.report({"probe": 1})
        stuck = [t for t in threading.enumerate() if t.name == "hub-call"]
        threading.Thread(target=lambda: (client.shutdown(), stopped.set()), daemon=True).start()
        assert stopped.wait(30), "shutdown waited for the hung calls"
    finally:
        emu.stall_hub(False)
        client.shutdown()
    assert len(stuck) <= 2, stuck  # one thread per unanswered call before: five


@pytest.mark.token_matrix
def test_tls_server_and_client_both_sign_with_hsm_keys(hsm, provider, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import threading

    certify_hsm_key(hsm, label + "-srv", "localhost", emulator_pki.intermediate, server=True)
    certify_hsm_key(hsm, label + "-cli", "leaf-7", emulator_pki.intermediate)
    token = hsm.state.token_label or ""
    srv = x509_id.write_tls_files(x509_id.select(hsm, label=label + "-srv"), token, tmp_path)
    cli_files = x509_id.write_tls_files(x509_id.select(hsm, label=label + "-cli"), token, tmp_path)
    server_ctx = tls.server_context(srv.cert_file, srv.key_file, emulator_pki.ca_file, require_client_cert=True)
    client_ctx = client_context(cli_files.cert_file, cli_files.key_file, emulator_pki.ca_file)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            seen["peer"] = s.getpeercert()
            s.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname="localhost") as c:
        assert c.recv(2) == b"ok"
        server_cn = dict(x[0] for x in c.getpeercert()["subject"])["commonName"]
    t.join(5)
    listener.close()
    assert server_cn == "localhost"
    assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "leaf-7"  # type: ignore[index]


@pytest.mark.token_matrix
@needs(TOKEN_INIT)
def test_the_only_credential_is_chosen_automatically(token_env, emulator_pki) -> None:  # type: ignore[no-untyped-def]
    from spyrus_hsm.hsm import InvalidInput, ObjectNotFound, PoolSettings, TokenSelector
    from spyrus_hsm.hsm.provision import init_token

    solo = "solo-" + secrets.token_hex(3)
    init_token(token_env.module, solo, Secret(b"so-pin-9999"), Secret(b"user-pin-9999"))
    h = Hsm(PoolSettings(token_env.module, TokenSelector(solo)), Secret(b"user-pin-9999")).start()
    try:
        with pytest.raises(ObjectNotFound, match="credentials present: none"):
            x509_id.select(h)
        certify_hsm_key(h, "only", "edge-1", emulator_pki.intermediate)
        cred = x509_id.select(h)
        assert (cred.label, cred.common_name, len(cred.chain)) == ("only", "edge-1", 2)
        certify_hsm_key(h, "second", "edge-2", emulator_pki.intermediate)
        with pytest.raises(InvalidInput, match=r"2 X\.509 credentials match"):
            x509_id.select(h)
        assert x509_id.select(h, cn="edge-2").label == "second"
    finally:
        h.close()
