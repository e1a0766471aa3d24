"""In-memory stand-ins for the boundaries of the renewal orchestration, with faults on command:
a key store (`keystore.KeyStore`), DPS's exchange (`Provisioner(exchange=…)`) and the hub
connection (move and announce). Everything above them — `renewal`, `dps.Provisioner`, the
identity helpers — is the real code.

A fault is armed per step, once: "error" raises what the real part raises; "hang" models a call
that outlives its deadline: the caller gets the timeout error the real part raises (HsmTimeout,
DPS's deadline, HubTimeout), and the call's effect happens later anyway, when the test calls
`settle()` (the worst moment: after the caller has cleaned up).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID

from spyrus_hsm.cloud import dps_client
from spyrus_hsm.cloud.dps import Assignment
from spyrus_hsm.hsm import (
    HsmState,
    HsmTimeout,
    InvalidInput,
    KeyAlgorithm,
    KeyRef,
    ObjectInfo,
    ObjectNotFound,
    OperationFailed,
    SignAlgorithm,
    as_uri,
)
from spyrus_hsm.identity.x509 import X509Credential
from spyrus_hsm.sdkerrors import HubError, HubTimeout

_CURVES = {KeyAlgorithm.EC_P256: ec.SECP256R1(), KeyAlgorithm.EC_P384: ec.SECP384R1()}
_HASHES = {SignAlgorithm.ECDSA_SHA256: hashes.SHA256(), SignAlgorithm.ECDSA_SHA384: hashes.SHA384()}


class Faults:
    """Faults armed by step name, each used once; late effects kept until `settle()`."""

    def __init__(self) -> None:
        self.armed: dict[str, str] = {}
        self.late: list[Callable[[], None]] = []

    def arm(self, step: str, mode: str) -> None:
        assert mode in ("error", "hang"), mode
        self.armed[step] = mode

    def take(self, step: str) -> str | None:
        return self.armed.pop(step, None)

    def settle(self) -> None:
        late, self.late = self.late, []
        for effect in late:
            effect()


@dataclass
class _Pair:
    key: ec.EllipticCurvePrivateKey
    algorithm: KeyAlgorithm
    id_hex: str
    certs: list[x509.Certificate] = field(default_factory=list)


class FakeKeyStore:
    """A token in memory: EC key pairs with the certificates stored beside them, HMAC keys.
    Steps with faults: "generate", "store", "delete:<label>" (deleting that generation)."""

    def __init__(self, faults: Faults, token_label: str = "fake") -> None:
        self.faults = faults
        self.pairs: dict[str, _Pair] = {}
        self.secrets: dict[str, bytes] = {}
        self._state = HsmState("ready", token_label=token_label, token_serial="0")

    @property
    def state(self) -> HsmState:
        return self._state

    # --- reading ---------------------------------------------------------------------------

    def list_objects(self) -> list[ObjectInfo]:
        out = []
        for label, pair in self.pairs.items():
            out += [ObjectInfo(label, pair.id_hex, "private", "EC", True, False),
                    ObjectInfo(label, pair.id_hex, "public", "EC", False, True)]
            out += [ObjectInfo(label, pair.id_hex, "cert", None, None, None, c.subject.rfc4514_string(),
                               c.not_valid_after_utc.isoformat()) for c in pair.certs]
        out += [ObjectInfo(label, "00", "secret-key", "GENERIC_SECRET", True, False) for label in self.secrets]
        return sorted(out, key=lambda i: (i.label, i.type, i.id_hex))

    def find(self, label: str, type: str | None = None) -> list[ObjectInfo]:
        return [o for o in self.list_objects() if o.label == label and type in (None, o.type)]

    def public_key(self, key: KeyRef) -> Any:
        return self._pair(key).key.public_key()

    def key_algorithm(self, key: KeyRef) -> KeyAlgorithm:
        return self._pair(key).algorithm

    def certificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        certs = self._pair(key).certs
        if not certs:
            raise ObjectNotFound(f"no certificate for '{as_uri(key).object}'")
        return list(certs)

    def sign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        label = as_uri(key).object or ""
        if algorithm is SignAlgorithm.HMAC_SHA256:
            return hmac.new(self.secrets[label], data, hashlib.sha256).digest()
        pair = self._pair(key)
        r, s = decode_dss_signature(pair.key.sign(data, ec.ECDSA(_HASHES[algorithm])))
        size = (pair.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    # --- changing ---------------------------------------------------------------------------

    def import_secret(self, label: str, value: bytes) -> None:
        self.secrets[label] = value

    def derive_hmac_key(self, parent: KeyRef, message: bytes, label: str) -> str:
        self.secrets[label] = self.sign(parent, SignAlgorithm.HMAC_SHA256, message)
        return "00"

    def generate_keypair(self, label: str, algorithm: KeyAlgorithm) -> str:
        def generate() -> str:
            if label in self.pairs:
                raise InvalidInput(f"'{label}' is taken")
            key = ec.generate_private_key(_CURVES[algorithm])
            spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
            self.pairs[label] = _Pair(key, algorithm, hashlib.sha1(spki).hexdigest())
            return self.pairs[label].id_hex

        return self._faulty("generate", f"generating key '{label}'", generate)

    def import_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        def store() -> str:
            pair = self.pairs.get(label)
            if pair is None:
                raise ObjectNotFound(f"no private key labelled '{label}'")
            if pair.certs:
                raise InvalidInput(f"key '{label}' already has certificates")
            pair.certs = list(certs)
            return pair.id_hex

        return self._faulty("store", f"importing certificates for '{label}'", store)

    def replace_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        """New chain first ("store"), old deleted after ("delete:<label>"): with the second
        failing, both are there (certificate_chain then gives the new one)."""
        pair = self.pairs.get(label)
        if pair is None:
            raise ObjectNotFound(f"no private key labelled '{label}'")
        old = list(pair.certs)

        def store() -> str:
            pair.certs = list(certs) + old
            return pair.id_hex

        self._faulty("store", f"storing certificates for '{label}'", store)

        def delete() -> int:
            pair.certs = [c for c in pair.certs if c not in old or c in certs]
            return len(old)

        self._faulty(f"delete:{label}", f"deleting the old certificates of '{label}'", delete)
        return pair.id_hex

    def delete(self, ref: KeyRef) -> int:
        uri = as_uri(ref)
        label = uri.object or ""

        def delete() -> int:
            pair = self.pairs.get(label)
            if pair is None:
                return 0
            if uri.type == "cert":
                count, pair.certs = len(pair.certs), []
                return count
            del self.pairs[label]
            return 2 + len(pair.certs)

        return self._faulty(f"delete:{label}", f"deleting '{label}'", delete)

    # --- internals ---------------------------------------------------------------------------

    def _pair(self, key: KeyRef) -> _Pair:
        label = as_uri(key).object or ""
        if label not in self.pairs:
            raise ObjectNotFound(f"no key pair labelled '{label}'")
        return self.pairs[label]

    def _faulty(self, step: str, what: str, effect: Callable[[], Any]) -> Any:
        mode = self.faults.take(step)
        if mode == "error":
            raise OperationFailed(f"{what}: the token failed (injected)")
        if mode == "hang":
            self.faults.late.append(lambda: _quietly(effect))
            raise HsmTimeout(f"{what}: no answer within the HSM timeout (injected)")
        return effect()


def _quietly(effect: Callable[[], Any]) -> None:
    try:
        effect()
    except Exception:
        pass


class FakeDps:
    """DPS's exchange: issues a certificate for the CSR, valid `validity` from now, from a CA of
    its own (`root`). Steps with faults: "register" (error: DPS unreachable; hang: the deadline
    passes), "chain" (error: the chain issued is for another key)."""

    def __init__(self, faults: Faults, hub: str = "hub.example", validity: float = 3600) -> None:
        self.faults = faults
        self.hub = hub
        self.validity = validity
        self.issued = 0
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "fake DPS issuing CA")])
        now = dt.datetime.now(dt.UTC)
        self.root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.root_key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.root_key, hashes.SHA384()))

    def __call__(self, target: dps_client.DpsTarget, payload: Any, timeout: float,
                 csr: bytes | None) -> dict[str, Any]:
        mode = self.faults.take("register")
        if mode == "error":
            raise dps_client.Unreachable("connection refused (injected)")
        if mode == "hang":
            raise dps_client.DeadlineExceeded(f"no answer within {timeout:g} s (injected)")
        assert csr is not None
        request = x509.load_der_x509_csr(csr)
        key = request.public_key()
        if self.faults.take("chain") == "error":
            key = ec.generate_private_key(ec.SECP384R1()).public_key()
        now = dt.datetime.now(dt.UTC)
        leaf = (x509.CertificateBuilder().subject_name(request.subject).issuer_name(self.root.subject)
                .public_key(key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(now + dt.timedelta(seconds=self.validity))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.root_key, hashes.SHA384()))
        self.issued += 1
        chain = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in (leaf, self.root)]
        return {"operationId": "op", "status": "assigned",
                "registrationState": {"assignedHub": self.hub, "deviceId": target.registration_id,
                                      "status": "assigned", "issuedCertificateChain": chain}}


class FakeHub:
    """The module's hub connection: which credential it uses, and the certificate-renewed
    messages delivered. It accepts a credential whose chain leads to `root` and is valid now,
    and whose key is in `keys` (the TLS handshake signs with it). Steps with faults: "move"
    (error: the hub refuses the new certificate; hang: the connect misses its deadline; either
    way the client goes back to the previous credential, as `HubClient.switch` does) and
    "announce" (error: the connection dropped; hang: delivered late)."""

    def __init__(self, faults: Faults, keys: FakeKeyStore, root: x509.Certificate) -> None:
        self.faults = faults
        self.keys = keys
        self.root = root
        self.using: str | None = None
        self.announced: list[str] = []

    def connect(self, cred: X509Credential) -> None:
        self.using = cred.label

    def move(self, cred: X509Credential, assignment: Assignment) -> None:
        mode = self.faults.take("move")
        if mode == "error":
            raise HubError("IoT Hub hub.example refused the credential (injected)")
        if mode == "hang":
            raise HubTimeout("IoT Hub hub.example did not answer while connecting (injected)")
        self.using = cred.label

    def announce(self, cred: X509Credential, previous: X509Credential) -> None:
        mode = self.faults.take("announce")
        if mode == "error":
            raise HubError("IoT Hub hub.example dropped the connection while sending a message (injected)")
        if mode == "hang":
            self.faults.late.append(lambda: self.announced.append(cred.label))
            raise HubTimeout("IoT Hub hub.example did not answer while sending a message (injected)")
        self.announced.append(cred.label)

    def credential_works(self) -> bool:
        """Whether a (re)connection with the credential in use would succeed now."""
        pair = self.keys.pairs.get(self.using or "")
        if pair is None or not pair.certs:
            return False
        leaf = pair.certs[0]
        now = dt.datetime.now(dt.UTC)
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc
                and leaf.issuer == self.root.subject
                and leaf.public_key().public_bytes(*fmt) == pair.key.public_key().public_bytes(*fmt))



class FakeHubClient:
    """What `CloudConnection` asks of `hub.HubClient`, counted: `FakeHubClient.made` lists every
    client made, so a test sees two clients for one identity."""

    made: ClassVar[list[FakeHubClient]] = []

    def __init__(self, keys: Any, identity: Any, **options: Any) -> None:
        self.identity = identity
        self.connected = False
        self.closed = False
        self.reports: list[dict[str, Any]] = []
        FakeHubClient.made.append(self)

    def connect(self) -> FakeHubClient:
        self.connected = True
        return self

    def shutdown(self) -> None:
        self.connected, self.closed = False, True

    def switch(self, identity: Any) -> None:
        self.identity = identity

    def send(self, message: Any) -> None:
        pass

    def report(self, patch: dict[str, Any], timeout: float | None = None) -> None:
        self.reports.append(patch)
