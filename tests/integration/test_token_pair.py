"""`TokenPair` over two real SoftHSM2 tokens (docs/two-tokens.md): work shared between them, a key
label meaning the key on whichever token holds it, multi-step work kept on one token, the keys one
token lacks reported, and the state of the pair (ready while one token is, `degraded` naming the
other) in /readyz's, the twin's and the events' terms. Faults under `serve`: test_two_tokens.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from service_harness import HOST, store_hsm_certificate, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm import events as events_mod
from spyrus_hsm.config import EventsConfig, service_section
from spyrus_hsm.edge import reported
from spyrus_hsm.hsm import Hsm, HsmState, ObjectNotFound, PoolSettings, Secret, SignAlgorithm, TokenPair, TokenSelector
from spyrus_hsm.identity.sas import SasMinter
from spyrus_hsm.service.api_tls import Placement, ServerTls


def _member(module: str, label: str, pin: bytes) -> Hsm:
    return Hsm(PoolSettings(module, TokenSelector(label), workers=2, call_timeout=5.0, retry_min=0.1,
                            retry_max=0.5), Secret(pin))


@pytest.fixture
def pair(token_env: Any, second_token: Any) -> Iterator[TokenPair]:
    p = TokenPair([_member(token_env.module, token_env.label, token_env.pin),
                   _member(token_env.module, second_token.label, second_token.pin)]).start(wait=True)
    yield p
    p.close()


def test_a_label_is_the_key_on_either_token_and_the_work_is_shared(pair: TokenPair, token_env: Any,
                                                                  second_token: Any) -> None:
    a, b = pair.members
    device = "pair-" + secrets.token_hex(3)
    primary, secondary = secrets.token_bytes(32), secrets.token_bytes(32)
    a.import_secret_key(device, Secret(primary))
    b.import_secret_key(device, Secret(secondary))
    for index in (0, 1):
        pair._list(index)  # as a member's becoming ready does
    minter = SasMinter(pair)
    made_by = []
    for n in range(20):
        token = minter.mint(device, f"hub.example/devices/{device}", 3600 + n).token
        for key, name in ((primary, "A"), (secondary, "B")):
            try:
                verify_sas(token, key)
                made_by.append(name)
            except AssertionError:
                pass
    assert len(made_by) == 20  # every token verifies with one of the two keys
    assert set(made_by) == {"A", "B"}  # and both tokens took part (ties alternate)
    assert pair.state.ready and pair.state.degraded is None and pair.state.tokens_ready == 2


def test_multi_step_work_stays_on_one_token_and_writes_go_there(pair: TokenPair) -> None:
    label = "gen-" + secrets.token_hex(3)
    chosen = pair.member_for(label)
    assert all(pair.member_for(label) is chosen for _ in range(10))
    pair.import_secret_key(label, Secret(secrets.token_bytes(32)))
    assert chosen.find(label, "secret-key")
    other = next(m for m in pair.members if m is not chosen)
    assert not other.find(label, "secret-key")
    assert pair.member_for(label) is chosen  # the token that holds it
    # one-step work finds it on its token, whichever the pair tries first
    for _ in range(6):
        assert len(pair.sign(label, SignAlgorithm.HMAC_SHA256, b"x")) == 32
    with pytest.raises(ObjectNotFound):
        pair.sign("absent-" + secrets.token_hex(3), SignAlgorithm.HMAC_SHA256, b"x")


def test_keys_on_one_token_only_are_reported(pair: TokenPair, caplog: pytest.LogCaptureFixture) -> None:
    a, _ = pair.members
    lonely = "lonely-" + secrets.token_hex(3)
    a.import_secret_key(lonely, Secret(secrets.token_bytes(32)))
    with caplog.at_level(logging.WARNING, logger="spyrus_hsm.hsm.pair"):
        for index in (0, 1):
            pair._list(index)
    diff = pair.differences()
    b_name = pair.state.members[1].name
    assert f"{lonely} (secret-key)" in diff[b_name]
    assert "do not hold the same keys" in caplog.text and f"token {b_name} lacks" in caplog.text


def test_one_token_gone_is_ready_and_degraded_naming_it_both_gone_is_not_ready(
        pair: TokenPair, second_token: Any) -> None:
    seen: list[HsmState] = []
    pair.add_listener(seen.append)
    ev = events_mod.Events(EventsConfig(), "edge-1", "spyrus-hsm")
    pair.add_listener(ev.hsm_state)
    device = "pair-" + secrets.token_hex(3)
    for m in pair.members:
        m.import_secret_key(device, Secret(secrets.token_bytes(32)))
    pair.members[1].close()  # stopped: as good as gone for the pair
    st = pair.state
    assert st.ready and st.tokens_ready == 1 and st.tokens == 2
    assert st.degraded is not None and f"'{second_token.label}'" in st.degraded
    assert seen and seen[-1].degraded == st.degraded
    twin = reported.hsm_section(st)
    assert twin["ready"] is True and twin["tokensReady"] == 1 and twin["degraded"] == st.degraded
    assert [t["status"] for t in twin["tokens"]] == ["ready", "stopped"]
    assert len(pair.sign(device, SignAlgorithm.HMAC_SHA256, b"x")) == 32  # the survivor signs
    pair.members[0].close()
    st = pair.state
    assert not st.ready and st.tokens_ready == 0 and st.degraded is None
    assert second_token.label in (st.reason or "")
    kinds = [e["type"] for e in list(ev._buffer)]
    assert kinds[:1] == ["hsm.degraded"], kinds


def _served_leaf(context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a TLS server with `context` presents (a real handshake over a socket pair)."""
    server_sock, client_sock = socket.socketpair()
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    result: list[object] = []

    def serve() -> None:
        try:
            with context.wrap_socket(server_sock, server_side=True) as s:
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            result.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(client_sock) as c:
            der = c.getpeercert(binary_form=True)
            c.sendall(b"x")
    finally:
        thread.join(10)
    assert der is not None, result
    return x509.load_der_x509_certificate(der)


