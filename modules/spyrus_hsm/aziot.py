"""`/etc/aziot/config.toml` sections that make the IoT Edge runtime itself use this token.

The edge runtime's identity services (aziot-keyd, aziot-identityd on the host) take PKCS#11
keys: `[aziot_keys]` names the library and a base slot, and the `[provisioning]` section names
the device's own credential by `pkcs11:` URI. aziot reads the token's PIN only from those URIs
(`pin-value`), so the real file holds the PIN; this module renders it with a placeholder for
display and with the PIN only in the file it writes (mode 0600). aziot finds objects by
token label and object label alone (it ignores `type=`, which is kept for people reading the
file), so each label must name exactly one object of the class aziot will look for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from cryptography import x509

from .errors import Kind, SpyrusError
from .files import write_atomic
from .hsm import Hsm, Pkcs11Uri, Secret

PIN_PLACEHOLDER = "<PIN>"
DEFAULT_DPS_ENDPOINT = "https://global.azure-devices-provisioning.net/"


class AziotOptionsError(SpyrusError, kind=Kind.USAGE):
    """The provisioning asked for is incomplete or contradictory."""


class AziotObjectMissing(SpyrusError, kind=Kind.NOT_FOUND):
    """A credential the generated config would name is not in the token."""


class AziotObjectAmbiguous(SpyrusError, kind=Kind.CONFLICT):
    """A label names more than one object of a class: aziot, which finds by label, could pick either."""


@dataclass(frozen=True)
class Provisioning:
    """How the edge device gets its identity: DPS (id_scope) or manual (hub + device id), with
    an X.509 key pair (certificate read from `identity_cert`, a file) or a symmetric key."""

    source: Literal["dps", "manual"]
    method: Literal["x509", "sas"]
    key_label: str
    id_scope: str | None = None
    registration_id: str | None = None
    global_endpoint: str = DEFAULT_DPS_ENDPOINT
    hub: str | None = None
    device_id: str | None = None
    identity_cert: str | None = None

    @property
    def key_type(self) -> str:
        return "private" if self.method == "x509" else "secret-key"


def provisioning(*, id_scope: str | None = None, registration_id: str | None = None, hub: str | None = None,
                 device_id: str | None = None, x509: str | None = None, sas_key: str | None = None,
                 identity_cert: str | None = None, global_endpoint: str = DEFAULT_DPS_ENDPOINT) -> Provisioning:
    """The provisioning `aziot-config`'s options ask for, checked: DPS or manual, each with what it
    needs, and an X.509 credential (`x509`, its label) or a symmetric key (`sas_key`)."""
    if bool(id_scope) == bool(hub):
        raise AziotOptionsError("give --id-scope and --registration-id (DPS) or --hub and --device-id (manual)")
    if id_scope and not registration_id:
        raise AziotOptionsError("--id-scope needs --registration-id")
    if hub and not device_id:
        raise AziotOptionsError("--hub needs --device-id")
    if x509 and not identity_cert:
        raise AziotOptionsError("--x509 needs --identity-cert: the file aziot reads the device certificate from")
    key_label = x509 or sas_key
    if not key_label:
        raise AziotOptionsError("give --x509 or --sas-key: the credential aziot uses")
    return Provisioning(
        source="dps" if id_scope else "manual", method="x509" if x509 else "sas", key_label=key_label,
        id_scope=id_scope, registration_id=registration_id, global_endpoint=global_endpoint, hub=hub,
        device_id=device_id, identity_cert=identity_cert)


def check_objects(hsm: Hsm, prov: Provisioning) -> list[x509.Certificate]:
    """Check the credential exists once in the token; for X.509 return its certificate chain."""
    token = hsm.state.token_label or "?"
    found = hsm.find(prov.key_label, prov.key_type)
    what = "private key" if prov.method == "x509" else "symmetric key"
    if not found:
        hint = ("import it with 'spyrus-hsm key import-pkcs12' or generate it with 'spyrus-hsm key generate'"
                if prov.method == "x509" else "import it with 'spyrus-hsm key import-sas'")
        raise AziotObjectMissing(f"no {what} labelled '{prov.key_label}' in token '{token}': {hint} "
                                 "('spyrus-hsm list' shows what the token holds)")
    if len(found) > 1:
        raise AziotObjectAmbiguous(f"{len(found)} {what}s are labelled '{prov.key_label}' in token '{token}'; "
                                   "aziot finds keys by label alone: delete or relabel all but one")
    if prov.method == "sas":
        return []
    if not hsm.find(prov.key_label, "cert"):
        raise AziotObjectMissing(f"no certificate labelled '{prov.key_label}' in token '{token}': "
                                 "store it with 'spyrus-hsm cert import'")
    return hsm.certificate_chain(prov.key_label)


def chain_pem(chain: list[x509.Certificate]) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return "".join(c.public_bytes(Encoding.PEM).decode() for c in chain)


def write_config(path: str, lib_path: str, token_label: str, prov: Provisioning, pin: Secret) -> None:
    """The config file with the real PIN, which only its owner may read (mode 0600)."""
    write_atomic(path, render(lib_path, token_label, prov, pin_value(pin.reveal_str())), mode=0o600)


def write_identity_cert(prov: Provisioning, chain: list[x509.Certificate]) -> None:
    """The certificate chain read from the token, to the file the config names (`identity_cert`)."""
    assert prov.identity_cert
    write_atomic(prov.identity_cert, chain_pem(chain), mode=0o644)


def pin_value(pin: str) -> str:
    """The PIN as a URI query value (RFC 3986 unreserved characters stay, the rest %-encoded)."""
    return quote(pin, safe="")


def render(lib_path: str, token_label: str, prov: Provisioning, pin: str = PIN_PLACEHOLDER) -> str:
    """The TOML text. `pin` goes into every URI as is: the placeholder, or `pin_value(real)`."""

    def uri(base: Pkcs11Uri) -> str:
        return f"{base}?pin-value={pin}"

    key = uri(Pkcs11Uri(token=token_label, object=prov.key_label, type=prov.key_type))
    lines = [
        "# Generated by 'spyrus-hsm aziot-config': the IoT Edge runtime's own identity in the",
        f"# PKCS#11 token {_s(token_label)}. aziot reads the PIN only from the pin-value of these URIs,",
        "# so this file holds it: keep it owned by root, mode 0600. Apply with 'aziotctl config apply'.",
    ]
    if pin == PIN_PLACEHOLDER:
        lines.append(f"# {PIN_PLACEHOLDER} stands for the PIN: write the real file with --out.")
    lines += ["", "[provisioning]", f"source = {_s(prov.source)}"]
    if prov.source == "dps":
        lines += [f"global_endpoint = {_s(prov.global_endpoint)}", f"id_scope = {_s(prov.id_scope or '')}",
                  "", "[provisioning.attestation]",
                  f"method = {_s('x509' if prov.method == 'x509' else 'symmetric_key')}",
                  f"registration_id = {_s(prov.registration_id or '')}"]
    else:
        lines += [f"iothub_hostname = {_s(prov.hub or '')}", f"device_id = {_s(prov.device_id or '')}",
                  "", "[provisioning.authentication]", f"method = {_s(prov.method)}"]
    if prov.method == "x509":
        cert_uri = Path(prov.identity_cert or "").resolve().as_uri()
        lines += [f"identity_cert = {_s(cert_uri)}", f"identity_pk = {_s(key)}"]
    elif prov.source == "dps":
        lines.append(f"symmetric_key = {{ uri = {_s(key)} }}")
    else:
        lines.append(f"device_id_pk = {{ uri = {_s(key)} }}")
    lines += ["", "[aziot_keys]", f"pkcs11_lib_path = {_s(lib_path)}",
              f"pkcs11_base_slot = {_s(uri(Pkcs11Uri(token=token_label)))}", ""]
    return "\n".join(lines)


def _s(value: str) -> str:
    """A TOML basic string. Not json.dumps: it writes characters beyond U+FFFF as surrogate
    pairs, which TOML refuses, and leaves DEL unescaped, which TOML forbids."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif (ch < " " and ch != "\t") or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
