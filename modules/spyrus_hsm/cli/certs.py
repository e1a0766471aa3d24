"""Commands for certificates and for OpenSSL: csr, cert import, keyref (the provider's PEM
reference to a key in the token) and openssl-config."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509

from ..hsm import InvalidInput
from ..identity import tls
from ..identity.csr import build_csr, ip_address
from .common import Stdin, UsageError, emit, hsm_and_config, load_config, logged_in, read_input_file


def cmd_csr(args: argparse.Namespace, stdin: Stdin) -> int:
    for address in args.ip:  # before the PIN is asked for
        try:
            ip_address(address)
        except InvalidInput as exc:
            raise UsageError(f"--ip: {exc}") from None
    with hsm_and_config(args, stdin) as (hsm, _):
        der = build_csr(hsm, args.label, args.subject, args.dns or None, args.ip or None)
    from cryptography.hazmat.primitives import serialization

    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()
    emit(args, pem)
    return 0


def cmd_cert_import(args: argparse.Namespace, stdin: Stdin) -> int:
    data = read_input_file(args.file, "certificate file")
    try:
        certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError:
        raise UsageError(f"{args.file} holds no PEM or DER X.509 certificate") from None
    with hsm_and_config(args, stdin) as (hsm, _):
        key_id = hsm.import_certificates(args.label, certs)
    print(f"stored {len(certs)} certificate(s) with key '{args.label}' (id {key_id})")
    return 0


def cmd_keyref(args: argparse.Namespace, stdin: Stdin) -> int:
    cfg = load_config(args)
    if not cfg.hsm.token_label:
        raise UsageError("keyref needs hsm.token_label (the provider finds the token by label)")
    with logged_in(args, cfg, stdin) as hsm:
        objects = hsm.find(args.label, "private")
    if len(objects) != 1:
        raise UsageError(f"{len(objects)} private keys are labelled '{args.label}'; need exactly one")
    uri = tls.key_uri(cfg.hsm.token_label, args.label, bytes.fromhex(objects[0].id_hex) or None)
    emit(args, tls.keyref_pem(uri))
    return 0


def cmd_openssl_config(args: argparse.Namespace, stdin: Stdin) -> int:
    cfg = load_config(args)
    if not cfg.hsm.pin_file:
        raise UsageError("openssl-config needs hsm.pin_file (or SPYRUS_HSM_PIN_FILE): "
                         "the provider reads the PIN from that file")
    pin_file = str(Path(cfg.hsm.pin_file).resolve())
    emit(args, tls.openssl_config(cfg.hsm.module, pin_file))
    return 0
