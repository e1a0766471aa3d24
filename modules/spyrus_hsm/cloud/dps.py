"""DPS registration with credentials held in the HSM, for the edge device or a leaf device.

- X.509: the certificate chain stored with an HSM key is checked locally first (an incomplete
  chain made the SDK loop forever: azure-iot-sdk-python #797), then TLS client auth runs
  through pkcs11-provider.
- Symmetric key, individual: the SAS token is signed in the HSM.
- Symmetric key, group enrollment: the device key HMAC(groupKey, registrationId) is derived
  inside the HSM and stored there as a non-extractable key, then used as above.

Every registration has an overall timeout. The assignment is persisted atomically in the state
directory and reused until the identity changes or a new registration is asked for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device import exceptions as sdk_errors
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.provisioning.pipeline.config import ProvisioningPipelineConfig
from azure.iot.device.provisioning.pipeline.mqtt_pipeline import MQTTPipeline

from ..files import read_json, write_json_atomic
from ..hsm import Hsm, HsmError, ObjectNotFound
from ..identity import x509 as x509_id
from ..identity.sas import HsmSigningMechanism, dps_uri

Attestation = Literal["x509", "symmetricKey"]
DEFAULT_TIMEOUT = 120.0


class RegistrationError(RuntimeError):
    """A registration that did not produce an assignment; the message says what to do."""


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_api(self) -> dict[str, Any]:
        """The shape the CLI prints and the HTTP API returns."""
        return {"registrationId": self.registration_id, "assignedHub": self.assigned_hub,
                "deviceId": self.device_id, "status": self.status, "substatus": self.substatus,
                "attestation": self.attestation, "registeredAt": self.registered_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Assignment:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


class Provisioner:
    def __init__(self, hsm: Hsm, state_dir: str | Path,
                 load_provider: Callable[[], None] | None = None) -> None:
        self.hsm = hsm
        self.state_dir = Path(state_dir)
        self._load_provider = load_provider

    def result_path(self, registration_id: str) -> Path:
        return self.state_dir / "registrations" / f"{registration_id}.json"

    def cached(self, registration_id: str) -> Assignment | None:
        data = read_json(self.result_path(registration_id))
        return Assignment.from_json(data) if isinstance(data, dict) else None

    def register(self, req: DpsRequest, force: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> Assignment:
        """Register (or reuse the persisted assignment for this exact identity)."""
        if req.attestation == "x509":
            cred = x509_id.select(self.hsm, label=req.key, cn=req.cn or (None if req.key else req.registration_id))
            if cred.common_name != req.registration_id:
                raise RegistrationError(
                    f"the certificate CN '{cred.common_name}' must equal the registration id "
                    f"'{req.registration_id}' for DPS X.509 attestation")
            try:
                x509_id.validate_chain(cred.chain)
            except x509_id.ChainError as exc:
                raise RegistrationError(f"not registering: {exc}") from None
            identity = _fingerprint(req, cred.leaf.fingerprint(_sha256()).hex())
            key_label = cred.label
        else:
            key_label = self._sas_key(req)
            key_id = next((o.id_hex for o in self.hsm.find(key_label, "secret-key")), "")
            identity = _fingerprint(req, key_id)
        previous = self.cached(req.registration_id)
        if previous and not force and previous.identity == identity and previous.status == "assigned":
            return previous
        client = self._client(req, key_label, cred if req.attestation == "x509" else None)
        if req.payload is not None:
            client.provisioning_payload = req.payload
        result = _run_with_timeout(client.register, timeout, req)
        state = result.registration_state
        if result.status != "assigned" or state is None:
            raise RegistrationError(f"DPS answered '{result.status}' for '{req.registration_id}'; "
                                    "check the enrollment's allocation policy and the hub link")
        assignment = Assignment(
            registration_id=req.registration_id, assigned_hub=state.assigned_hub,
            device_id=state.device_id, status=result.status, substatus=state.sub_status,
            attestation=req.attestation, identity=identity, key=key_label,
            registered_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        write_json_atomic(self.result_path(req.registration_id), assignment.to_json())
        return assignment

    def _sas_key(self, req: DpsRequest) -> str:
        if not req.key:
            raise RegistrationError("symmetric-key attestation needs the HSM key label (--sas-key)")
        if not self.hsm.find(req.key, "secret-key"):
            raise ObjectNotFound(f"no secret key labelled '{req.key}'; import it with 'spyrus-hsm key import-sas'")
        if not req.group:
            return req.key
        derived = f"{req.key}.{req.registration_id}"
        if not self.hsm.find(derived, "secret-key"):
            self.hsm.derive_hmac_key(req.key, req.registration_id.encode(), derived)
        return derived

    def _client(self, req: DpsRequest, key_label: str,
                cred: x509_id.X509Credential | None) -> ProvisioningDeviceClient:
        common: dict[str, Any] = {"server_verification_cert": req.server_ca_pem} if req.server_ca_pem else {}
        if cred is not None:
            if self._load_provider is not None:
                self._load_provider()
            files = x509_id.write_tls_files(cred, self.hsm.state.token_label or "",
                                            self.state_dir / "tls")
            return ProvisioningDeviceClient.create_from_x509_certificate(
                provisioning_host=req.provisioning_host, registration_id=req.registration_id,
                id_scope=req.id_scope, x509=X509(str(files.cert_file), str(files.key_file)), **common)
        # As create_from_symmetric_key, but the SAS token is signed in the HSM.
        token = RenewableSasToken(dps_uri(req.id_scope, req.registration_id),
                                  HsmSigningMechanism(self.hsm, key_label))
        config = ProvisioningPipelineConfig(
            hostname=req.provisioning_host, registration_id=req.registration_id,
            id_scope=req.id_scope, sastoken=token, **common)
        return ProvisioningDeviceClient(MQTTPipeline(config))


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _fingerprint(req: DpsRequest, credential: str) -> str:
    parts = [req.provisioning_host, req.id_scope, req.registration_id, req.attestation,
             str(req.group), credential]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _run_with_timeout(register: Callable[[], Any], timeout: float, req: DpsRequest) -> Any:
    """The SDK's register() has no overall deadline (it retries 429s and polls forever)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = register()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, name=f"dps-{req.registration_id}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise RegistrationError(f"DPS registration of '{req.registration_id}' did not finish within "
                                f"{timeout:g} s; check that {req.provisioning_host} is reachable")
    if "error" in box:
        raise _explain(box["error"], req) from None
    return box["result"]


def _explain(exc: BaseException, req: DpsRequest) -> Exception:
    if isinstance(exc, HsmError):
        return exc
    if isinstance(exc, sdk_errors.CredentialError):
        return RegistrationError(
            f"DPS refused the credentials of '{req.registration_id}' (unauthorized): check the "
            f"enrollment exists in ID scope {req.id_scope} and matches the "
            f"{'certificate/CA' if req.attestation == 'x509' else 'key'} in the HSM")
    if isinstance(exc, sdk_errors.ServiceError):
        return RegistrationError(f"DPS rejected the registration of '{req.registration_id}': {exc}; "
                                 "if it says 401, the enrollment does not match the credential")
    if isinstance(exc, sdk_errors.ConnectionFailedError):
        return RegistrationError(f"cannot connect to DPS at {req.provisioning_host}: {exc}")
    return RegistrationError(f"DPS registration of '{req.registration_id}' failed: {type(exc).__name__}: {exc}")
