"""Commands on the token and its keys: token init / compare, key import-sas / import-pkcs12 /
generate, list, delete, and sas (a SAS token minted with a key in the token)."""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ..cloud import renewal
from ..config import Config, Which, registration_needs
from ..errors import SpyrusError
from ..hsm import Hsm, KeyAlgorithm, Need, ObjectInfo, Pkcs11Uri, Secret, init_token
from ..identity import issued as issued_id
from ..identity import sas as sas_mod
from .common import (
    EXIT_FAILED,
    Stdin,
    UsageError,
    hsm_and_config,
    load_config,
    logged_in,
    provider_loader,
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


def cmd_token_compare(args: argparse.Namespace, stdin: Stdin) -> int:
    """With two tokens: the keys and certificates (by label and type) each one lacks compared
    with the other; exit 1 when they differ (what a replacement token still needs). With
    --provision, what can be made without a person is made on the token that lacks it, and the
    rest is said, one line each (`provision_lacking`)."""
    if args.pin_file or args.token:
        raise UsageError("token compare logs in to both tokens with hsm.pin_file and hsm.second_pin_file; "
                         "--pin-file and --token do not apply")
    cfg = load_config(args, both_tokens=True)
    provision = getattr(args, "provision", False)
    if not cfg.hsm.two_tokens:
        if provision:
            raise UsageError("token compare --provision needs a second token: set hsm.second_token_label "
                             "or hsm.second_token_serial")
        raise UsageError("token compare needs a second token: set hsm.second_token_label or hsm.second_token_serial")
    configs: list[tuple[Which, Config]] = []
    for which, setting in PLACES:
        one = replace(cfg, hsm=cfg.hsm.token(which))
        if not one.hsm.pin_file:
            raise UsageError(f"token compare reads each token's PIN from its file: set {setting}")
        configs.append((which, one))
    if provision:
        with contextlib.ExitStack() as stack:
            tokens = [Side(which, one, stack.enter_context(logged_in(args, one, stdin))) for which, one in configs]
            _print_lacks(tokens)
            return provision_lacking(cfg, tokens)
    held: list[tuple[str, set[tuple[str, str]]]] = []
    for _, one in configs:
        with logged_in(args, one, stdin) as hsm:
            objects = hsm.list_objects()
            name = hsm.state.name
        held.append((name, _held(objects)))
        print(f"token {name}: {len(held[-1][1])} key(s) and certificate(s)")
    return EXIT_FAILED if _print_differences(held) else 0


PLACES: tuple[tuple[Which, str], ...] = (("first", "hsm.pin_file"), ("second", "hsm.second_pin_file"))


def _held(objects: list[ObjectInfo]) -> set[tuple[str, str]]:
    return {(o.label, o.type) for o in objects if o.type in ("private", "secret-key", "cert")}


def _print_differences(held: list[tuple[str, set[tuple[str, str]]]]) -> bool:
    differ = False
    for (name, mine), (_, other) in zip(held, held[::-1], strict=True):
        lacks = sorted(other - mine)
        if lacks:
            differ = True
            print(f"token {name} lacks: " + ", ".join(f"{label} ({kind})" for label, kind in lacks))
    if not differ:
        print("both tokens hold the same labels")
    return differ


class Side:
    """One of the two tokens, logged in, for `token compare --provision`."""

    def __init__(self, which: Which, cfg: Config, hsm: Hsm) -> None:
        self.which, self.cfg, self.hsm = which, cfg, hsm
        self.name = hsm.state.name

    def held(self) -> set[tuple[str, str]]:
        return _held(self.hsm.list_objects())


def _print_lacks(tokens: list[Side]) -> None:
    held = []
    for token in tokens:
        held.append((token.name, token.held()))
        print(f"token {token.name}: {len(held[-1][1])} key(s) and certificate(s)")
    _print_differences(held)


def provision_lacking(cfg: Config, tokens: list[Side]) -> int:
    """On each token, what the other holds and it lacks: key pairs born in a token generated
    (same label and type), the module's operational certificate (`cloud.issue_cert`) issued by
    DPS for a key generated there, the registration authenticated by the other token's
    onboarding credential; then, one line each, what stays with a person (secret keys, which
    cannot be copied; certificates a CA outside DPS issues). Exit 1 while anything still lacks."""
    base = cfg.cloud.issue_cert if cfg.cloud.id_scope and cfg.cloud.registration_id and cfg.cloud.key else None
    failed, made = False, 0
    for lacking, survivor in zip(tokens, tokens[::-1], strict=True):
        lacks = survivor.held() - lacking.held()
        for label in sorted(label for label, kind in lacks if kind == "private"):
            if base is not None and renewal.generation_of(base, label) is not None:
                continue  # the operational credential: issued below, each token its own
            try:
                algorithm = survivor.hsm.key_algorithm(label)
                lacking.hsm.require(*Need.to_generate(algorithm))
                key_id = lacking.hsm.generate_keypair(label, algorithm)
            except SpyrusError as exc:
                failed = True
                print(f"token {lacking.name}: key pair '{label}' not generated: {exc}", file=sys.stderr)
                continue
            made += 1
            print(f"token {lacking.name}: generated {algorithm.value} key pair '{label}' (id {key_id}) "
                  f"as token {survivor.name} holds")
        if base is not None and renewal.current(lacking.hsm, base) is None:
            # Authenticated by the survivor's onboarding credential; if only the lacking token
            # holds one, by its own (as serve would).
            attest = next((t for t in (survivor, lacking) if _onboards(cfg, t.hsm)), None)
            try:
                if attest is not None:
                    _issue_operational(cfg, base, lacking, attest)
                    made += 1
            except SpyrusError as exc:
                failed = True
                print(f"token {lacking.name}: operational certificate '{base}' not issued: {exc}", file=sys.stderr)
    held = {token.name: token.held() for token in tokens}
    left = False
    for lacking, survivor in zip(tokens, tokens[::-1], strict=True):
        for line in _persons_part(cfg, base, lacking, held[survivor.name] - held[lacking.name]):
            left = True
            print(f"token {lacking.name}: {line}")
    if made and not left and not failed:
        print("both tokens hold the same labels")
    return EXIT_FAILED if left or failed else 0


def _onboards(cfg: Config, keys: Hsm) -> bool:
    """Whether `keys` holds the onboarding credential the configured registration attests with."""
    c = cfg.cloud
    kind = "secret-key" if c.attestation == "symmetricKey" else "cert"
    return bool(c.key and keys.find(c.key, kind))


def _issue_operational(cfg: Config, base: str, lacking: Side, survivor: Side) -> None:
    """DPS issues `lacking` its own operational certificate for a key generated there; the
    registration is authenticated by `survivor`'s onboarding credential (DPS accepts the
    primary and the secondary key, the enrollment's certificates, whichever token holds which);
    `survivor` may be `lacking` itself."""
    from ..cloud.dps import DpsRequest, Provisioner

    c = cfg.cloud
    lacking.hsm.require(*registration_needs(symmetric=False, issue_cert=True))
    survivor.hsm.require(*registration_needs(symmetric=c.attestation == "symmetricKey", issue_cert=False))
    state_dir = renewal.token_state_dir(Path(cfg.state_dir), lacking.which == "second")
    renewal.tidy(lacking.hsm, base, tls_dir=state_dir / "tls")  # an attempt that died: no orphan kept
    ca_pem = read_input_file(c.server_ca_file, "server CA file").decode() if c.server_ca_file else None
    load_provider = provider_loader(argparse.Namespace(pin_file=None), survivor.cfg, "X.509 registration")
    provisioner = Provisioner(lacking.hsm, state_dir, load_provider, attest=survivor.hsm)
    assignment = provisioner.register(DpsRequest.onboarding(c, ca_pem, issue_cert=base), force=True,
                                      timeout=c.registration_timeout)
    leaf = issued_id.decode_chain(assignment.certificate_chain or [])[0]
    print(f"token {lacking.name}: DPS issued operational certificate '{base}' (CN {c.registration_id}, "
          f"valid until {leaf.not_valid_after_utc.isoformat()}) for a key generated there, authenticated "
          f"with {'its own' if survivor is lacking else f'token {survivor.name}' + chr(39) + 's'} "
          f"onboarding credential '{c.key}'")


def _persons_part(cfg: Config, base: str | None, lacking: Side, lacks: set[tuple[str, str]]) -> list[str]:
    """What the token still lacks that a person provisions, one line each."""
    lines = []
    c = cfg.cloud
    operational = base is not None and renewal.current(lacking.hsm, base) is not None
    held_private = {label for label, kind in lacking.held() if kind == "private"}
    derived = f"{c.key}.{c.registration_id}" if c.group and c.key and c.registration_id else None
    for label, kind in sorted(lacks):
        if cfg.cloud.issue_cert and renewal.generation_of(cfg.cloud.issue_cert, label) is not None:
            if operational:
                continue  # each token holds its own generation of the operational credential
            operational = True  # said once
            lines.append(f"lacks its operational certificate '{cfg.cloud.issue_cert}': once either token "
                         f"holds the onboarding credential '{c.key}', run 'spyrus-hsm token compare "
                         "--provision' again, or 'serve' has DPS issue it one")
        elif kind == "secret-key":
            if label == derived:
                continue  # derived from the group key when it is first needed
            lines.append(f"lacks secret key '{label}': keys cannot be copied; regenerate the primary or secondary "
                         "key (whichever this token held) in IoT Hub/DPS and import it with "
                         f"'spyrus-hsm --token {lacking.which} key import-sas --label {label} --key-file -'")
        elif kind == "cert" and label in held_private:
            lines.append(f"lacks the certificate of '{label}': a CA outside DPS issues it; make a CSR: "
                         f"'spyrus-hsm --token {lacking.which} csr --label {label} ...', then "
                         f"'spyrus-hsm --token {lacking.which} cert import --label {label} ...'")
        elif kind == "cert":
            lines.append(f"lacks certificate '{label}': import it with "
                         f"'spyrus-hsm --token {lacking.which} cert import --label {label} ...'")
        else:
            lines.append(f"lacks key pair '{label}': generate it with "
                         f"'spyrus-hsm --token {lacking.which} key generate --label {label} ...'")
    return lines
