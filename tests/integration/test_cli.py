"""The `spyrus-hsm` command, run as a real subprocess against the test token.

Exit codes: 0 ok, 1 operation failed, 2 cannot run as given. Every run's stdout and stderr are
scanned for the PINs and for the key or password the test handed in.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import threading
from pathlib import Path
from urllib.parse import parse_qs, quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from token_matrix import HMAC_IMPORT, PRIVATE_KEY_IMPORT, TOKEN_INIT, needs


@pytest.fixture
def run(cli, token_env):  # type: ignore[no-untyped-def]
    """`cli`, plus: no PIN ever appears in what the command printed."""
    pins = [token_env.pin.decode(), token_env.so_pin_file.read_text().strip()]

    def go(*args: str, secrets_in: tuple[str, ...] = (), **kw):  # type: ignore[no-untyped-def]
        res = cli(*args, **kw)
        for s in (*pins, *secrets_in):
            assert s not in res.out and s not in res.err, f"secret leaked by {args}"
        assert "Traceback" not in res.err, res.err
        return res

    return go


def _secret_file(tmp_path: Path, name: str, value: str) -> Path:
    p = tmp_path / name
    p.write_text(value + "\n")
    p.chmod(0o600)
    return p


@pytest.mark.token_matrix
@needs(TOKEN_INIT)
def test_token_init_from_pin_files_then_selftest_passes_on_it(run, token_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    so = _secret_file(tmp_path, "so", "so-" + secrets.token_hex(6))
    user = _secret_file(tmp_path, "user", "user-" + secrets.token_hex(6))
    label = "cli-" + secrets.token_hex(3)
    res = run("token", "init", "--label", label, "--so-pin-file", str(so), "--pin-file", str(user),
              secrets_in=(so.read_text().strip(), user.read_text().strip()))
    assert res.code == 0, res.err
    assert f"initialised token '{label}'" in res.out
    env = token_env.env(SPYRUS_HSM_TOKEN_LABEL=label, SPYRUS_HSM_PIN_FILE=str(user))
    res = run("selftest", env=env)
    assert res.code == 0, res.out + res.err
    assert f"ok   login: token '{label}'" in res.out


def test_token_init_reads_both_pins_from_stdin(run) -> None:  # type: ignore[no-untyped-def]
    label = "cli-" + secrets.token_hex(3)
    so, user = "so-" + secrets.token_hex(6), "user-" + secrets.token_hex(6)
    res = run("token", "init", "--label", label, stdin=f"{so}\n{user}\n".encode(), secrets_in=(so, user))
    assert res.code == 0, res.err


def test_token_init_refuses_an_existing_label(run, token_env) -> None:  # type: ignore[no-untyped-def]
    res = run("token", "init", "--label", token_env.label, "--so-pin-file", str(token_env.so_pin_file))
    assert res.code == 1
    assert "already exists" in res.err


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_import_sas_key_then_mint_a_token_that_verifies(run, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = secrets.token_bytes(32)
    b64 = base64.b64encode(raw).decode()
    key_file = _secret_file(tmp_path, "key", b64)
    res = run("key", "import-sas", "--label", label, "--key-file", str(key_file), secrets_in=(b64,))
    assert res.code == 0, res.err
    assert "non-extractable" in res.out
    res = run("sas", "--key", label, "--hub", "hub.example", "--device-id", "dev-9", "--ttl", "600",
              "--json", secrets_in=(b64,))
    assert res.code == 0, res.err
    out = json.loads(res.out)
    fields = {k: v[0] for k, v in parse_qs(out["token"].split(" ", 1)[1]).items()}
    expected = base64.b64encode(hmac.new(
        raw, f"{quote(fields['sr'], safe='')}\n{fields['se']}".encode(), hashlib.sha256).digest()).decode()
    assert fields["sig"] == expected and out["resourceUri"] == "hub.example/devices/dev-9"


def test_import_sas_key_from_stdin(run, label: str) -> None:  # type: ignore[no-untyped-def]
    b64 = base64.b64encode(secrets.token_bytes(64)).decode()
    res = run("key", "import-sas", "--label", label, stdin=f"{b64}\n".encode(), secrets_in=(b64,))
    assert res.code == 0, res.err


def test_bad_base64_key_is_a_usage_error_and_stores_nothing(run, label: str) -> None:  # type: ignore[no-untyped-def]
    res = run("key", "import-sas", "--label", label, stdin=b"not*base64!!\n", secrets_in=("not*base64!!",))
    assert res.code == 2
    assert "not valid base64" in res.err
    listing = json.loads(run("list", "--json").out)
    assert all(o["label"] != label for o in listing["objects"])


def test_missing_token_lists_the_tokens_present(run, token_env) -> None:  # type: ignore[no-untyped-def]
    res = run("list", env=token_env.env(SPYRUS_HSM_TOKEN_LABEL="no-such-token"))
    assert res.code == 2
    assert "token with label 'no-such-token' not found" in res.err
    assert f"'{token_env.label}'" in res.err and "SPYRUS_HSM_TOKEN_LABEL" in res.err


def test_wrong_pin_fails_with_a_clear_message(run, token_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wrong = _secret_file(tmp_path, "wrong", "wrong-" + secrets.token_hex(4))
    res = run("list", env=token_env.env(SPYRUS_HSM_PIN_FILE=str(wrong)), secrets_in=(wrong.read_text().strip(),))
    assert res.code == 1
    assert "refused the PIN" in res.err


def test_world_readable_pin_file_is_refused(run, token_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loose = tmp_path / "loose.pin"
    loose.write_text(token_env.pin.decode())
    loose.chmod(0o644)
    res = run("list", env=token_env.env(SPYRUS_HSM_PIN_FILE=str(loose)))
    assert res.code == 2
    assert "chmod 600" in res.err


def test_unknown_label_says_how_to_find_labels(run) -> None:  # type: ignore[no-untyped-def]
    res = run("sas", "--key", "nope-" + secrets.token_hex(3), "--uri", "h/devices/d")
    assert res.code == 1
    assert "spyrus-hsm list" in res.err


def test_sas_needs_a_target(run) -> None:  # type: ignore[no-untyped-def]
    res = run("sas", "--key", "x")
    assert res.code == 2 and "--hub/--device-id" in res.err


def test_missing_required_argument_is_exit_2(run) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", "x").code == 2


def test_bad_config_key_names_key_and_file(run, token_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("hsm:\n  modul: /x\n")
    res = run("--config", str(bad), "list")
    assert res.code == 2 and "hsm.modul" in res.err and str(bad) in res.err


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CLI Test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.mark.token_matrix
def test_generate_csr_and_cert_import(run, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    res = run("csr", "--label", label, "--subject", "CN=leaf-7")
    assert res.code == 0, res.err
    csr = x509.load_pem_x509_csr(res.out.encode())
    assert csr.is_signature_valid
    ca_key, ca = _ca()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.subject)
            .public_key(csr.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    res = run("cert", "import", str(chain), "--label", label)
    assert res.code == 0, res.err
    objs = [o for o in json.loads(run("list", "--json").out)["objects"] if o["label"] == label]
    assert sorted(o["type"] for o in objs) == ["cert", "cert", "private", "public"]
    assert len({o["id_hex"] for o in objs}) == 1


@pytest.mark.token_matrix
def test_cert_import_refuses_a_certificate_for_another_key(run, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    _, ca = _ca()
    f = tmp_path / "other.pem"
    f.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    res = run("cert", "import", str(f), "--label", label)
    assert res.code == 1 and "is not that of key" in res.err


@pytest.mark.token_matrix
@needs(PRIVATE_KEY_IMPORT)
def test_pkcs12_import_with_password_file(run, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, cert = _ca()
    password = "p12-" + secrets.token_hex(5)
    p12 = tmp_path / "dev.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"dev", key, cert, None, serialization.BestAvailableEncryption(password.encode())))
    pw = _secret_file(tmp_path, "pw", password)
    res = run("key", "import-pkcs12", str(p12), "--label", label, "--password-file", str(pw), secrets_in=(password,))
    assert res.code == 0, res.err
    assert "1 certificate(s)" in res.out


def test_pkcs12_wrong_password_fails_and_stores_nothing(run, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, cert = _ca()
    p12 = tmp_path / "dev.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"dev", key, cert, None, serialization.BestAvailableEncryption(b"right-password")))
    res = run("key", "import-pkcs12", str(p12), "--label", label, stdin=b"wrong-password\n",
              secrets_in=("wrong-password", "right-password"))
    assert res.code == 1
    assert "wrong password" in res.err
    assert all(o["label"] != label for o in json.loads(run("list", "--json").out)["objects"])


def test_pkcs12_missing_file_is_exit_2(run, label: str) -> None:  # type: ignore[no-untyped-def]
    res = run("key", "import-pkcs12", "/nonexistent.p12", "--label", label, "--no-password")
    assert res.code == 2 and "does not exist" in res.err


@pytest.mark.token_matrix
def test_list_and_delete(run, label: str) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", label, "--type", "rsa-2048").code == 0
    res = run("list")
    assert res.code == 0 and label in res.out and "sensitive=True extractable=False" in res.out
    res = run("delete", "--label", label)
    assert res.code == 0 and "deleted 2 object(s)" in res.out
    assert run("delete", "--label", label).code == 1


class _ConfigServedOnce:
    """The config through a named pipe, written once: a second load would wait for a writer forever."""

    def __init__(self, path: Path, text: str) -> None:
        os.mkfifo(path)
        self.path = path
        self._thread = threading.Thread(target=self._serve, args=(text,), daemon=True)
        self._thread.start()

    def _serve(self, text: str) -> None:
        with open(self.path, "w") as pipe:  # returns once a reader opens it
            pipe.write(text)

    def close(self) -> None:
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer's open return if unread
        self._thread.join(10)
        os.close(reader)
        assert not self._thread.is_alive()


@pytest.mark.parametrize("command", ["keyref", "aziot-config"])
def test_a_command_loads_its_config_once(run, token_env, label: str, tmp_path: Path, command: str) -> None:  # type: ignore[no-untyped-def]
    """Both check the config before they log in (and used to load it again to log in)."""
    if command == "keyref":
        assert run("key", "generate", "--label", label, "--type", "ec-p256").code == 0
        args: tuple[str, ...] = ("keyref", "--label", label, "--out", str(tmp_path / "key.pem"))
    else:
        b64 = base64.b64encode(secrets.token_bytes(32)).decode()
        key_file = _secret_file(tmp_path, "key", b64)
        assert run("key", "import-sas", "--label", label, "--key-file", str(key_file), secrets_in=(b64,)).code == 0
        args = ("aziot-config", "--hub", "hub.example", "--device-id", "dev-1", "--sas-key", label)
    config = _ConfigServedOnce(tmp_path / "config.yaml", token_env.config_file.read_text())
    try:
        res = run(*args, env=token_env.env(SPYRUS_HSM_CONFIG=str(config.path)), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"'{command}' loaded its config a second time (and waited for the pipe to give it again)")
    finally:
        config.close()
    assert res.code == 0, res.err


@pytest.mark.token_matrix
def test_keyref_and_openssl_config_let_plain_openssl_sign(run, token_env, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    keyref, conf = tmp_path / "key.pem", tmp_path / "openssl.cnf"
    assert run("keyref", "--label", label, "--out", str(keyref)).code == 0
    assert run("openssl-config", "--out", str(conf)).code == 0
    text = keyref.read_text()
    assert text.startswith("-----BEGIN PKCS#11 PROVIDER URI-----")
    assert token_env.pin.decode() not in text + conf.read_text()
    data = tmp_path / "data.bin"
    data.write_bytes(secrets.token_bytes(300))
    sig = tmp_path / "sig.der"
    proc = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(keyref), "-out", str(sig), str(data)],
                          env=token_env.env(OPENSSL_CONF=str(conf)), capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    pub = x509.load_pem_x509_csr(run("csr", "--label", label, "--subject", "CN=x").out.encode()).public_key()
    pub.verify(sig.read_bytes(), data.read_bytes(), ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]


def test_selftest_fails_with_the_fix_when_the_pin_is_wrong(run, token_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wrong = _secret_file(tmp_path, "wrong", "wrong-" + secrets.token_hex(4))
    res = run("selftest", env=token_env.env(SPYRUS_HSM_PIN_FILE=str(wrong)), secrets_in=(wrong.read_text().strip(),))
    assert res.code == 1
    assert "FAIL login" in res.out and "refused the PIN" in res.out
