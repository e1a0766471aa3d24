"""HSM operations against a real SoftHSM2 token: results checked independently in software."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from token_matrix import HMAC_IMPORT, PRIVATE_KEY_IMPORT, needs

from spyrus_hsm.hsm import (
    DuplicateObject,
    Hsm,
    KeyAlgorithm,
    ObjectNotFound,
    Pkcs11Uri,
    Secret,
    SignAlgorithm,
)
from spyrus_hsm.hsm.batcher import AsyncRunner
from spyrus_hsm.hsm.encoding import ecdsa_raw_to_der, key_id_from_spki
from spyrus_hsm.identity.csr import build_csr


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_hmac_from_hsm_equals_python_hmac(hsm: Hsm, label: str) -> None:
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))
    for data in (b"", b"x", secrets.token_bytes(1000)):
        assert hsm.hmac_sha256(label, data) == hmac.new(key, data, hashlib.sha256).digest()


def test_imported_key_value_cannot_be_read_back(hsm: Hsm, label: str) -> None:
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    info = next(o for o in hsm.list_objects() if o.label == label)
    assert (info.sensitive, info.extractable) == (True, False)
    assert hsm.secret_key_value_readable(label) is False


def test_importing_over_a_taken_label_is_refused(hsm: Hsm, label: str) -> None:
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    with pytest.raises(DuplicateObject, match="already exist"):
        hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))


def test_unknown_label_names_the_fix(hsm: Hsm) -> None:
    with pytest.raises(ObjectNotFound, match="spyrus-hsm list"):
        hsm.hmac_sha256("no-such-key", b"x")


@pytest.mark.token_matrix
@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_generated_key_signatures_verify_with_cryptography(hsm: Hsm, label: str, algorithm: KeyAlgorithm) -> None:
    hsm.generate_keypair(label, algorithm)
    assert hsm.key_algorithm(label) is algorithm
    pub = hsm.public_key(label)
    data = secrets.token_bytes(200)
    if algorithm is KeyAlgorithm.EC_P256:
        raw = hsm.sign(label, SignAlgorithm.ECDSA_SHA256, data)
        assert len(raw) == 64
        pub.verify(ecdsa_raw_to_der(raw), data, ec.ECDSA(hashes.SHA256()))
    elif algorithm is KeyAlgorithm.EC_P384:
        assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
        raw = hsm.sign(label, SignAlgorithm.ECDSA_SHA384, data)
        assert len(raw) == 96
        pub.verify(ecdsa_raw_to_der(raw), data, ec.ECDSA(hashes.SHA384()))
    else:
        pub.verify(hsm.sign(label, SignAlgorithm.RSA_PKCS1_SHA256, data), data,
                   padding.PKCS1v15(), hashes.SHA256())
        pub.verify(hsm.sign(label, SignAlgorithm.RSA_PSS_SHA256, data), data,
                   padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


@pytest.mark.token_matrix
def test_generated_private_key_is_sensitive_and_not_extractable(hsm: Hsm, label: str) -> None:
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    priv = [o for o in hsm.list_objects() if o.label == label and o.type == "private"]
    assert [(o.sensitive, o.extractable) for o in priv] == [(True, False)]


@pytest.mark.token_matrix
@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_csr_is_signed_by_the_hsm_key(hsm: Hsm, label: str, algorithm: KeyAlgorithm) -> None:
    hsm.generate_keypair(label, algorithm)
    csr = x509.load_der_x509_csr(build_csr(hsm, label, "CN=dev-1,O=Contoso", ["dev-1.local"]))
    assert csr.is_signature_valid
    expected_hash = "sha384" if algorithm is KeyAlgorithm.EC_P384 else "sha256"
    assert csr.signature_hash_algorithm is not None and csr.signature_hash_algorithm.name == expected_hash
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert csr.public_key().public_bytes(*fmt) == hsm.public_key(label).public_bytes(*fmt)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-1.local"]


def _ca_chain(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> tuple[x509.Certificate, list[x509.Certificate]]:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, issuer: str, pub: object, signer: object, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(pub).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
             .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        return b.sign(signer, hashes.SHA256())  # type: ignore[arg-type]

    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = cert("Test Root", "Test Root", root_key.public_key(), root_key, True)
    inter = cert("Test Intermediate", "Test Root", inter_key.public_key(), root_key, True)
    leaf = cert("dev-p12", "Test Intermediate", key.public_key(), inter_key, False)
    return leaf, [root, inter]  # deliberately out of order


@pytest.mark.token_matrix
@needs(PRIVATE_KEY_IMPORT)
@pytest.mark.parametrize("kind", ["ec", "ec-p384", "rsa"])
def test_pkcs12_import_yields_key_cert_and_chain_sharing_one_id(hsm: Hsm, label: str, kind: str) -> None:
    key = (ec.generate_private_key(ec.SECP384R1() if kind == "ec-p384" else ec.SECP256R1())
           if kind.startswith("ec") else rsa.generate_private_key(65537, 2048))
    leaf, chain = _ca_chain(key)
    p12 = pkcs12.serialize_key_and_certificates(
        b"dev", key, leaf, chain, serialization.BestAvailableEncryption(b"p12-password"))
    key_id = hsm.import_pkcs12(label, p12, Secret(b"p12-password"))
    objects = [o for o in hsm.list_objects() if o.label == label]
    assert sorted(o.type for o in objects) == ["cert", "cert", "cert", "private", "public"]
    assert {o.id_hex for o in objects} == {key_id}
    stored = hsm.certificate_chain(label)
    assert [c.subject.rfc4514_string() for c in stored] == ["CN=dev-p12", "CN=Test Intermediate", "CN=Test Root"]
    data = b"signed by the imported key"
    if kind == "ec-p384":
        assert hsm.key_algorithm(label) is KeyAlgorithm.EC_P384
        key.public_key().verify(ecdsa_raw_to_der(hsm.sign(label, SignAlgorithm.ECDSA_SHA384, data)),
                                data, ec.ECDSA(hashes.SHA384()))
    elif kind == "ec":
        key.public_key().verify(ecdsa_raw_to_der(hsm.sign(label, SignAlgorithm.ECDSA_SHA256, data)),
                                data, ec.ECDSA(hashes.SHA256()))
    else:
        key.public_key().verify(hsm.sign(label, SignAlgorithm.RSA_PKCS1_SHA256, data), data,
                                padding.PKCS1v15(), hashes.SHA256())


def test_lookup_by_uri_id_and_label(hsm: Hsm, label: str) -> None:
    key = secrets.token_bytes(32)
    key_id = hsm.import_secret_key(label, Secret(key))
    by_id = Pkcs11Uri(id=bytes.fromhex(key_id))
    assert hsm.hmac_sha256(by_id, b"m") == hmac.new(key, b"m", hashlib.sha256).digest()
    assert hsm.hmac_sha256(f"pkcs11:object={label};type=secret-key", b"m") == hsm.hmac_sha256(by_id, b"m")


def test_deleted_key_is_gone_for_every_worker(hsm: Hsm, label: str) -> None:
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    with ThreadPoolExecutor(8) as ex:  # warm every worker's handle cache
        list(ex.map(lambda _: hsm.hmac_sha256(label, b"x"), range(64)))
    assert hsm.delete(label) == 1
    for _ in range(8):
        with pytest.raises(ObjectNotFound):
            hsm.hmac_sha256(label, b"x")


def test_sixteen_threads_times_500_signatures_have_zero_errors(hsm: Hsm, label: str) -> None:
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))
    errors: list[BaseException] = []
    wrong = 0

    def worker(n: int) -> None:
        nonlocal wrong
        for i in range(500):
            data = f"{n}:{i}".encode()
            try:
                if hsm.hmac_sha256(label, data) != hmac.new(key, data, hashlib.sha256).digest():
                    wrong += 1
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == 0


def test_closing_a_worker_session_does_not_log_out_the_others(hsm: Hsm, label: str) -> None:
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    from spyrus_hsm.hsm import library

    extra = library.open_session(hsm.pool.run(lambda ws: ws.session.token, "token"))  # like a worker's
    extra.close()
    assert len(hsm.hmac_sha256(label, b"still logged in")) == 32


def test_contextvars_reach_the_worker_thread(hsm: Hsm) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="none")
    var.set("parent-span")
    seen = hsm.pool.run(lambda ws: (var.get(), threading.current_thread().name), "probe")
    assert seen[0] == "parent-span"
    assert seen[1].startswith("hsm-worker-")


def test_async_signing_never_runs_on_the_event_loop_thread(hsm: Hsm, label: str) -> None:
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))

    runner = AsyncRunner(hsm.pool)

    async def main() -> tuple[set[str], list[bytes]]:
        loop_thread = threading.current_thread().name
        names = await asyncio.gather(*[
            runner.run(lambda ws: threading.current_thread().name, "probe") for _ in range(32)])
        sigs = await asyncio.gather(*[hsm.asign(label, SignAlgorithm.HMAC_SHA256, b"%d" % i) for i in range(32)])
        assert loop_thread not in names
        return set(names), list(sigs)

    names, sigs = asyncio.run(main())
    assert all(n.startswith("hsm-worker-") for n in names)
    assert sigs == [hmac.new(key, b"%d" % i, hashlib.sha256).digest() for i in range(32)]


def test_keys_created_as_session_objects_elsewhere_are_not_matched(hsm: Hsm, label: str) -> None:
    # pkcs11-provider in the same process creates session objects; lookups must ignore them.
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))

    def make_session_copy(ws: object) -> None:
        from pkcs11 import Attribute, KeyType, ObjectClass

        ws.session.create_object({  # type: ignore[attr-defined]
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: False, Attribute.LABEL: label, Attribute.VALUE: b"s" * 32,
            Attribute.SIGN: True})

    hsm.pool.run(make_session_copy, "session object")
    assert hsm.hmac_sha256(label, b"m") == hmac.new(key, b"m", hashlib.sha256).digest()


def test_base64_roundtrip_of_b64_key_used_by_azure(hsm: Hsm, label: str) -> None:
    primary = base64.b64encode(secrets.token_bytes(64)).decode()
    hsm.import_secret_key(label, Secret(base64.b64decode(primary)))
    expected = hmac.new(base64.b64decode(primary), b"sr\n1", hashlib.sha256).digest()
    assert hsm.hmac_sha256(label, b"sr\n1") == expected


@pytest.mark.token_matrix
def test_state_reports_ready_with_token_identity(hsm: Hsm, token_env) -> None:  # type: ignore[no-untyped-def]
    st = hsm.state
    assert st.ready and st.reason is None
    assert st.token_label == token_env.label and st.token_serial
    assert time.time() >= st.since


def test_no_pin_or_key_material_reaches_the_logs(hsm: Hsm, token_env, label: str,  # type: ignore[no-untyped-def]
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))
    hsm.hmac_sha256(label, b"data")
    with pytest.raises(DuplicateObject):
        hsm.import_secret_key(label, Secret(key))
    with pytest.raises(ObjectNotFound):
        hsm.hmac_sha256(label + "-missing", b"data")
    text = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    for secret in (token_env.pin.decode(), key.hex(), base64.b64encode(key).decode(), repr(key)):
        assert secret not in text


def test_find_reads_only_the_label_asked_for_and_returns_every_duplicate(hsm: Hsm, label: str) -> None:
    from spyrus_hsm.hsm import InvalidInput

    pair_id = hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    hsm.import_secret_key(label + "-other", Secret(secrets.token_bytes(32)))
    assert [(o.label, o.type, o.id_hex) for o in hsm.find(label)] == [
        (label, "private", pair_id), (label, "public", pair_id)]
    assert [o.type for o in hsm.find(label, "private")] == ["private"]
    assert hsm.find(label, "cert") == [] and hsm.find(label + "-missing") == []
    assert [o.label for o in hsm.find(label + "-other", "secret-key")] == [label + "-other"]
    # A second secret key under the same label (created outside this module): both come back.
    def duplicate(ws: object) -> None:
        from pkcs11 import Attribute, KeyType, ObjectClass

        ws.session.create_object({  # type: ignore[attr-defined]
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: True, Attribute.LABEL: label + "-other", Attribute.ID: b"\x01",
            Attribute.VALUE: b"s" * 32, Attribute.SIGN: True})

    hsm.pool.run(duplicate, "a duplicate label")
    both = hsm.find(label + "-other", "secret-key")
    assert len(both) == 2 and both == sorted(both, key=lambda o: o.id_hex)
    with pytest.raises(InvalidInput, match="unknown object type"):
        hsm.find(label, "secrets")
    hsm.delete(Pkcs11Uri(object=label + "-other"))


# --- a write that fails half-way leaves nothing behind (faults from the PKCS#11 shim) ---------

CKO_CERTIFICATE, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 1, 2, 3


@pytest.fixture
def full_token(token_env):  # type: ignore[no-untyped-def]
    """The shim's control file, reset to a healthy token after the test."""
    yield token_env
    token_env.set_shim(state="plugged")


