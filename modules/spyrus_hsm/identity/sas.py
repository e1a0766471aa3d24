"""Azure SAS tokens whose HMAC-SHA256 is computed inside the HSM.

    string to sign = quote(resource_uri, safe="") + "\\n" + expiry
    token = "SharedAccessSignature sr={uri}&sig={urlenc b64 sig}&se={expiry}[&skn={name}]"

Applications keep using ordinary SAS tokens; only the key never leaves the token.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from urllib.parse import quote

from azure.iot.device.common.auth.signing_mechanism import SigningMechanism

from ..errors import Kind, SpyrusError
from ..hsm import Hsm, KeyRef, SignAlgorithm
from ..keystore import KeyStore

MIN_TTL = 60
MAX_TTL = 365 * 24 * 3600


class SasError(SpyrusError, ValueError, kind=Kind.USAGE):
    """A SAS request that cannot be honoured as given (bad TTL, empty id, …)."""


@dataclass(frozen=True)
class SasToken:
    token: str
    resource_uri: str
    expires_on: int

    def __repr__(self) -> str:  # the token is a credential: keep it out of logs and reprs
        return f"SasToken(resource_uri={self.resource_uri!r}, expires_on={self.expires_on})"


def device_uri(hub: str, device_id: str, module_id: str | None = None) -> str:
    _require(hub=hub, device_id=device_id)
    uri = f"{hub}/devices/{device_id}"
    if module_id is not None:
        _require(module_id=module_id)
        uri += f"/modules/{module_id}"
    return uri


def dps_uri(id_scope: str, registration_id: str) -> str:
    _require(id_scope=id_scope, registration_id=registration_id)
    return f"{id_scope}/registrations/{registration_id}"


def _require(**values: str) -> None:
    for name, value in values.items():
        if not value or any(c in value for c in "\n\r") or value != value.strip():
            message = f"{name} must be a non-empty name without spaces around it"
            raise SasError(message, public=message)


def string_to_sign(resource_uri: str, expiry: int) -> bytes:
    return f"{quote(resource_uri, safe='')}\n{expiry}".encode()


def format_token(resource_uri: str, signature: bytes, expiry: int, key_name: str | None = None) -> str:
    sig = quote(base64.b64encode(signature).decode(), safe="")
    token = f"SharedAccessSignature sr={quote(resource_uri, safe='')}&sig={sig}&se={expiry}"
    return token + (f"&skn={quote(key_name, safe='')}" if key_name else "")


def check_ttl(ttl: int, min_ttl: int = MIN_TTL) -> int:
    if not min_ttl <= ttl <= MAX_TTL:
        message = f"ttl must be between {min_ttl} and {MAX_TTL} seconds, got {ttl}"
        raise SasError(message, public=message)
    return ttl


def expiry_for(ttl: int, now: float | None = None) -> int:
    return int((time.time() if now is None else now) + ttl)


def mint(keys: KeyStore, key: KeyRef, resource_uri: str, ttl: int, key_name: str | None = None,
         min_ttl: int = MIN_TTL) -> SasToken:
    """A SAS token for `resource_uri` signed with the HMAC key `key` in the key store."""
    expiry = expiry_for(check_ttl(ttl, min_ttl))
    sig = keys.sign(key, SignAlgorithm.HMAC_SHA256, string_to_sign(resource_uri, expiry))
    return SasToken(format_token(resource_uri, sig, expiry, key_name), resource_uri, expiry)


class SasMinter:
    """Mints SAS tokens with a key held in the HSM."""

    def __init__(self, hsm: Hsm, min_ttl: int = MIN_TTL) -> None:
        self.hsm = hsm
        self.min_ttl = min_ttl  # the service's own clients may renew more often than callers ask

    def mint(self, key: KeyRef, resource_uri: str, ttl: int,
             key_name: str | None = None) -> SasToken:
        return mint(self.hsm, key, resource_uri, ttl, key_name, self.min_ttl)

    async def amint(self, key: KeyRef, resource_uri: str, ttl: int,
                    key_name: str | None = None, background: bool = False) -> SasToken:
        expiry = expiry_for(check_ttl(ttl, self.min_ttl))
        sig = await self.hsm.asign(key, SignAlgorithm.HMAC_SHA256,
                                   string_to_sign(resource_uri, expiry), background=background)
        return SasToken(format_token(resource_uri, sig, expiry, key_name), resource_uri, expiry)


class HsmSigningMechanism(SigningMechanism):
    """azure-iot-device SigningMechanism whose HMAC runs in the HSM.

    `RenewableSasToken(uri, HsmSigningMechanism(hsm, "dev1"))` renews through the HSM.
    """

    def __init__(self, hsm: Hsm, key: KeyRef) -> None:
        self._hsm = hsm
        self._key = key

    def sign(self, data_str: str | bytes) -> str:
        data = data_str.encode("utf-8") if isinstance(data_str, str) else data_str
        return base64.b64encode(self._hsm.hmac_sha256(self._key, data)).decode("ascii")

