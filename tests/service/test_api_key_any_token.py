"""The API's TLS key in the token, on every token of the matrix (tests/token_matrix.py; no HMAC
key needed, so a TPM-equipped gateway runs it too): in the issued placement the token certifies
the short-lived key a leaf's verified handshake meets; in the hsm placement pkcs11-provider signs
each handshake with the token's key."""

from __future__ import annotations

import secrets
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from service_harness import HOST, ServiceHarness, store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.identity import tls

pytestmark = [pytest.mark.token_matrix, pytest.mark.timeout(120)]


def _served(port: int, ca_file: Path) -> x509.Certificate:
    """The server certificate of a handshake that verified the chain and the address."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("placement", ["issued", "hsm"])
def test_a_leaf_verifies_the_api_whose_key_is_in_the_token(hsm: Hsm, token_env: Any, tmp_path: Path,
                                                           placement: str) -> None:
    pki = EmulatorPki(tmp_path / "pki")
    label = f"api-{placement}-{secrets.token_hex(3)}"
    service_cert = store_hsm_certificate(hsm, label, pki, server_ip=HOST, issuing=placement == "issued")
    if placement == "hsm":
        tls.load_provider(token_env.module, str(token_env.pin_file), tmp_path / "openssl")
    with ServiceHarness(hsm, tmp_path, pki, tls_key_label=label, tls_cert_file=None, tls_key_file=None) as svc:
        served = _served(svc.port, pki.ca_file)
        status, _, _ = svc.call("GET", "/healthz")
    assert status == 200
    if placement == "issued":  # a short-lived certificate the token's key signed
        assert served != service_cert
        served.verify_directly_issued_by(service_cert)
    else:
        assert served == service_cert
