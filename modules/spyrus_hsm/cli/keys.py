"""Commands on the token and its keys: token init, key import-sas / import-pkcs12 / generate,
list, delete, and sas (a SAS token minted with a key in the token). `token compare`: tokens.py."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from dataclasses import asdict

from ..hsm import Hsm, KeyAlgorithm, Need, Pkcs11Uri, Secret, init_token
from ..identity import sas as sas_mod
from .common import (
    EXIT_FAILED,
    Stdin,
    UsageError,
    hsm_and_config,
    load_config,
    read_input_file,
    secret,
)


def cmd_token_init(args: argparse.Namespace, stdin: Stdin) -> int:
    cfg = load_config(args, require_token=False)
    so_pin = secret(args.so_pin_file, "SO PIN", stdin)
    user_pin = secret(args.pin_file or cfg.hsm.pin_file, "user PIN", stdin)
    info = init_token(cfg.hsm.module, args.label, so_pin, user_pin)
    so_pin.wipe()
    user_pin.wipe()
    print(f"initialised token '{info.label}' (serial {info.serial})")
    return 0


def cmd_key_import_sas(args: argparse.Namespace, stdin: Stdin) -> int:
    with hsm_and_config(args, stdin) as (hsm, _):
        hsm.require(Need.HMAC_SHA256, Need.SECRET_IMPORT)  # before the key is read or anything stored
        raw = secret(args.key_file, "key", stdin)
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


def cmd_key_import_pkcs12(args: argparse.Namespace, stdin: Stdin) -> int:
    data = read_input_file(args.file, "PKCS#12 file")
    with hsm_and_config(args, stdin) as (hsm, _):
        password = None if args.no_password else secret(args.password_file, "password", stdin)
        key_id = hsm.import_pkcs12(args.label, data, password)
        if password:
            password.wipe()
        chain = hsm.certificate_chain(args.label) if _has_certs(hsm, args.label) else []
    print(f"imported '{args.label}' (id {key_id}): private key, public key, "
          f"{len(chain)} certificate(s)")
    return 0


def _has_certs(hsm: Hsm, label: str) -> bool:
    return bool(hsm.find(label, "cert"))


def cmd_key_generate(args: argparse.Namespace, stdin: Stdin) -> int:
    algorithm = KeyAlgorithm(args.type)
    with hsm_and_config(args, stdin) as (hsm, _):
        hsm.require(*Need.to_generate(algorithm))
        key_id = hsm.generate_keypair(args.label, algorithm)
    print(f"generated {args.type} key pair '{args.label}' (id {key_id}) inside the token")
    return 0


def cmd_list(args: argparse.Namespace, stdin: Stdin) -> int:
    with hsm_and_config(args, stdin) as (hsm, _):
        objects = hsm.list_objects()
        state = hsm.state
    if args.json:
        print(json.dumps({"token": state.token_label, "serial": state.token_serial,
                          "objects": [{**asdict(o), "id_hex": o.id_hex or None} for o in objects]}, indent=2))
        return 0
    print(f"token '{state.token_label}' (serial {state.token_serial}): {len(objects)} object(s)")
    for o in objects:
        extra = ""
        if o.type in ("private", "secret-key"):
            extra = f" sensitive={o.sensitive} extractable={o.extractable}"
        if o.type == "cert":
            extra = f" {o.category or ''} subject={o.subject} expires={o.not_after}"
        print(f"  {o.type:<10} {o.label:<24} id={o.id_hex or '-'} {o.key_type or ''}{extra}")
    return 0


def cmd_delete(args: argparse.Namespace, stdin: Stdin) -> int:
    ref = Pkcs11Uri.parse(args.uri) if args.uri else Pkcs11Uri(object=args.label, type=args.type)
    with hsm_and_config(args, stdin) as (hsm, _):
        n = hsm.delete(ref)
    if n == 0:
        print(f"nothing matches {ref}; see 'spyrus-hsm list'", file=sys.stderr)
        return EXIT_FAILED
    print(f"deleted {n} object(s)")
    return 0


def cmd_sas(args: argparse.Namespace, stdin: Stdin) -> int:
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
    with hsm_and_config(args, stdin) as (hsm, cfg):
        hsm.require(Need.HMAC_SHA256)
        ttl = args.ttl if args.ttl is not None else cfg.sas.default_ttl
        token = sas_mod.SasMinter(hsm).mint(args.key, uri, ttl, args.key_name)
    if args.json:
        print(json.dumps({"token": token.token, "resourceUri": token.resource_uri,
                          "expiresOn": token.expires_on}))
    else:
        print(token.token)
    return 0
