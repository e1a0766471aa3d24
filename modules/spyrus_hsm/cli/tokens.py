"""`token compare [--provision]`: with two tokens (docs/two-tokens.md), what each token lacks
compared with the other, by label and type, and — with --provision — what can be provisioned on
the lacking one without a person (keys born in a token, the module's DPS-issued operational
certificate, authenticated by the survivor's credential); the rest is printed as what stays
with a person."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

from ..cloud import renewal
from ..config import Config, Which, registration_needs
from ..errors import SpyrusError
from ..hsm import Hsm, Need, ObjectInfo
from ..identity import issued as issued_id
from .common import (
    EXIT_FAILED,
    Stdin,
    UsageError,
    load_config,
    logged_in,
    provider_loader,
    read_input_file,
)


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