def _left_on_token(hsm: Hsm, label: str, key_id: bytes | None = None) -> set[tuple[int, str]]:
    """(class, label) of the token objects with that label (or that CKA_ID), as a session of its
    own sees them: not the workers' handle caches."""
    from pkcs11 import Attribute

    from spyrus_hsm.hsm import library

    session = library.open_session(hsm.pool.run(lambda ws: ws.session.token, "token"))
    try:
        found = list(session.get_objects({Attribute.TOKEN: True, Attribute.LABEL: label}))
        if key_id is not None:
            found += list(session.get_objects({Attribute.TOKEN: True, Attribute.ID: key_id}))
        return {(int(o[Attribute.CLASS]), str(o[Attribute.LABEL])) for o in found}
    finally:
        session.close()


def _p12(key: ec.EllipticCurvePrivateKey) -> bytes:
    leaf, chain = _ca_chain(key)
    return pkcs12.serialize_key_and_certificates(
        b"dev", key, leaf, chain, serialization.BestAvailableEncryption(b"p12-password"))


@pytest.mark.shim
@pytest.mark.parametrize("refused", [CKO_PUBLIC_KEY, CKO_PRIVATE_KEY], ids=["public", "private"])
def test_a_generated_key_pair_whose_id_cannot_be_set_is_removed(hsm: Hsm, label: str, full_token,  # type: ignore[no-untyped-def]
                                                                refused: int) -> None:
    from spyrus_hsm.hsm import OperationFailed

    full_token.set_shim(state="plugged", fail_set_class=refused)
    with pytest.raises(OperationFailed, match="out of memory"):
        hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    full_token.set_shim(state="plugged")
    assert _left_on_token(hsm, label) == set()
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)  # the label is free again
    assert _left_on_token(hsm, label) == {(CKO_PUBLIC_KEY, label), (CKO_PRIVATE_KEY, label)}


@pytest.mark.shim
@pytest.mark.parametrize("refused", [CKO_PUBLIC_KEY, CKO_CERTIFICATE], ids=["public-key", "certificate"])
def test_a_pkcs12_import_that_fails_half_way_leaves_no_object(hsm: Hsm, label: str, full_token,  # type: ignore[no-untyped-def]
                                                              refused: int) -> None:
    from spyrus_hsm.hsm import OperationFailed

    key = ec.generate_private_key(ec.SECP256R1())
    key_id = key_id_from_spki(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    full_token.set_shim(state="plugged", fail_create_class=refused)
    with pytest.raises(OperationFailed, match="out of memory"):
        hsm.import_pkcs12(label, _p12(key), Secret(b"p12-password"))
    full_token.set_shim(state="plugged")
    assert _left_on_token(hsm, label, key_id) == set()
