"""Child process of test_token_change.py: a real SoftHSM2 token directory changed under the module.

Runs in its own process with its own SOFTHSM2_CONF (SoftHSM reads it once per process), so the
token directory it moves away, back or swaps is not the test session's token. Prints one JSON
object per observation on stdout; the test asserts on them.

    token_change_child.py init LABEL KEY_FILE [api]  create a token with key 'k' (and, with
                                                     'api', a TLS key pair and certificate
                                                     for 127.0.0.1), print its serial
    token_change_child.py moved|swapped|shared ROOT  run a scenario on ROOT/tokens
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from spyrus_hsm.hsm import Hsm, HsmError, KeyAlgorithm, PoolSettings, Secret, TokenSelector
from spyrus_hsm.hsm.provision import init_token

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "swap"
PIN = b"pin-token-change"


def emit(step: str, **fields: object) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def attempt(step: str, fn: Callable[[], object]) -> None:
    try:
        value = fn()
    except HsmError as exc:
        emit(step, ok=False, error=type(exc).__name__, message=str(exc))
    else:
        emit(step, ok=True, value=value.hex() if isinstance(value, bytes) else value)


def wait_for(h: Hsm, cond: Callable[[], bool], within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def state(h: Hsm, step: str) -> None:
    s = h.state
    emit(step, status=s.status, reason=s.reason, serial=s.token_serial, recoveries=s.recoveries,
         restart_required=s.restart_required, last_change=s.last_change)


def probe(h: Hsm) -> None:
    asyncio.run(h.aprobe(timeout=5))


def mac(key: bytes) -> str:
    return hmac.new(key, b"data", hashlib.sha256).hexdigest()


def init(label: str, key_file: str, api: bool) -> None:
    summary = init_token(SOFTHSM, label, Secret(b"so-token-change"), Secret(PIN))
    with Hsm(PoolSettings(SOFTHSM, TokenSelector(label)), Secret(PIN)).start() as h:
        h.import_secret_key("k", Secret(Path(key_file).read_bytes()))
        if api:
            h.generate_keypair("api", KeyAlgorithm.EC_P256)
            h.import_certificates("api", [_certificate(h.public_key("api"))])
    emit("init", serial=summary.serial)


def _certificate(public_key: PublicKeyTypes) -> x509.Certificate:
    """A certificate for the API's HSM key, for 127.0.0.1, issued by a throw-away CA key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throw-away CA")]))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def scenario(name: str, root: Path) -> None:
    tokens = root / "tokens"
    settings = PoolSettings(SOFTHSM, TokenSelector(LABEL), workers=2, call_timeout=5,
                            retry_min=0.05, retry_max=0.2)
    h = Hsm(settings, Secret(PIN)).start()
    if name == "shared":
        from spyrus_hsm.identity import tls

        pin_file = root / "user.pin"
        pin_file.write_bytes(PIN)
        pin_file.chmod(0o600)
        tls.load_provider(SOFTHSM, str(pin_file), root / "openssl")
    state(h, "start")
    attempt("sign before", lambda: h.hmac_sha256("k", b"data"))
    os.rename(tokens, root / "tokens.away")
    tokens.mkdir()
    if name == "swapped":
        # Another token with the same label (a spare, holding its own key 'k') takes its place.
        for entry in (root / "spare").iterdir():
            shutil.move(str(entry), tokens / entry.name)
    if name == "moved":
        attempt("sign while away", lambda: h.hmac_sha256("k", b"data"))
    else:
        attempt("probe while changed", lambda: probe(h))
    if name == "shared":
        wait_for(h, lambda: h.state.restart_required, 10)
    else:
        wait_for(h, lambda: not h.state.ready, 5)
    state(h, "changed")
    if name == "moved":
        shutil.rmtree(tokens)
        os.rename(root / "tokens.away", tokens)
        emit("moved back")
    if name == "shared":
        return
    emit("ready again", ok=wait_for(h, lambda: h.state.ready))
    state(h, "after")
    attempt("sign after", lambda: h.hmac_sha256("k", b"data"))
    attempt("probe after", lambda: probe(h))
    h.close()


if __name__ == "__main__":
    if sys.argv[1] == "init":
        init(sys.argv[2], sys.argv[3], sys.argv[4:] == ["api"])
    else:
        scenario(sys.argv[1], Path(sys.argv[2]))
