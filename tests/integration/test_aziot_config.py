"""`spyrus-hsm aziot-config`: the IoT Edge runtime's own /etc/aziot/config.toml, run as a real
subprocess against the test token.

The written file is parsed with tomllib and every `pkcs11:` URI in it is resolved in a fresh
process with python-pkcs11 the way aziot-keys does (token label, object label, the object class
aziot asks for, login with pin-value): each must name exactly one object. The PIN must appear
in that file only, never on standard output or standard error (-v logging included).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import secrets
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

# Runs in its own interpreter: this process has SoftHSM loaded already, and aziot-keys is a
# separate process too. Prints {uri without its query: objects found, or "token" for a slot}.
RESOLVE = r"""
import json, sys, tomllib
from urllib.parse import unquote
import pkcs11
from pkcs11 import Attribute, ObjectClass

CLASSES = {"private": ObjectClass.PRIVATE_KEY, "secret-key": ObjectClass.SECRET_KEY}

def uris(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from uris(v)
    elif isinstance(value, str) and value.startswith("pkcs11:"):
        yield value

with open(sys.argv[2], "rb") as fh:
    doc = tomllib.load(fh)
lib = pkcs11.lib(sys.argv[1])
found = {}
for uri in uris(doc):
    path, _, query = uri[len("pkcs11:"):].partition("?")
    attrs = dict(item.split("=", 1) for item in path.split(";"))
    params = dict(item.split("=", 1) for item in query.split("&") if item)
    token = lib.get_token(token_label=unquote(attrs["token"]))
    with token.open(user_pin=unquote(params["pin-value"])) as session:
        if "object" not in attrs:
            found[path] = "token"
            continue
        template = {Attribute.LABEL: unquote(attrs["object"]), Attribute.CLASS: CLASSES[attrs["type"]]}
        found[path] = len(list(session.get_objects(template)))
print(json.dumps(found))
"""


@pytest.fixture
def aziot(cli, token_env):  # type: ignore[no-untyped-def]
    """`spyrus-hsm -v aziot-config ...`; the PIN must not be in anything it printed."""
    pin = token_env.pin.decode()

    def go(*args: str):  # type: ignore[no-untyped-def]
        res = cli("-v", "aziot-config", *args)
        assert pin not in res.out and pin not in res.err, "the PIN was printed"
        assert "Traceback" not in res.err, res.err
        return res

    return go


def _credential(cli, label: str, tmp_path: Path) -> x509.Certificate:  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    p12 = tmp_path / f"{label}.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(label.encode(), key, cert, None,
                                                          serialization.NoEncryption()))
    res = cli("key", "import-pkcs12", str(p12), "--label", label, "--no-password")
    assert res.code == 0, res.err
    return cert


def _sas_key(cli, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / f"{label}.key"
    key_file.write_text("c2FzLWtleS1mb3ItdGhlLWVkZ2UtcnVudGltZS0wMDE=\n")
    key_file.chmod(0o600)
    res = cli("key", "import-sas", "--label", label, "--key-file", str(key_file))
    assert res.code == 0, res.err


def _resolve(token_env, config: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-c", RESOLVE, token_env.module, str(config)],
                          capture_output=True, text=True, env=token_env.env(), timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


TARGETS = {
    "dps": ("--id-scope", "0ne00000001", "--registration-id", "edge-1"),
    "manual": ("--hub", "hub-1.example", "--device-id", "edge-1"),
}


@pytest.mark.parametrize("source", ["dps", "manual"])
@pytest.mark.parametrize("method", ["x509", "sas"])
def test_the_written_file_parses_and_each_uri_names_one_object(  # type: ignore[no-untyped-def]
        aziot, cli, token_env, label: str, tmp_path: Path, source: str, method: str) -> None:
    cert_file = tmp_path / "device-id.pem"
    if method == "x509":
        cert = _credential(cli, label, tmp_path)
        cred: tuple[str, ...] = ("--x509", label, "--identity-cert", str(cert_file))
    else:
        _sas_key(cli, label, tmp_path)
        cred = ("--sas-key", label)
    out = tmp_path / "aziot" / "config.toml"
    res = aziot(*TARGETS[source], *cred, "--lib-path", "/usr/lib/vendor/libpkcs11.so", "--out", str(out), "--yes")
    assert res.code == 0, res.err
    assert res.out == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = tomllib.loads(out.read_text())

    prov = doc["provisioning"]
    assert prov["source"] == source
    keys = doc["aziot_keys"]
    assert keys["pkcs11_lib_path"] == "/usr/lib/vendor/libpkcs11.so"
    assert keys["pkcs11_base_slot"].startswith(f"pkcs11:token={token_env.label}?pin-value=")
    section = prov["attestation"] if source == "dps" else prov["authentication"]
    if source == "dps":
        assert (prov["id_scope"], section["registration_id"]) == ("0ne00000001", "edge-1")
    else:
        assert (prov["iothub_hostname"], prov["device_id"]) == ("hub-1.example", "edge-1")
    if method == "x509":
        assert section["method"] == "x509"
        assert section["identity_cert"] == cert_file.resolve().as_uri()
        assert x509.load_pem_x509_certificates(cert_file.read_bytes()) == [cert]
        key_uri = section["identity_pk"]
    else:
        assert section["method"] == ("symmetric_key" if source == "dps" else "sas")
        key_uri = section["symmetric_key" if source == "dps" else "device_id_pk"]["uri"]
    key_path = key_uri.partition("?")[0]  # without the PIN, which assertion messages would show
    key_type = "private" if method == "x509" else "secret-key"
    assert key_path == f"pkcs11:token={token_env.label};object={label};type={key_type}"

    resolved = _resolve(token_env, out)
    assert resolved == {f"token={token_env.label}": "token", key_path[len("pkcs11:"):]: 1}


def test_printed_sections_carry_a_placeholder_and_write_nothing(aziot, cli, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _sas_key(cli, label, tmp_path)
    res = aziot(*TARGETS["dps"], "--sas-key", label)
    assert res.code == 0, res.err
    doc = tomllib.loads(res.out)
    uri = doc["provisioning"]["attestation"]["symmetric_key"]["uri"]
    assert uri.endswith("?pin-value=<PIN>")
    assert doc["aziot_keys"]["pkcs11_base_slot"].endswith("?pin-value=<PIN>")
    assert "aziot reads the PIN only from" in res.out
    assert list(tmp_path.iterdir()) == [tmp_path / f"{label}.key"]


def test_a_missing_key_is_a_clear_error_and_no_file(aziot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "config.toml"
    res = aziot(*TARGETS["dps"], "--sas-key", "no-such-key", "--out", str(out), "--yes")
    assert res.code == 1
    assert "no symmetric key labelled 'no-such-key'" in res.err and "spyrus-hsm key import-sas" in res.err
    assert not out.exists()


def test_an_x509_key_without_its_certificate_is_a_clear_error(aziot, cli, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    res = aziot(*TARGETS["manual"], "--x509", label, "--identity-cert", str(tmp_path / "c.pem"))
    assert res.code == 1
    assert f"no certificate labelled '{label}'" in res.err and "spyrus-hsm cert import" in res.err


def test_writing_the_pin_needs_confirmation(aziot, cli, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _sas_key(cli, label, tmp_path)
    out = tmp_path / "config.toml"
    res = aziot(*TARGETS["manual"], "--sas-key", label, "--out", str(out))
    assert res.code == 2
    assert "would hold the token PIN" in res.err and "--yes" in res.err
    assert not out.exists()


def test_a_target_is_required(aziot) -> None:  # type: ignore[no-untyped-def]
    res = aziot("--sas-key", "x")
    assert res.code == 2 and "--id-scope" in res.err
    res = aziot(*TARGETS["dps"], *TARGETS["manual"], "--sas-key", "x")
    assert res.code == 2
    label = "l-" + secrets.token_hex(2)
    res = aziot(*TARGETS["dps"], "--x509", label)
    assert res.code == 2 and "--identity-cert" in res.err


@pytest.mark.parametrize(("answer", "written"), [("y", True), ("n", False)])
def test_on_a_terminal_the_file_is_written_only_after_yes(  # type: ignore[no-untyped-def]
        cli, token_env, label: str, tmp_path: Path, answer: str, written: bool) -> None:
    _sas_key(cli, label, tmp_path)
    out = tmp_path / "config.toml"
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spyrus_hsm", "aziot-config", *TARGETS["dps"], "--sas-key", label,
             "--out", str(out)],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=token_env.env())
        os.write(controller, f"{answer}\n".encode())
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    pin = token_env.pin
    assert pin not in stdout and pin not in stderr
    assert b"will hold the token PIN in clear" in stdout
    assert (proc.returncode, out.exists()) == ((0, True) if written else (2, False)), stderr
