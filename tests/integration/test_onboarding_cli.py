"""The onboarding steps of docs/onboarding.md through the real `spyrus-hsm` command: a leaf's
primary key piped in from `az` (no plaintext file), and a CSR naming the gateway by DNS name and
by IP address (plant networks reach it by address)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from urllib.parse import parse_qs, quote

import pytest
from cryptography import x509
from token_matrix import HMAC_IMPORT, needs


@pytest.fixture
def run(cli, token_env):  # type: ignore[no-untyped-def]
    """`cli`, plus: no PIN, key or traceback in what the command printed."""
    def go(*args: str, secrets_in: tuple[str, ...] = (), **kw):  # type: ignore[no-untyped-def]
        res = cli(*args, **kw)
        for s in (token_env.pin.decode(), *secrets_in):
            assert s not in res.out and s not in res.err, f"secret leaked by {args}"
        assert "Traceback" not in res.err, res.err
        return res

    return go


def _signature_of(token: str, key: bytes) -> tuple[str, str]:
    fields = {k: v[0] for k, v in parse_qs(token.split(" ", 1)[1]).items()}
    expected = base64.b64encode(hmac.new(
        key, f"{quote(fields['sr'], safe='')}\n{fields['se']}".encode(), hashlib.sha256).digest()).decode()
    return fields["sig"], expected


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
@pytest.mark.parametrize("key_file", [None, "-"])
def test_a_primary_key_piped_from_az_is_imported_and_signs_the_leafs_tokens(
        run, label: str, key_file: str | None) -> None:  # type: ignore[no-untyped-def]
    """`az iot hub device-identity show ... --query authentication.symmetricKey.primaryKey -o tsv |
    spyrus-hsm key import-sas --label L [--key-file -]`: az prints the key and a newline."""
    raw = secrets.token_bytes(64)
    b64 = base64.b64encode(raw).decode()
    extra = ["--key-file", key_file] if key_file else []
    res = run("key", "import-sas", "--label", label, *extra, stdin=f"{b64}\n".encode(), secrets_in=(b64,))
    assert res.code == 0, res.err
    res = run("sas", "--key", label, "--hub", "hub.example", "--device-id", label, "--json", secrets_in=(b64,))
    assert res.code == 0, res.err
    got, expected = _signature_of(json.loads(res.out)["token"], raw)
    assert got == expected


def test_an_empty_pipe_is_a_one_line_error(run, label: str) -> None:  # type: ignore[no-untyped-def]
    res = run("key", "import-sas", "--label", label, "--key-file", "-", stdin=b"")
    assert res.code == 2, res.err
    assert len(res.err.strip().splitlines()) == 1 and "key" in res.err, res.err


@pytest.mark.token_matrix
def test_a_csr_carries_ip_addresses_beside_dns_names(run, label: str) -> None:  # type: ignore[no-untyped-def]
    assert run("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    res = run("csr", "--label", label, "--subject", "CN=edge-gw", "--dns", "edge-gw.plant.local",
              "--ip", "192.168.10.5", "--ip", "fd00::5")
    assert res.code == 0, res.err
    csr = x509.load_pem_x509_csr(res.out.encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-gw.plant.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.10.5"),
                                                       ipaddress.ip_address("fd00::5")]


@pytest.mark.parametrize("bad", ["192.168.10.300", "edge-gw", "fd00::5::1", ""])
def test_a_bad_ip_address_is_a_one_line_usage_error(run, label: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    res = run("csr", "--label", label, "--subject", "CN=edge-gw", "--ip", "10.0.0.1", "--ip", bad)
    assert res.code == 2 and res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "--ip" in lines[0] and "is not an IPv4 or IPv6 address" in lines[0], res.err
