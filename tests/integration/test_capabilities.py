"""The token's capabilities on a real SoftHSM2 token: the table selftest prints, refusals
before anything reaches the token, portable key generation, keys without CKA_ID.

A SoftHSM2 token has every mechanism this module uses; a token that lacks one is a real session
on it paired with a Capabilities value built here (what a token without it would report)."""

from __future__ import annotations

import json
import secrets

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

from spyrus_hsm.hsm import Capabilities, Hsm, KeyAlgorithm, Need, Pkcs11Uri, Secret, SignAlgorithm, Unsupported, library
from spyrus_hsm.hsm.algorithms import P256_OID
from spyrus_hsm.hsm.encoding import ecdsa_raw_to_der
from spyrus_hsm.hsm.operations import WorkerSession, generate_keypair, import_secret_key, sign


@pytest.fixture
def worker(hsm: Hsm, token_env):  # type: ignore[no-untyped-def]
    """A session on the test token (sharing the `hsm` pool's login), for a WorkerSession with
    the capabilities a test gives it."""
    token = library.find_token(library.load_module(token_env.module), library.TokenSelector(token_env.label))
    session = library.open_session(token)

    def make(caps: Capabilities) -> WorkerSession:
        return WorkerSession(session, library.summarise(token), 0, set(), caps)

    yield make
    session.close()


def test_selftest_prints_the_capability_table_of_the_real_token(cli, hsm: Hsm) -> None:  # type: ignore[no-untyped-def]
    res = cli("selftest")
    assert res.code == 0, res.out + res.err
    table = res.out[res.out.index("token capabilities:"):]
    lines = {line.split("  ")[1].strip(): line for line in table.splitlines()[1:]}
    for row, says in (("HMAC-SHA256 sign (SAS keys)", "yes"), ("secret key import (SAS keys)", "yes"),
                      ("EC P-256 generation", "yes"), ("EC P-384 generation", "yes"),
                      ("RSA-2048 generation", "yes"), ("ECDSA-SHA256 sign", "CKM_ECDSA (raw; hashed here)"),
                      ("certificate objects", "assumed"), ("login required", "yes")):
        assert says in lines[row], table
    assert "ok   capabilities:" in res.out
    data = json.loads(cli("selftest", "--json").out)
    rows = {r["capability"]: r for r in data["capabilities"]}
    assert rows["HMAC-SHA256 sign (SAS keys)"]["status"] == "yes"
    assert rows["max sessions"]["detail"] == "ulMaxSessionCount"


def test_the_pool_asked_the_token_once_at_connection(hsm: Hsm) -> None:
    caps = hsm.capabilities
    assert caps is not None and caps.login_required
    assert caps.has(Need.HMAC_SHA256) and caps.ecdsa_mechanism(SignAlgorithm.ECDSA_SHA256) is Mechanism.ECDSA


def test_a_token_without_hmac_refuses_a_sas_key_before_storing_anything(worker, hsm: Hsm, label: str) -> None:  # type: ignore[no-untyped-def]
    ws = worker(Capabilities.of(hsm.state.token_label or "", [Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA]))
    with pytest.raises(Unsupported, match=r"^token '.*' has no CKM_SHA256_HMAC: SAS keys need a token that "
                                          r"signs HMAC-SHA256 and imports secret keys \(SoftHSM2, a SPYRUS Rosetta\)$"):
        import_secret_key(ws, label, Secret(secrets.token_bytes(32)))
    assert hsm.find(label) == []


def test_a_token_without_rsa_generation_refuses_it_before_making_a_key(worker, hsm: Hsm, label: str) -> None:  # type: ignore[no-untyped-def]
    ws = worker(Capabilities.of("t", [Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, Mechanism.SHA256_RSA_PKCS]))
    with pytest.raises(Unsupported, match=r"^token 't' has no CKM_RSA_PKCS_KEY_PAIR_GEN for 2048 bits"):
        generate_keypair(ws, label, KeyAlgorithm.RSA_2048)
    assert hsm.find(label) == []


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_a_generated_key_is_sensitive_non_extractable_and_signs(hsm: Hsm, label: str, algorithm: KeyAlgorithm) -> None:
    key_id = hsm.generate_keypair(label, algorithm)
    private = hsm.find(label, "private")
    assert [(o.id_hex, o.sensitive, o.extractable) for o in private] == [(key_id, True, False)]
    assert [o.id_hex for o in hsm.find(label, "public")] == [key_id]
    pub = hsm.public_key(label)
    if algorithm.is_ec:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        alg = SignAlgorithm.ECDSA_SHA256 if algorithm is KeyAlgorithm.EC_P256 else SignAlgorithm.ECDSA_SHA384
        digest = hashes.SHA256() if algorithm is KeyAlgorithm.EC_P256 else hashes.SHA384()
        pub.verify(ecdsa_raw_to_der(hsm.sign(label, alg, b"data")), b"data", ec.ECDSA(digest))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(hsm.sign(label, SignAlgorithm.RSA_PKCS1_SHA256, b"data"), b"data", padding.PKCS1v15(),
                   hashes.SHA256())


