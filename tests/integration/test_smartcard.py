"""Provisioning and renewal on a smart card: the shim's `profile=smartcard` (four sessions, no
C_CopyObject, raw CKM_ECDSA only) over the test token, with a store that fills up
(`max_objects`). A write that does not fit says "the token is out of memory" and leaves the
token as it found it: no key pair without its certificate, no half chain. The token's objects
are listed before and after, through a session of the module's pool (python-pkcs11 directly).

The `spyrus-hsm` commands run in processes of their own, each loading the shim with a control
file of the test's (`Card.env`) that holds the whole profile: there the session cap applies to the
command, pkcs11-provider's sessions included. This process's pool and pkcs11-provider already hold
sessions, so its own control file gets the profile without the cap (max_sessions=0); the store's
limit is the same in both (it is counted on the token). The cap also has a test of its own, in a
child process with a pool of more workers than the card has sessions.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import addresses
import pytest
from cloud_harness import sas_enrollment, serve_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from waiting import wait_for

from spyrus_hsm.cloud import renewal
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner
from spyrus_hsm.hsm import Hsm, HsmUnavailable, KeyAlgorithm, OperationFailed

pytestmark = [pytest.mark.shim, pytest.mark.timeout(180)]
HOST = addresses.host()
SCOPE = "0ne000SC4D"
FULL = "the token is out of memory; delete unused objects"

# (class, label, id) of each token object -> how many have them (a chain's certificates share
# label and id)
Listing = Counter[tuple[int, str, str]]


def _objects(hsm: Hsm) -> Listing:
    """Every token object, read through a session of the pool."""
    from pkcs11 import Attribute

    def read(ws: Any) -> Listing:
        found = ws.session.get_objects({Attribute.TOKEN: True})
        return Counter((int(o[Attribute.CLASS]), str(o[Attribute.LABEL]), bytes(o[Attribute.ID]).hex())
                       for o in found)

    try:
        return hsm.pool.run(read, "listing the token's objects")
    except HsmUnavailable:  # a session an earlier test's replug ended: the pool recovers, then once more
        wait_for(lambda: hsm.state.ready, 30, "the HSM ready again")
        return hsm.pool.run(read, "listing the token's objects")


class Card:
    def __init__(self, token_env: Any, hsm: Hsm, control: Path) -> None:
        self.token_env = token_env
        self.hsm = hsm
        self.control = control

    def set(self, **settings: object) -> None:
        """The smart-card profile with `settings`: all of it for the commands, without the session
        cap for this process."""
        text = "".join(f"{k}={v}\n" for k, v in {"profile": "smartcard", **settings}.items())
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.control)
        self.token_env.set_shim(state="plugged", profile="smartcard", **{**settings, "max_sessions": 0})

    def room_for(self, n: int, **extra: object) -> Listing:
        """The profile with room for `n` more token objects; the objects held now."""
        held = _objects(self.hsm)
        self.set(max_objects=held.total() + n, **extra)
        return held

    def roomy(self, **extra: object) -> None:
        self.set(**extra)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a command on the card."""
        return self.token_env.env(P11SHIM_CONTROL=str(self.control), **extra)  # type: ignore[no-any-return]


def _answers(hsm: Hsm) -> bool:
    try:
        _objects(hsm)
    except HsmUnavailable:  # a session an earlier test's unplug left stale: the pool recovers
        return False
    return True


@pytest.fixture
def card(token_env, hsm, tmp_path):  # type: ignore[no-untyped-def]
    """The shim's smart-card profile for the test; a healthy, unlimited token after it. The
    session's shared pool answers before the test starts (an earlier shim test may have
    unplugged the token: its first call then finds a stale session and recovers)."""
    wait_for(lambda: _answers(hsm), 30, "the shared pool answering")
    yield Card(token_env, hsm, tmp_path / "card.control")
    token_env.set_shim(state="plugged")


def _says_full(res: Any) -> None:
    assert res.code != 0, res.out
    assert FULL in res.err and "Traceback" not in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1, res.err


