"""A TLS client context authenticating with a key reference (pkcs11-provider) or a PEM key: how
the tests act as a device whose key is in the HSM."""

from __future__ import annotations

import os
import ssl


def client_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                   ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