def test_rsa_signs_with_the_raw_mechanisms_over_a_digest_made_here(worker, hsm: Hsm, label: str) -> None:  # type: ignore[no-untyped-def]
    """A token with only CKM_RSA_PKCS / CKM_RSA_PKCS_PSS (no hashing variants)."""
    hsm.generate_keypair(label, KeyAlgorithm.RSA_2048)
    pub = hsm.public_key(label)
    assert isinstance(pub, rsa.RSAPublicKey)
    ws = worker(Capabilities.of("raw", [Mechanism.RSA_PKCS, Mechanism.RSA_PKCS_PSS]))
    uri = Pkcs11Uri(object=label)
    pub.verify(sign(ws, uri, SignAlgorithm.RSA_PKCS1_SHA256, b"data"), b"data", padding.PKCS1v15(), hashes.SHA256())
    pub.verify(sign(ws, uri, SignAlgorithm.RSA_PSS_SHA256, b"data"), b"data",
               padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_a_key_without_cka_id_is_listed_and_usable_by_label(cli, hsm: Hsm, worker, label: str) -> None:  # type: ignore[no-untyped-def]
    ws = worker(hsm.capabilities)
    ws.session.generate_keypair(  # as another tool makes it: no CKA_ID asked for
        KeyType.EC, store=True, label=label,
        public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(P256_OID)},
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True})
    assert {o.id_hex for o in hsm.find(label)} == {""}
    res = cli("list")
    lines = [line for line in res.out.splitlines() if f" {label} " in line]
    assert len(lines) == 2 and all(" id=- " in line for line in lines), res.out
    listed = [o for o in json.loads(cli("list", "--json").out)["objects"] if o["label"] == label]
    assert [o["id_hex"] for o in listed] == [None, None]
    pub = hsm.public_key(label)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(ecdsa_raw_to_der(hsm.sign(label, SignAlgorithm.ECDSA_SHA256, b"by label")), b"by label",
               ec.ECDSA(hashes.SHA256()))


@pytest.mark.token_matrix
def test_selftest_prints_the_capability_table_on_every_token(cli) -> None:  # type: ignore[no-untyped-def]
    """On SoftHSM2 and on tpm2-pkcs11 alike (tests/token_matrix.py): every row, each with a value."""
    data = json.loads(cli("selftest", "--json").out)
    rows = {r["capability"]: r for r in data["capabilities"]}
    for row in ("HMAC-SHA256 sign (SAS keys)", "secret key import (SAS keys)", "EC P-256 generation",
                "EC P-384 generation", "RSA-2048 generation", "ECDSA-SHA256 sign", "certificate objects",
                "login required", "max sessions"):
        assert row in rows and rows[row]["status"], (row, rows)
    print("\n" + "\n".join(f"{name}: {r['status']} ({r['detail']})" for name, r in rows.items()))


@pytest.mark.token_matrix
def test_import_sas_is_refused_in_one_line_before_anything_is_stored_where_the_token_cannot_hold_it(
        cli, hsm: Hsm, label: str) -> None:  # type: ignore[no-untyped-def]
    """On every token: where the token stores secret keys given to it (SoftHSM2) the key is
    imported; where it does not (tpm2-pkcs11: asked at connection with a session object) the
    command says so in one line, and the token holds nothing new."""
    import base64
    import secrets as random

    hsm.ask_secret_import()  # as selftest, serve and import-sas ask it
    caps = hsm.capabilities
    assert caps is not None and caps.secret_import is not None  # asked, not assumed
    before = len(hsm.list_objects())
    res = cli("key", "import-sas", "--label", label, stdin=base64.b64encode(random.token_bytes(32)) + b"\n")
    if caps.secret_import:
        assert res.code == 0, res.err
        assert [o.type for o in hsm.find(label)] == ["secret-key"]
    else:
        # one line of ours (a token's library may print its own, as tpm2-pkcs11 does at the probe)
        ours = [line for line in res.err.splitlines() if line.startswith("spyrus-hsm:")]
        assert res.code == 2 and len(ours) == 1, res.err
        assert "does not store secret keys given to it" in res.err and "Traceback" not in res.err
        assert len(hsm.list_objects()) == before