def test_the_apis_tls_is_certified_by_the_survivors_service_key_at_its_next_renewal(
        token_env: Any, second_token: Any, emulator_pki: EmulatorPki, tmp_path: Path) -> None:
    label = "api-pair-" + secrets.token_hex(3)
    pair = TokenPair([_member(token_env.module, token_env.label, token_env.pin),
                      _member(token_env.module, second_token.label, second_token.pin)]).start(wait=True)
    a, b = pair.members
    for member in (a, b):  # each token its own service key and issuing certificate, one label
        store_hsm_certificate(member, label, emulator_pki, server_ip=HOST, issuing=True)
    cfg = service_section({"tls_key_label": label, "tls_lifetime": 3600, "policy": []}, "test")
    clock = [time.time()]
    server_tls = ServerTls(cfg, pair, tmp_path / "tls", clock=lambda: clock[0])
    try:
        assert server_tls.placement is Placement.ISSUED
        issuer_of = {"A": a.public_key(label), "B": b.public_key(label)}
        first = _served_leaf(server_tls.current)
        assert _signed_by(first, issuer_of) == "A"
        a.close()  # token A gone: the in-memory TLS key needs no token, so the API serves on
        assert _signed_by(_served_leaf(server_tls.current), issuer_of) == "A"
        clock[0] += 1801  # past half of the hour: due
        assert server_tls.renew_now()
        assert server_tls.last_error is None
        renewed = _served_leaf(server_tls.current)
        assert renewed != first and _signed_by(renewed, issuer_of) == "B"
    finally:
        server_tls.close()
        pair.close()


def _signed_by(cert: x509.Certificate, keys: dict[str, Any]) -> str:
    for name, public in keys.items():
        try:
            cert.verify_directly_issued_by(_as_issuer(cert, public))
            return name
        except (ValueError, InvalidSignature, TypeError):
            continue
    raise AssertionError("the served certificate was signed by neither token's service key")


def _as_issuer(cert: x509.Certificate, public: Any) -> x509.Certificate:
    """A throwaway certificate with `public` as its key and `cert`'s issuer as its subject."""
    throwaway = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(cert.issuer).issuer_name(cert.issuer).public_key(public)
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(throwaway, hashes.SHA256()))


def test_a_group_key_is_derived_on_both_tokens_each_from_its_own_group_key(pair: TokenPair) -> None:
    """DPS group enrollment: the primary group key on one token, the secondary on the other; the
    device key is derived on each from its own, and either derivation is a key DPS accepts."""
    a, b = pair.members
    group, device = "group-" + secrets.token_hex(3), "dev-" + secrets.token_hex(3)
    primary, secondary = secrets.token_bytes(64), secrets.token_bytes(64)
    a.import_secret_key(group, Secret(primary))
    b.import_secret_key(group, Secret(secondary))
    for index in (0, 1):
        pair._list(index)
    derived = f"{group}.{device}"
    pair.derive_hmac_key(group, device.encode(), derived)
    expected = {hmac.new(primary, device.encode(), hashlib.sha256).digest(): "A",
                hmac.new(secondary, device.encode(), hashlib.sha256).digest(): "B"}
    for member, name in ((a, "A"), (b, "B")):
        assert member.find(derived, "secret-key"), f"not derived on token {name}"
        mac = member.sign(derived, SignAlgorithm.HMAC_SHA256, b"x")
        assert hmac.new(next(k for k, n in expected.items() if n == name), b"x", hashlib.sha256).digest() == mac
    pair.derive_hmac_key(group, device.encode(), derived)  # again: nothing new, no error
    assert len(a.find(derived, "secret-key")) == 1 and len(b.find(derived, "secret-key")) == 1
