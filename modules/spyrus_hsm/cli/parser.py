"""The argparse parser of the `spyrus-hsm` command: every command, its options and help."""

from __future__ import annotations

import argparse
from typing import Any

from .. import __version__
from ..hsm import KeyAlgorithm
from .aziot_config import cmd_aziot_config
from .certs import cmd_cert_import, cmd_csr, cmd_keyref, cmd_openssl_config
from .cloud import cmd_register, cmd_renew
from .keys import (
    cmd_delete,
    cmd_key_generate,
    cmd_key_import_pkcs12,
    cmd_key_import_sas,
    cmd_list,
    cmd_sas,
    cmd_token_init,
)
from .pins import cmd_token_change_pin, cmd_token_unblock_pin
from .service import cmd_selftest, cmd_serve
from .tokens import cmd_token_compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spyrus-hsm", description="Azure IoT identity secrets kept in a PKCS#11 HSM.")
    p.add_argument("--config", help="YAML config file (default: $SPYRUS_HSM_CONFIG)")
    p.add_argument("--pin-file", help="file holding the user PIN (default: hsm.pin_file)")
    p.add_argument("--token", choices=("first", "second"),
                   help="with two tokens (hsm.second_*): the one this command works on (default: first)")
    p.add_argument("--version", action="version", version=f"spyrus-hsm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more to standard error")
    # --pin-file is accepted after the subcommand too ("token init --label L --pin-file F").
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pin-file", default=argparse.SUPPRESS, help="file holding the user PIN")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    token = _add("token", help="token management").add_subparsers(dest="token_command", required=True)
    t = token.add_parser("init", help="initialise a free token (PINs from files or stdin: SO PIN, then user PIN)")
    t.add_argument("--label", required=True)
    t.add_argument("--so-pin-file")
    t.add_argument("--pin-file", default=argparse.SUPPRESS, help="file holding the new user PIN")
    t.set_defaults(func=cmd_token_init)
    t = token.add_parser("compare", parents=[common],
                         help="with two tokens: the keys and certificates each lacks compared with the other "
                              "(exit 1 when they differ)")
    t.add_argument("--provision", action="store_true",
                   help="then make on the token that lacks them what needs no person: key pairs born in the "
                        "other token (same label and type) and the operational certificate (cloud.issue_cert), "
                        "issued by DPS with the other token's onboarding credential; say the rest, one line each")
    t.set_defaults(func=cmd_token_compare)
    t = token.add_parser("change-pin", parents=[common],
                         help="change the user PIN (old PIN from --pin-file or hsm.pin_file or stdin, "
                              "then the new one from --new-pin-file or stdin)")
    t.add_argument("--new-pin-file", help="file holding the new user PIN (default: standard input)")
    t.add_argument("--update-pin-file", action="store_true",
                   help="write the new PIN into the PIN file (atomically; mode 0400 kept, else 0600)")
    t.set_defaults(func=cmd_token_change_pin)
    t = token.add_parser("unblock-pin", parents=[common],
                         help="set a new user PIN with the SO PIN, for a locked or lost one (SO PIN from "
                              "--so-pin-file or stdin, then the new PIN from --new-pin-file or stdin)")
    t.add_argument("--so-pin-file")
    t.add_argument("--new-pin-file", help="file holding the new user PIN (default: standard input)")
    t.add_argument("--update-pin-file", action="store_true",
                   help="write the new PIN into the PIN file (--pin-file or hsm.pin_file)")
    t.set_defaults(func=cmd_token_unblock_pin)

    key = _add("key", help="keys").add_subparsers(dest="key_command", required=True)
    k = key.add_parser("import-sas", parents=[common],
                       help="import a device primary key (base64, from --key-file or stdin)")
    k.add_argument("--label", required=True)
    k.add_argument("--key-file", help="file holding the base64 key; '-' or none: standard input (a pipe from az)")
    k.set_defaults(func=cmd_key_import_sas)
    k = key.add_parser("import-pkcs12", parents=[common], help="import key, certificate and chain from a PKCS#12")
    k.add_argument("file")
    k.add_argument("--label", required=True)
    k.add_argument("--password-file")
    k.add_argument("--no-password", action="store_true", help="the PKCS#12 has no password")
    k.set_defaults(func=cmd_key_import_pkcs12)
    k = key.add_parser("generate", parents=[common], help="generate a key pair inside the token")
    k.add_argument("--label", required=True)
    k.add_argument("--type", required=True, choices=[a.value for a in KeyAlgorithm])
    k.set_defaults(func=cmd_key_generate)

    c = add_parser("csr", help="make a CSR signed by an HSM key")
    c.add_argument("--label", required=True)
    c.add_argument("--subject", required=True, help='RFC 4514 subject, e.g. "CN=dev1"')
    c.add_argument("--dns", action="append", default=[], help="subjectAltName DNS name (repeatable)")
    c.add_argument("--ip", action="append", default=[], help="subjectAltName IPv4 or IPv6 address (repeatable)")
    c.add_argument("--out", help="write the PEM here instead of standard output")
    c.set_defaults(func=cmd_csr)

    cert = _add("cert", help="certificates").add_subparsers(dest="cert_command", required=True)
    c = cert.add_parser("import", parents=[common], help="store a certificate or chain beside its key")
    c.add_argument("file")
    c.add_argument("--label", required=True)
    c.set_defaults(func=cmd_cert_import)

    c = add_parser("list", help="list the token's objects")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_list)

    c = add_parser("delete", help="delete objects by label (and type) or URI")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--label")
    g.add_argument("--uri")
    c.add_argument("--type", choices=["private", "public", "cert", "secret-key", "data"])
    c.set_defaults(func=cmd_delete)

    c = add_parser("sas", help="mint a SAS token with an HSM key")
    c.add_argument("--key", required=True, help="key label or pkcs11: URI")
    c.add_argument("--hub")
    c.add_argument("--device-id")
    c.add_argument("--module-id")
    c.add_argument("--id-scope")
    c.add_argument("--registration-id")
    c.add_argument("--uri", help="any resource URI")
    c.add_argument("--ttl", type=int, help="lifetime in seconds (default sas.default_ttl)")
    c.add_argument("--key-name", help="skn= policy or key name (e.g. 'registration')")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_sas)

    c = add_parser("keyref", help="write the provider PEM key reference for an HSM key")
    c.add_argument("--label", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_keyref)

    c = add_parser("openssl-config", help="write an OpenSSL config loading pkcs11-provider")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_openssl_config)

    c = add_parser("register", help="register with DPS using HSM credentials; prints the assignment")
    c.add_argument("--id-scope", required=True)
    c.add_argument("--registration-id", required=True)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--x509", metavar="LABEL", help="X.509 credential (key + certificate) label")
    g.add_argument("--sas-key", metavar="LABEL", help="symmetric key label")
    c.add_argument("--group", action="store_true", help="--sas-key is a group enrollment key")
    c.add_argument("--provisioning-host", help="default cloud.provisioning_host")
    c.add_argument("--server-ca", help="PEM trust anchor for the DPS endpoint (default: system CAs)")
    c.add_argument("--payload", help="JSON payload for custom allocation")
    c.add_argument("--force", action="store_true", help="register again even if a result is stored")
    c.add_argument("--timeout", type=float, help="overall limit in seconds (default 120)")
    c.add_argument("--issue-cert", metavar="LABEL",
                   help="have DPS issue an operational certificate for the HSM key LABEL (an EC "
                        "P-384 key is generated there if absent) and store it beside the key")
    c.set_defaults(func=cmd_register)

    c = add_parser("aziot-config", help="print the /etc/aziot/config.toml sections that make the edge "
                                        "runtime itself use keys in this token")
    c.add_argument("--id-scope", help="DPS provisioning: the ID scope")
    c.add_argument("--registration-id", help="DPS provisioning: the registration ID")
    c.add_argument("--global-endpoint", default="https://global.azure-devices-provisioning.net/",
                   help="DPS global endpoint")
    c.add_argument("--hub", help="manual provisioning: the IoT Hub host name")
    c.add_argument("--device-id", help="manual provisioning: the device ID")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--x509", metavar="LABEL", help="X.509 credential (private key + certificate) label")
    g.add_argument("--sas-key", metavar="LABEL", help="symmetric key label (the device's own key)")
    c.add_argument("--identity-cert", metavar="PATH",
                   help="with --x509: the certificate file aziot reads (written from the token with --out)")
    c.add_argument("--lib-path", help="the PKCS#11 library as the host sees it (default hsm.module)")
    c.add_argument("--out", metavar="FILE", help="write the file with the real PIN (mode 0600), after confirmation")
    c.add_argument("--yes", action="store_true", help="confirm --out without asking (for scripts)")
    c.set_defaults(func=cmd_aziot_config)

    c = add_parser("renew", help="renew an operational certificate issued through DPS, with a new HSM key")
    c.add_argument("--label", required=True, help="its label (cloud.issue_cert)")
    c.add_argument("--force", action="store_true", help="renew even if it is not due yet")
    c.add_argument("--timeout", type=float,
                   help="DPS registration limit in seconds (default cloud.registration_timeout)")
    c.set_defaults(func=cmd_renew)

    c = add_parser("serve", help="run the module (the container's entrypoint)")
    c.set_defaults(func=cmd_serve)

    c = add_parser("selftest", help="check module, token, PIN and keys; say what to fix")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_selftest)
    return p
