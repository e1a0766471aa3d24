"""DPS registration with credentials held in the HSM, for the edge device or a leaf device.

- X.509: the certificate chain stored with an HSM key is checked locally first (an incomplete
  chain made the SDK loop forever: azure-iot-sdk-python #797; a chain or CN problem is raised as
  the credential's error, x509.ChainError), then TLS client auth runs through pkcs11-provider.
- Symmetric key, individual: the SAS token is signed in the HSM.
- Symmetric key, group enrollment: the device key HMAC(groupKey, registrationId) is derived
  inside the HSM and stored there as a non-extractable key, then used as above.

Certificate issuance (Azure Device Registry certificate management): with `issue_cert` the
request carries a CSR for a P-384 key generated in the HSM under that label (kept if it is
there already); the issued chain is checked (`identity.issued`) and stored in the HSM beside the
key (same CKA_ID, its own label), where X.509 connections find it. With `csr` a leaf's own
request is sent and the checked chain is returned, not stored. A renewal is the same call with
a new key under a new label.

The MQTT exchange is `dps_client`'s, on the calling thread, with an overall deadline that closes
the connection. The assignment is persisted atomically in the state directory and reused until
the identity (credential or request) changes or a new registration is asked for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .. import times
from ..config import CloudConfig
from ..errors import Kind, SpyrusError
from ..files import read_json, write_json_atomic
from ..hsm import InvalidInput, ObjectNotFound, Pkcs11Uri, one_token
from ..identity import issued as issued_id
from ..identity import x509 as x509_id
from ..identity.sas import dps_uri
from ..identity.sas import mint as sas_mint
from ..keystore import KeyStore
from . import dps_client

Attestation = Literal["x509", "symmetricKey"]
log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 120.0
SAS_TTL = 3600  # seconds; the token is only used to connect for this registration
Exchange = Callable[[dps_client.DpsTarget, Any, float, "bytes | None"], dict[str, Any]]


class RegistrationError(SpyrusError, RuntimeError, kind=Kind.UPSTREAM):
    """A registration that did not produce an assignment; the message says what to do."""

    retry_after: float | None = None  # seconds DPS asked to wait before trying again


@dataclass(frozen=True)
class DpsRequest:
    id_scope: str
    registration_id: str
    provisioning_host: str
    attestation: Attestation
    key: str | None = None            # SAS key label, or X.509 credential label
    cn: str | None = None             # X.509 credential chosen by certificate CN
    group: bool = False               # `key` is a group enrollment key
    payload: Any = None
    server_ca_pem: str | None = None  # trust anchor for the DPS endpoint (None: system CAs)
    issue_cert: str | None = None     # HSM key label to have a certificate issued for
    csr: bytes | None = None          # a leaf's own DER CSR to have signed (not stored here)

    @classmethod
    def onboarding(cls, cloud: CloudConfig, server_ca_pem: str | None,
                   issue_cert: str | None = None) -> DpsRequest:
        """The registration of the config's own identity, with its onboarding credential."""
        assert cloud.id_scope and cloud.registration_id
        return cls(cloud.id_scope, cloud.registration_id, cloud.provisioning_host, cloud.attestation, cloud.key,
                   group=cloud.group, server_ca_pem=server_ca_pem, issue_cert=issue_cert)

    def canonical_payload(self) -> str:
        """The payload as canonical JSON: equal payloads give equal text (a dict is unhashable)."""
        return json.dumps(self.payload, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Assignment:
    registration_id: str
    assigned_hub: str
    device_id: str
    status: str
    substatus: str | None
    attestation: str
    identity: str       # fingerprint of the credential and request; a change re-registers
    registered_at: str
    key: str | None = None  # the HSM key (SAS) or credential (X.509) label that was used
    certificate_chain: list[str] | None = None  # issued: base64 DER, leaf first
    certificate_label: str | None = None        # where the issued chain is stored in the HSM

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_api(self) -> dict[str, Any]:
        """The shape the CLI prints and the HTTP API returns."""
        out: dict[str, Any] = {
            "registrationId": self.registration_id, "assignedHub": self.assigned_hub,
            "deviceId": self.device_id, "status": self.status, "substatus": self.substatus,
            "attestation": self.attestation, "registeredAt": self.registered_at}
        if self.certificate_chain:
            out["issuedCertificateChain"] = self.certificate_chain
            leaf = issued_id.decode_chain(self.certificate_chain)[0]
            out["certificate"] = {**issued_id.describe(leaf), "label": self.certificate_label}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Assignment:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


class Provisioner:
    def __init__(self, hsm: KeyStore, state_dir: str | Path,
                 load_provider: Callable[[], None] | None = None,
                 exchange: Exchange = dps_client.register, attest: KeyStore | None = None) -> None:
        self.hsm = hsm  # where an issued certificate's key is generated and its chain stored
        # Whose credential authenticates the registration (the SAS key, the X.509 credential):
        # `hsm` by default; with two tokens, a replacement token's first certificate can be
        # asked for with the survivor's credential (`token compare --provision`).
        self.attest = attest if attest is not None else hsm
        self.state_dir = Path(state_dir)
        self._load_provider = load_provider
        self._exchange = exchange  # the MQTT exchange with DPS (tests put a DPS of their own here)

    def result_path(self, registration_id: str) -> Path:
        return self.state_dir / "registrations" / f"{registration_id}.json"

    def cached(self, registration_id: str) -> Assignment | None:
        data = read_json(self.result_path(registration_id))
        return Assignment.from_json(data) if isinstance(data, dict) else None

    def register(self, req: DpsRequest, force: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> Assignment:
        """Register (or reuse the persisted assignment for this exact identity)."""
        cred = None
        if req.attestation == "x509":
            cred = self._credential(req)
            if cred.common_name != req.registration_id:
                raise RegistrationIdMismatch(
                    f"the certificate CN '{cred.common_name}' must equal the registration id "
                    f"'{req.registration_id}' for DPS X.509 attestation")
            x509_id.validate_chain(cred.chain)
            identity = _fingerprint(req, cred.leaf.fingerprint(_sha256()).hex())
            key_label = cred.label
        else:
            key_label = self._sas_key(req)
            key_id = next((o.id_hex for o in self.attest.find(key_label, "secret-key")), "")
            identity = _fingerprint(req, key_id)
        made = bool(req.issue_cert) and not self.hsm.find(req.issue_cert or "", "private")
        try:
            return self._register(req, force, timeout, cred, key_label, identity)
        except BaseException:
            if made:  # the key pair this call generated has no certificate: no orphan left
                self._discard_new_key(req.issue_cert or "")
            raise

    def _discard_new_key(self, label: str) -> None:
        try:
            if not self.hsm.find(label, "cert"):
                self.hsm.delete(Pkcs11Uri(object=label))
        except Exception as exc:  # said, and left for the operator: the first error is the story
            log.warning("the key pair '%s' made for a certificate DPS did not issue could not be deleted "
                        "(%s); delete it with 'spyrus-hsm delete --label %s'", label, exc, label)

    def _register(self, req: DpsRequest, force: bool, timeout: float, cred: x509_id.X509Credential | None,
                  key_label: str, identity: str) -> Assignment:
        if req.issue_cert:
            # Another operational key is another request; without its certificate, ask again.
            operational = issued_id.operational_key(one_token(self.hsm, req.issue_cert), req.issue_cert)
            identity = _fingerprint(req, f"{identity}\n{req.issue_cert}\n{operational}")
            force = force or not self.hsm.find(req.issue_cert, "cert")
        previous = self.cached(req.registration_id)
        if (previous and not force and req.csr is None and previous.identity == identity
                and previous.status == "assigned"):
            return previous
        csr = req.csr
        if req.issue_cert:
            csr = issued_id.device_csr(one_token(self.hsm, req.issue_cert), req.issue_cert, req.registration_id)
        elif csr is not None:
            issued_id.check_csr(csr, req.registration_id)
        try:
            result = self._exchange(self._target(req, key_label, cred), req.payload, timeout, csr)
        except dps_client.DpsFailure as exc:
            raise _explain(exc, req, timeout) from None
        state = result.get("registrationState") or {}
        if not state.get("assignedHub") or not state.get("deviceId"):
            raise RegistrationError(f"DPS assigned '{req.registration_id}' without naming a hub and "
                                    f"device id: {json.dumps(result)}",
                                    public=f"DPS's answer for '{req.registration_id}' names no hub and device id")
        chain = None
        if csr is not None:
            chain = self._accept_chain(req, csr, state.get("issuedCertificateChain"))
        assignment = Assignment(
            registration_id=req.registration_id, assigned_hub=state["assignedHub"],
            device_id=state["deviceId"], status=result["status"], substatus=state.get("substatus"),
            attestation=req.attestation, identity=identity, key=key_label,
            registered_at=times.iso(times.now()),
            certificate_chain=chain, certificate_label=req.issue_cert)
        write_json_atomic(self.result_path(req.registration_id), assignment.to_json())
        return assignment

    def _accept_chain(self, req: DpsRequest, csr: bytes, encoded: Any) -> list[str]:
        """Check the issued chain against the CSR's key; for an HSM key, store it beside the key
        (in place of a previous chain of that label: the key is the same, only the certificate
        is renewed; the new chain is stored before the old one is deleted, so an interruption
        never leaves the key, perhaps the one in use, without a certificate)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        chain = issued_id.decode_chain(encoded)
        issued_id.check_chain(chain, x509.load_der_x509_csr(csr).public_key(), req.registration_id)
        if req.issue_cert:
            one_token(self.hsm, req.issue_cert).replace_certificates(req.issue_cert, chain)
        return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]

    def _credential(self, req: DpsRequest) -> x509_id.X509Credential:
        """The X.509 credential the registration attests with. A caller through the API is told
        of its registration only; the message (what the token holds) is the operator's."""
        try:
            return x509_id.select(one_token(self.attest, req.key or ""), label=req.key,
                                  cn=req.cn or (None if req.key else req.registration_id))
        except ObjectNotFound as exc:
            exc.public = f"no X.509 credential for the registration of '{req.registration_id}'"
            raise
        except InvalidInput as exc:
            exc.public = f"more than one X.509 credential matches the registration of '{req.registration_id}'"
            raise

    def _sas_key(self, req: DpsRequest) -> str:
        if not req.key:
            raise RegistrationError("symmetric-key attestation needs the HSM key label (--sas-key)")
        if not self.attest.find(req.key, "secret-key"):
            raise ObjectNotFound(f"no secret key labelled '{req.key}'; import it with 'spyrus-hsm key import-sas'",
                                 public=f"no key for the registration of '{req.registration_id}'")
        if not req.group:
            return req.key
        derived = f"{req.key}.{req.registration_id}"
        if not self.attest.find(derived, "secret-key"):
            self.attest.derive_hmac_key(req.key, req.registration_id.encode(), derived)
        return derived

    def _target(self, req: DpsRequest, key_label: str,
                cred: x509_id.X509Credential | None) -> dps_client.DpsTarget:
        """Where to register, authenticated by the TLS client certificate (the key signs in the
        HSM through pkcs11-provider) or by a SAS token signed in the HSM."""
        context = ssl.create_default_context(cadata=req.server_ca_pem)  # None: the system CAs
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        token = None
        if cred is not None:
            if self._load_provider is not None:
                self._load_provider()
            files = x509_id.write_tls_files(cred, one_token(self.attest, cred.label).state.token_label or "",
                                            self.state_dir / "tls")
            context.load_cert_chain(files.cert_file, files.key_file)
        else:
            uri = dps_uri(req.id_scope, req.registration_id)
            token = sas_mint(self.attest, key_label, uri, SAS_TTL).token
        return dps_client.DpsTarget(req.provisioning_host, req.id_scope, req.registration_id,
                                    context, token)


class CertificateRefused(RegistrationError, kind=Kind.INVALID):
    """DPS would not sign the CSR (a weak key, a subject that is not the registration id)."""


class RegistrationIdMismatch(x509_id.ChainError):
    """The X.509 credential's CN is not the registration id (DPS requires them equal)."""


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _fingerprint(req: DpsRequest, credential: str) -> str:
    parts = [req.provisioning_host, req.id_scope, req.registration_id, req.attestation,
             str(req.group), credential]
    if req.payload is not None:  # another payload is another request (none: as before)
        parts.append(req.canonical_payload())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _explain(exc: dps_client.DpsFailure, req: DpsRequest, timeout: float) -> RegistrationError:
    """The operator's message (what to check, where) and the caller's (`public`: what became of
    its registration)."""
    reg = req.registration_id
    if isinstance(exc, dps_client.Unauthorized):
        return RegistrationError(
            f"DPS refused the credentials of '{reg}' (unauthorized): check the "
            f"enrollment exists in ID scope {req.id_scope} and matches the "
            f"{'certificate/CA' if req.attestation == 'x509' else 'key'} in the HSM",
            public=f"DPS refused the credentials of '{reg}'")
    if isinstance(exc, dps_client.Rejected) and exc.status == 400 and (req.csr or req.issue_cert):
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        # DPS's own reason is about the caller's CSR ("too weak"): the caller may read it.
        return CertificateRefused(f"DPS refused the certificate signing request of '{reg}': {message or exc}",
                                  public=f"DPS refused the certificate signing request of '{reg}'"
                                         + (f": {message}" if message else ""))
    if isinstance(exc, dps_client.Throttled):
        error = RegistrationError(f"DPS is throttling the registration of '{reg}' "
                                  f"({exc.status}) and asks to retry in {exc.retry_after:g} s",
                                  public=f"DPS is throttling the registration of '{reg}'; retry in "
                                         f"{exc.retry_after:g} s")
        error.retry_after = exc.retry_after
        return error
    if isinstance(exc, dps_client.Rejected) and exc.status >= 300:
        return RegistrationError(f"DPS rejected the registration of '{reg}': {exc}; "
                                 "if it says 401, the enrollment does not match the credential",
                                 public=f"DPS rejected the registration of '{reg}' (status {exc.status})")
    if isinstance(exc, dps_client.Rejected):
        status = exc.body.get("status") if isinstance(exc.body, dict) else None
        return RegistrationError(f"DPS answered '{status}' for '{reg}'; "
                                 "check the enrollment's allocation policy and the hub link",
                                 public=f"DPS answered '{status}' for '{reg}'")
    if isinstance(exc, dps_client.Unreachable):
        return RegistrationError(f"cannot connect to DPS at {req.provisioning_host}: {exc}",
                                 public=f"DPS could not be reached for the registration of '{reg}'")
    return RegistrationError(f"DPS registration of '{reg}' did not finish within "
                             f"{timeout:g} s ({exc}); check that {req.provisioning_host} is reachable",
                             public=f"the registration of '{reg}' did not finish in time")