def _cert(subject: str, issuer: str, public: Any, signer: Any, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


def _chain_for(public: Any) -> list[x509.Certificate]:
    """A leaf for `public` and the CA that signed it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Card Test CA", "Card Test CA", ca_key.public_key(), ca_key, True)
    return [_cert("card-dev", "Card Test CA", public, ca_key, False), ca]


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --- key generation, CSR, certificate import, PKCS#12 import, import-sas (the CLI) -------------

def test_key_generate_on_a_full_card_says_so_and_leaves_nothing(cli, card, label) -> None:  # type: ignore[no-untyped-def]
    held = card.room_for(1)  # a key pair is two objects
    _says_full(cli("key", "generate", "--label", label, "--type", "ec-p256", env=card.env()))
    assert _objects(card.hsm) == held
    card.room_for(2)
    res = cli("key", "generate", "--label", label, "--type", "ec-p256", env=card.env())
    assert res.code == 0, res.err
    assert sorted((c, lab) for c, lab, _ in _objects(card.hsm) - held) == [(2, label), (3, label)]


def test_a_csr_needs_no_room_and_is_signed_with_raw_ecdsa(cli, card, label, hsm) -> None:  # type: ignore[no-untyped-def]
    hsm.generate_keypair(label, KeyAlgorithm.EC_P384)
    held = card.room_for(0)
    res = cli("csr", "--label", label, "--subject", "CN=card-dev", env=card.env())
    assert res.code == 0, res.err
    csr = x509.load_pem_x509_csr(res.out.encode())
    assert csr.is_signature_valid and csr.public_key() == hsm.public_key(label)
    assert _objects(hsm) == held


def test_a_chain_that_does_not_fit_is_not_stored_half(cli, card, label, hsm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(_pem(_chain_for(hsm.public_key(label))))
    held = card.room_for(1)  # the leaf fits, its CA does not
    _says_full(cli("cert", "import", str(chain), "--label", label, env=card.env()))
    assert _objects(hsm) == held
    card.room_for(2)
    assert cli("cert", "import", str(chain), "--label", label, env=card.env()).code == 0
    assert sorted(c.category or "" for c in hsm.find(label, "cert")) == ["authority", "user"]


def test_a_pkcs12_that_does_not_fit_leaves_no_key_and_no_certificate(cli, card, label, hsm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    p12 = tmp_path / "dev.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"dev", key, *_chain_for(key.public_key())[:1], None, serialization.NoEncryption()))
    held = card.room_for(2)  # private key, public key: the certificate does not fit
    _says_full(cli("key", "import-pkcs12", str(p12), "--label", label, "--no-password", env=card.env()))
    assert _objects(hsm) == held
    card.room_for(3)
    res = cli("key", "import-pkcs12", str(p12), "--label", label, "--no-password", env=card.env())
    assert res.code == 0, res.err
    assert sorted(o.type for o in hsm.find(label)) == ["cert", "private", "public"]


def test_import_sas_on_a_full_card_says_so(cli, card, label, hsm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "sas.key"
    key.write_text(base64.b64encode(b"k" * 32).decode())
    key.chmod(0o600)
    held = card.room_for(0)
    _says_full(cli("key", "import-sas", "--label", label, "--key-file", str(key), env=card.env()))
    assert _objects(hsm) == held
    card.room_for(1)
    assert cli("key", "import-sas", "--label", label, "--key-file", str(key), env=card.env()).code == 0
    assert [o.type for o in hsm.find(label)] == ["secret-key"]


def test_a_card_without_hmac_refuses_a_sas_token_in_one_line(cli, card, label, hsm) -> None:  # type: ignore[no-untyped-def]
    from spyrus_hsm.hsm import Secret

    hsm.import_secret_key(label, Secret(b"k" * 32))
    card.roomy(hide_mechanisms="CKM_SHA256_HMAC")
    res = cli("sas", "--key", label, "--uri", "hub.example/devices/d1", env=card.env())
    assert res.code != 0, res.out
    assert "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert "HMAC" in res.err or "algorithm" in res.err, res.err


# --- DPS issuance and renewal -------------------------------------------------------------------

def _request(reg: str, key: str, base: str, emulator_pki: Any) -> DpsRequest:
    return DpsRequest(SCOPE, reg, HOST, "symmetricKey", key, server_ca_pem=emulator_pki.ca_pem, issue_cert=base)


@pytest.mark.parametrize("room", [1, 3],
                         ids=["no-room-for-the-key", "no-room-for-the-chain"])
def test_dps_issuance_on_a_full_card_says_so_and_leaves_no_orphan(  # type: ignore[no-untyped-def]
        card, hsm, emu, emulator_pki, label, tmp_path, room: int) -> None:
    reg, base = f"sc{room}-" + label, label + "-op"
    sas_enrollment(hsm, emu, reg, label, HOST)
    held = card.room_for(room, max_sessions=0)  # key pair 2 + chain 2: one short at most
    with pytest.raises(OperationFailed, match=FULL):
        Provisioner(hsm, tmp_path).register(_request(reg, label, base, emulator_pki), timeout=30)
    assert _objects(hsm) == held
    card.room_for(4, max_sessions=0)
    assignment = Provisioner(hsm, tmp_path).register(_request(reg, label, base, emulator_pki), timeout=30)
    assert assignment.status == "assigned" and len(hsm.find(base, "cert")) == 2


def _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base,  # type: ignore[no-untyped-def]
             workers: int | None) -> dict[str, str]:
    """A command's environment: a config whose cloud section onboards `reg` (`workers`: the
    pool's size, None: the default)."""
    sas_enrollment(hsm, emu, reg, label, HOST)
    config = serve_config(tmp_path / "c.yaml", token_env, tmp_path / "state", emulator_pki.ca_file,
                          id_scope=SCOPE, registration_id=reg, provisioning_host=HOST,
                          attestation="symmetricKey", key=label, issue_cert=base, registration_timeout=10)
    if workers is not None:
        config.write_text(config.read_text().replace("hsm:\n", f"hsm:\n  workers: {workers}\n", 1))
    return token_env.env(SPYRUS_HSM_CONFIG=str(config))  # type: ignore[no-any-return]


def _register(cli, env, emulator_pki, reg: str, label: str, base: str) -> Any:  # type: ignore[no-untyped-def]
    return cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label,
               "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file), "--issue-cert", base, env=env)


def _on_card(card: Card, env: dict[str, str]) -> dict[str, str]:
    return {**env, "P11SHIM_CONTROL": str(card.control)}


@pytest.mark.parametrize("room", [1, 3], ids=["no-room-for-the-key", "no-room-for-the-chain"])
def test_renewal_on_a_full_card_keeps_the_old_credential_and_leaves_no_orphan(  # type: ignore[no-untyped-def]
        cli, card, hsm, token_env, emu, emulator_pki, label, tmp_path, room: int) -> None:
    reg, base = f"rn{room}-" + label, label + "-op"
    # One worker: the store is what this test is about; the session cap has tests of its own below.
    env = _on_card(card, _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base, workers=1))
    card.roomy()
    res = _register(cli, env, emulator_pki, reg, label, base)
    assert res.code == 0, res.err
    old = renewal.require_current(hsm, base)
    held = card.room_for(room)  # a new generation: key pair 2 + chain 2
    _says_full(cli("renew", "--label", base, "--force", env=env))
    assert _objects(hsm) == held
    assert [g.label for g in renewal.generations(hsm, base)] == [base]
    assert renewal.require_current(hsm, base) == old
    card.room_for(4)  # the new generation fits beside the old one, which is deleted after
    res = cli("renew", "--label", base, "--force", env=env)
    assert res.code == 0, res.err
    assert json.loads(res.out)["label"] == f"{base}@2"
    assert [g.label for g in renewal.generations(hsm, base)] == [f"{base}@2"]


