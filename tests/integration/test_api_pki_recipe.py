"""docs/security/api-tls.md "A production recipe", step by step with the real CLI, the real
`openssl x509 -req` and the repository's deployments/pki/service-ca.ext (a throwaway CA stands for
the organisation's): the service certificate it makes is one the API accepts for the issued
placement, with the IP address from `csr --ip` among its names."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509

from emulator.pki import make_ca
from spyrus_hsm.identity.service_ca import review

EXTFILE = Path(__file__).resolve().parents[2] / "deployments" / "pki" / "service-ca.ext"


def test_the_documented_recipe_makes_a_service_certificate_the_api_accepts(cli: Any, tmp_path: Path) -> None:
    label = f"server-tls-{secrets.token_hex(3)}"
    ca = make_ca("Plant API CA")
    ca_pem, ca_key = tmp_path / "api-ca.pem", tmp_path / "api-ca.key"
    ca_pem.write_text(ca.cert_pem)
    ca_key.write_text(ca.key_pem)
    ca_key.chmod(0o600)
    ext = tmp_path / "service-ca.ext"  # the shipped file with its subjectAltName edited
    ext.write_text(EXTFILE.read_text().replace("DNS:gateway-7.plant.example, IP:10.20.30.40",
                                               "DNS:gateway-7.plant.example, IP:127.0.0.1"))

    assert cli("key", "generate", "--label", label, "--type", "ec-p256").code == 0
    made = cli("csr", "--label", label, "--subject", "CN=gateway-7 API", "--dns", "gateway-7.plant.example",
               "--ip", "127.0.0.1", "--out", str(tmp_path / "server-tls.csr"))
    assert made.code == 0, made.err
    subprocess.run(["openssl", "x509", "-req", "-in", str(tmp_path / "server-tls.csr"), "-CA", str(ca_pem),
                    "-CAkey", str(ca_key), "-CAcreateserial", "-days", "365", "-sha256", "-extfile", str(ext),
                    "-extensions", "service_ca", "-out", str(tmp_path / "server-tls.pem")],
                   check=True, capture_output=True)
    ca_key.unlink()  # the CA's key is the organisation's: no private key left among the test's files
    chain = tmp_path / "server-tls-chain.pem"
    chain.write_text((tmp_path / "server-tls.pem").read_text() + ca.cert_pem)
    imported = cli("cert", "import", str(chain), "--label", label)
    assert imported.code == 0, imported.err

    cert = x509.load_pem_x509_certificate((tmp_path / "server-tls.pem").read_bytes())
    found = review(cert, cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2)
    assert found.usable and found.warnings == (), found
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    csr = x509.load_der_x509_csr((tmp_path / "server-tls.csr").read_bytes()) \
        if (tmp_path / "server-tls.csr").read_bytes()[:1] == b"0" \
        else x509.load_pem_x509_csr((tmp_path / "server-tls.csr").read_bytes())
    assert cert.public_key() == csr.public_key()  # certified the key in the token
