"""The `spyrus-hsm` command: provisioning and everyday use of the HSM.

Secrets (PINs, keys, passwords) come only from files or standard input, never from argv.
Exit codes: 0 success; 1 the operation was attempted and failed (wrong PIN, unknown label,
bad PKCS#12 password, HSM unavailable); 2 the command cannot run as given (usage, config,
missing module or token, unreadable or invalid input); 141 standard output was closed early
(`spyrus-hsm list | head -1`). An error's kind picks 1 or 2: `EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from . import __version__
from . import config as config_mod
from .config import Config
from .errors import Kind, SpyrusError
from .files import write_atomic
from .hsm import (
    Hsm,
    HsmConfigError,
    KeyAlgorithm,
    Pkcs11Uri,
    Secret,
    read_secret_file,
    read_secret_stream,
)
from .hsm.provision import init_token
from .identity import sas as sas_mod
from .identity import tls
from .identity.csr import build_csr

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PIPE = 128 + 13  # what a shell reports for a command killed by SIGPIPE

EXIT_CODES: dict[Kind, int] = {
    Kind.USAGE: EXIT_USAGE,
    Kind.CONFIG: EXIT_USAGE,
    Kind.INVALID: EXIT_FAILED,
    Kind.NOT_FOUND: EXIT_FAILED,
    Kind.CONFLICT: EXIT_FAILED,
    Kind.REFUSED: EXIT_FAILED,
    Kind.CREDENTIAL: EXIT_FAILED,
    Kind.UNAVAILABLE: EXIT_FAILED,
    Kind.BUSY: EXIT_FAILED,
    Kind.TIMEOUT: EXIT_FAILED,
    Kind.UPSTREAM: EXIT_FAILED,
}


class UsageError(SpyrusError, kind=Kind.USAGE):
    """The command cannot run as given (exit 2)."""


# --- plumbing -----------------------------------------------------------------------------------

class _Stdin:
    """Standard input read line by line, once, for PINs and keys (in that order)."""

    def __init__(self) -> None:
        self.used_for: list[str] = []

    def secret(self, what: str) -> Secret:
        if sys.stdin is None or sys.stdin.closed:
            raise UsageError(f"{what} is needed: give --{_flag(what)} or pipe it on standard input")
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass(f"{what}: ").encode()
            if not value:
                raise UsageError(f"{what} is empty")
            return Secret(value)
        self.used_for.append(what)
        try:
            return read_secret_stream(sys.stdin.buffer, what)
        except HsmConfigError:
            raise UsageError(
                f"{what} is needed: give --{_flag(what)} or pipe it on standard input "
                f"(line {len(self.used_for)})"
            ) from None


def _flag(what: str) -> str:
    return {"SO PIN": "so-pin-file", "user PIN": "pin-file", "PIN": "pin-file",
            "key": "key-file", "password": "password-file"}.get(what, "file")


def _secret(path: str | None, what: str, stdin: _Stdin) -> Secret:
    if path:
        return read_secret_file(path, what)
    return stdin.secret(what)


def _load_config(args: argparse.Namespace, require_token: bool = True) -> Config:
    return config_mod.load(args.config, require_token=require_token)


def _pin(args: argparse.Namespace, cfg: Config, stdin: _Stdin) -> Secret:
    return _secret(args.pin_file or cfg.hsm.pin_file, "PIN", stdin)


@contextmanager
def _hsm(args: argparse.Namespace, stdin: _Stdin, pin: Secret | None = None) -> Iterator[tuple[Hsm, Config]]:
    """The logged-in HSM; `pin` when the caller has read it already (it needs it again)."""
    cfg = _load_config(args)
    pin = pin or _pin(args, cfg, stdin)
    hsm = Hsm(cfg.hsm.pool_settings(), pin)
    hsm.start(wait=True)
    try:
        yield hsm, cfg
    finally:
        hsm.close()


def _read_input_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc.strerror}") from None


def _emit(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "out", None):
        write_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


# --- commands -------------------------------------------------------------------------------------

def cmd_token_init(args: argparse.Namespace, stdin: _Stdin) -> int:
    cfg = _load_config(args, require_token=False)
    so_pin = _secret(args.so_pin_file, "SO PIN", stdin)
    user_pin = _secret(args.pin_file or cfg.hsm.pin_file, "user PIN", stdin)
    info = init_token(cfg.hsm.module, args.label, so_pin, user_pin)
    so_pin.wipe()
    user_pin.wipe()
    print(f"initialised token '{info.label}' (serial {info.serial})")
    return 0


def cmd_key_import_sas(args: argparse.Namespace, stdin: _Stdin) -> int:
    with _hsm(args, stdin) as (hsm, _):
        raw = _secret(args.key_file, "key", stdin)
        try:
            value = Secret(base64.b64decode(raw.reveal().strip(), validate=True))
        except (binascii.Error, ValueError):
            raise UsageError(
                "the key is not valid base64; paste the primary key exactly as Azure shows it"
            ) from None
        finally:
            raw.wipe()
        if len(value) < 16:
            raise UsageError("the key decodes to fewer than 16 bytes; is it the whole primary key?")
        key_id = hsm.import_secret_key(args.label, value)
        value.wipe()
    print(f"imported key '{args.label}' (id {key_id}): sensitive, non-extractable")
    return 0


def cmd_key_import_pkcs12(args: argparse.Namespace, stdin: _Stdin) -> int:
    data = _read_input_file(args.file, "PKCS#12 file")
    with _hsm(args, stdin) as (hsm, _):
        password = None if args.no_password else _secret(args.password_file, "password", stdin)
        key_id = hsm.import_pkcs12(args.label, data, password)
        if password:
            password.wipe()
        chain = hsm.certificate_chain(args.label) if _has_certs(hsm, args.label) else []
    print(f"imported '{args.label}' (id {key_id}): private key, public key, "
          f"{len(chain)} certificate(s)")
    return 0


def _has_certs(hsm: Hsm, label: str) -> bool:
    return bool(hsm.find(label, "cert"))


def cmd_key_generate(args: argparse.Namespace, stdin: _Stdin) -> int:
    with _hsm(args, stdin) as (hsm, _):
        key_id = hsm.generate_keypair(args.label, KeyAlgorithm(args.type))
    print(f"generated {args.type} key pair '{args.label}' (id {key_id}) inside the token")
    return 0


def cmd_csr(args: argparse.Namespace, stdin: _Stdin) -> int:
    with _hsm(args, stdin) as (hsm, _):
        der = build_csr(hsm, args.label, args.subject, args.dns or None)
    from cryptography.hazmat.primitives import serialization

    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()
    _emit(args, pem)
    return 0


def cmd_cert_import(args: argparse.Namespace, stdin: _Stdin) -> int:
    data = _read_input_file(args.file, "certificate file")
    try:
        certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError:
        raise UsageError(f"{args.file} holds no PEM or DER X.509 certificate") from None
    with _hsm(args, stdin) as (hsm, _):
        key_id = hsm.import_certificates(args.label, certs)
    print(f"stored {len(certs)} certificate(s) with key '{args.label}' (id {key_id})")
    return 0


def cmd_list(args: argparse.Namespace, stdin: _Stdin) -> int:
    with _hsm(args, stdin) as (hsm, _):
        objects = hsm.list_objects()
        state = hsm.state
    if args.json:
        print(json.dumps({"token": state.token_label, "serial": state.token_serial,
                          "objects": [asdict(o) for o in objects]}, indent=2))
        return 0
    print(f"token '{state.token_label}' (serial {state.token_serial}): {len(objects)} object(s)")
    for o in objects:
        extra = ""
        if o.type in ("private", "secret-key"):
            extra = f" sensitive={o.sensitive} extractable={o.extractable}"
        if o.type == "cert":
            extra = f" {o.category or ''} subject={o.subject} expires={o.not_after}"
        print(f"  {o.type:<10} {o.label:<24} id={o.id_hex} {o.key_type or ''}{extra}")
    return 0


def cmd_delete(args: argparse.Namespace, stdin: _Stdin) -> int:
    ref = Pkcs11Uri.parse(args.uri) if args.uri else Pkcs11Uri(object=args.label, type=args.type)
    with _hsm(args, stdin) as (hsm, _):
        n = hsm.delete(ref)
    if n == 0:
        print(f"nothing matches {ref}; see 'spyrus-hsm list'", file=sys.stderr)
        return EXIT_FAILED
    print(f"deleted {n} object(s)")
    return 0


def cmd_sas(args: argparse.Namespace, stdin: _Stdin) -> int:
    if args.uri:
        uri = args.uri
    elif args.hub or args.device_id:
        if not (args.hub and args.device_id):
            raise UsageError("--hub and --device-id go together")
        uri = sas_mod.device_uri(args.hub, args.device_id, args.module_id)
    elif args.id_scope or args.registration_id:
        if not (args.id_scope and args.registration_id):
            raise UsageError("--id-scope and --registration-id go together")
        uri = sas_mod.dps_uri(args.id_scope, args.registration_id)
    else:
        raise UsageError("give --hub/--device-id, --id-scope/--registration-id or --uri")
    if args.module_id and not args.device_id:
        raise UsageError("--module-id needs --hub and --device-id")
    with _hsm(args, stdin) as (hsm, cfg):
        ttl = args.ttl if args.ttl is not None else cfg.sas.default_ttl
        token = sas_mod.SasMinter(hsm).mint(args.key, uri, ttl, args.key_name)
    if args.json:
        print(json.dumps({"token": token.token, "resourceUri": token.resource_uri,
                          "expiresOn": token.expires_on}))
    else:
        print(token.token)
    return 0


def cmd_keyref(args: argparse.Namespace, stdin: _Stdin) -> int:
    cfg = _load_config(args)
    if not cfg.hsm.token_label:
        raise UsageError("keyref needs hsm.token_label (the provider finds the token by label)")
    with _hsm(args, stdin) as (hsm, _):
        objects = hsm.find(args.label, "private")
    if len(objects) != 1:
        raise UsageError(f"{len(objects)} private keys are labelled '{args.label}'; need exactly one")
    uri = tls.key_uri(cfg.hsm.token_label, args.label, bytes.fromhex(objects[0].id_hex))
    _emit(args, tls.keyref_pem(uri))
    return 0


def cmd_openssl_config(args: argparse.Namespace, stdin: _Stdin) -> int:
    cfg = _load_config(args)
    if not cfg.hsm.pin_file:
        raise UsageError("openssl-config needs hsm.pin_file (or SPYRUS_HSM_PIN_FILE): "
                         "the provider reads the PIN from that file")
    pin_file = str(Path(cfg.hsm.pin_file).resolve())
    _emit(args, tls.openssl_config(cfg.hsm.module, pin_file))
    return 0


def _provider_loader(args: argparse.Namespace, cfg: Config, what: str) -> Callable[[], None]:
    """Loads pkcs11-provider when called (only X.509 paths need it); it reads the PIN from a file."""
    pin_file = args.pin_file or cfg.hsm.pin_file

    def load() -> None:
        if not pin_file:
            raise UsageError(f"{what} needs hsm.pin_file: pkcs11-provider reads the PIN from it")
        tls.load_provider(cfg.hsm.module, pin_file, Path(cfg.state_dir) / "openssl")

    return load


def cmd_register(args: argparse.Namespace, stdin: _Stdin) -> int:
    from .cloud.dps import DpsRequest, Provisioner

    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except ValueError:
            raise UsageError("--payload must be JSON, e.g. '{\"site\": \"plant-7\"}'") from None
    with _hsm(args, stdin) as (hsm, cfg):
        ca_file = args.server_ca or cfg.cloud.server_ca_file
        ca_pem = _read_input_file(ca_file, "server CA file").decode() if ca_file else None
        load_provider = _provider_loader(args, cfg, "X.509 registration")
        req = DpsRequest(
            id_scope=args.id_scope, registration_id=args.registration_id,
            provisioning_host=args.provisioning_host or cfg.cloud.provisioning_host,
            attestation="x509" if args.x509 else "symmetricKey", key=args.x509 or args.sas_key,
            group=args.group, payload=payload, server_ca_pem=ca_pem, issue_cert=args.issue_cert)
        assignment = Provisioner(hsm, cfg.state_dir, load_provider).register(
            req, force=args.force, timeout=args.timeout or cfg.cloud.registration_timeout)
    print(json.dumps(assignment.to_api(), indent=2))
    return 0


def cmd_aziot_config(args: argparse.Namespace, stdin: _Stdin) -> int:
    from . import aziot

    if bool(args.id_scope) == bool(args.hub):
        raise UsageError("give --id-scope and --registration-id (DPS) or --hub and --device-id (manual)")
    if args.id_scope and not args.registration_id:
        raise UsageError("--id-scope needs --registration-id")
    if args.hub and not args.device_id:
        raise UsageError("--hub needs --device-id")
    if args.x509 and not args.identity_cert:
        raise UsageError("--x509 needs --identity-cert: the file aziot reads the device certificate from")
    if args.yes and not args.out:
        raise UsageError("--yes confirms writing --out; without --out nothing is written")
    prov = aziot.Provisioning(
        source="dps" if args.id_scope else "manual", method="x509" if args.x509 else "sas",
        key_label=args.x509 or args.sas_key, id_scope=args.id_scope, registration_id=args.registration_id,
        global_endpoint=args.global_endpoint, hub=args.hub, device_id=args.device_id,
        identity_cert=args.identity_cert)
    pin = _pin(args, _load_config(args), stdin)
    with _hsm(args, stdin, pin) as (hsm, cfg):
        chain = aziot.check_objects(hsm, prov)
        token_label = hsm.state.token_label or ""
    lib_path = args.lib_path or cfg.hsm.module
    if not args.out:
        pin.wipe()
        sys.stdout.write(aziot.render(lib_path, token_label, prov))
        return 0
    try:
        _confirm_aziot_out(args)
        text = aziot.render(lib_path, token_label, prov, aziot.pin_value(pin.reveal_str()))
    finally:
        pin.wipe()
    write_atomic(args.out, text, mode=0o600)
    print(f"wrote {args.out} (mode 0600; it holds the token PIN)", file=sys.stderr)
    if chain:
        write_atomic(args.identity_cert, aziot.chain_pem(chain), mode=0o644)
        print(f"wrote {args.identity_cert}: the certificate chain of '{prov.key_label}' from the token",
              file=sys.stderr)
    if os.geteuid() != 0:
        print(f"note: {args.out} is owned by uid {os.geteuid()}; aziot expects root to own it", file=sys.stderr)
    return 0


def _confirm_aziot_out(args: argparse.Namespace) -> None:
    """The file will hold the PIN in clear: ask, or take --yes from a script."""
    if args.yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError(f"{args.out} would hold the token PIN (aziot reads it only from there): "
                         "confirm with --yes")
    answer = input(f"{args.out} will hold the token PIN in clear, mode 0600. Write it? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError(f"not written: {args.out}")


def cmd_renew(args: argparse.Namespace, stdin: _Stdin) -> int:
    """One renewal of the operational certificate LABEL (cloud.issue_cert) by hand: a new key
    pair, a DPS registration with the config's onboarding credential, the new certificate
    proven by connecting to the hub with it, then the previous generation deleted."""
    from . import times
    from .cloud import renewal
    from .cloud.dps import DpsRequest, Provisioner
    from .cloud.hub import HubClient, HubIdentity
    from .identity import issued as issued_id
    from .identity import x509 as x509_id

    with _hsm(args, stdin) as (hsm, cfg):
        c = cfg.cloud
        if not (c.id_scope and c.registration_id and c.key):
            raise UsageError("renew registers with the onboarding credential of the config's cloud section: "
                             "set cloud.id_scope, cloud.registration_id and cloud.key")
        load_provider = _provider_loader(args, cfg, "renew")
        ca_pem = _read_input_file(c.server_ca_file, "server CA file").decode() if c.server_ca_file else None
        in_use = renewal.require_current(hsm, args.label)
        due = renewal.due_at(in_use.leaf, c.renew_at)
        if not args.force and due > renewal.now():
            print(json.dumps({"renewed": False, "label": in_use.label, "renewAt": times.iso(due),
                              **issued_id.describe(in_use.leaf)}, indent=2))
            print(f"spyrus-hsm: '{in_use.label}' is not due for renewal until {times.iso(due)}; "
                  "--force renews now", file=sys.stderr)
            return 0
        state_dir = Path(cfg.state_dir)
        load_provider()  # the new certificate is proven through it: fail before any change if it cannot load

        def prove(cred: x509_id.X509Credential, assignment: Any) -> None:
            files = x509_id.write_tls_files(cred, hsm.state.token_label or "", state_dir / "tls")
            identity = HubIdentity(assignment.assigned_hub, assignment.device_id, c.module_id, x509=files,
                                   server_ca_pem=ca_pem)
            HubClient(hsm, identity).connect().shutdown()

        req = DpsRequest.onboarding(c, ca_pem, issue_cert=args.label)
        renewed = renewal.renew_once(hsm, Provisioner(hsm, state_dir, load_provider), req, args.label, prove,
                                     timeout=args.timeout or c.registration_timeout, tls_dir=state_dir / "tls")
        cred = renewed.credential
        for warning in renewed.warnings:
            print(f"spyrus-hsm: warning: renewed, but {warning}", file=sys.stderr)
    print(json.dumps({"renewed": True, "label": cred.label, "previous": in_use.label,
                      "renewAt": times.iso(renewal.due_at(cred.leaf, c.renew_at)),
                      **issued_id.describe(cred.leaf)}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace, stdin: _Stdin) -> int:
    from .runtime import serve

    cfg = _load_config(args)
    if not (args.pin_file or cfg.hsm.pin_file):
        raise UsageError("serve needs hsm.pin_file (or SPYRUS_HSM_PIN_FILE): the PIN is re-read "
                         "from it when the HSM reconnects")
    if args.pin_file:
        from dataclasses import replace

        cfg = replace(cfg, hsm=replace(cfg.hsm, pin_file=args.pin_file))
    from . import logformat, telemetry

    logformat.apply(cfg.logging.format, os.environ)

    return serve(cfg, telemetry.setup("spyrus-hsm", set_global=True, prometheus=cfg.metrics.enabled))


def cmd_selftest(args: argparse.Namespace, stdin: _Stdin) -> int:
    from .selftest import run_selftest

    return run_selftest(args.config, args.pin_file, json_out=args.json)


# --- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spyrus-hsm", description="Azure IoT identity secrets kept in a PKCS#11 HSM.")
    p.add_argument("--config", help="YAML config file (default: $SPYRUS_HSM_CONFIG)")
    p.add_argument("--pin-file", help="file holding the user PIN (default: hsm.pin_file)")
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

    key = _add("key", help="keys").add_subparsers(dest="key_command", required=True)
    k = key.add_parser("import-sas", parents=[common],
                       help="import a device primary key (base64, from --key-file or stdin)")
    k.add_argument("--label", required=True)
    k.add_argument("--key-file")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # the SDK's warnings from its own threads repeat the error printed below
        logging.getLogger("azure.iot.device").setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace, _Stdin], int] = args.func
    try:
        code = func(args, _Stdin())
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return code
    except SpyrusError as exc:
        print(f"spyrus-hsm: error: {exc}", file=sys.stderr)
        return EXIT_CODES[exc.kind]
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130


def _stdout_closed() -> int:
    """The reader of standard output went away: stop quietly, as `cat` does under a shell.

    Python ignores SIGPIPE, so the write raised instead. Standard output is pointed at
    /dev/null so that the flush at interpreter exit does not raise again (the recipe in the
    Python docs' note on SIGPIPE); the exit code is the shell's for a SIGPIPE death rather
    than 1, which means "attempted and failed".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def run() -> NoReturn:
    sys.exit(main())