# --- a pool with more workers than the card has sessions ---------------------------------------

CHILD = """
import json, sys
from concurrent.futures import wait
from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, SignAlgorithm, TokenSelector

module, token, pin, label, workers = sys.argv[1:6]
hsm = Hsm(PoolSettings(module, TokenSelector(token), workers=int(workers), call_timeout=10.0,
                       retry_min=0.1, retry_max=0.5), Secret(pin.encode())).start(wait=True)
outcomes = []
try:
    for _ in range(3):
        futures = [hsm.pool.submit(lambda ws: __import__("time").sleep(0.05) or ws.session.generate_random(16),
                                   "a slow call") for _ in range(4 * int(workers))]
        wait(futures, timeout=60)
        outcomes += ["ok" if f.exception() is None else str(f.exception()) for f in futures]
    for _ in range(int(workers)):
        try:
            sig = hsm.sign(label, SignAlgorithm.ECDSA_SHA256, b"data")
            outcomes.append("signed" if len(sig) == 64 else "bad signature")
        except Exception as exc:
            outcomes.append(str(exc))
    outcomes.append(hsm.state.status)
finally:
    hsm.close()
print(json.dumps(outcomes))
"""


def test_a_pool_with_more_workers_than_the_card_has_sessions_still_works(card, hsm, token_env, label) -> None:  # type: ignore[no-untyped-def]
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    card.roomy()  # four sessions per process
    proc = subprocess.run([sys.executable, "-c", CHILD, token_env.module, token_env.label, token_env.pin.decode(),
                           label, "8"], env=card.env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout)
    failures = sorted({o for o in outcomes if o not in ("ok", "signed", "ready")})
    assert failures == [], f"{len([o for o in outcomes if o not in ('ok', 'signed', 'ready')])} of " \
                           f"{len(outcomes)} calls failed: {failures}"
    assert outcomes[-1] == "ready"


def test_register_and_renew_with_the_default_pool_on_a_four_session_card(  # type: ignore[no-untyped-def]
        cli, card, hsm, token_env, emu, emulator_pki, label, tmp_path) -> None:
    reg, base = "rd-" + label, label + "-op"
    env = _on_card(card, _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base, workers=None))
    card.roomy()
    res = _register(cli, env, emulator_pki, reg, label, base)
    assert res.code == 0, res.err
    res = cli("renew", "--label", base, "--force", env=env)
    assert res.code == 0, res.err
    assert [g.label for g in renewal.generations(hsm, base)] == [f"{base}@2"]
