"""The aziot-config command: the IoT Edge runtime's config.toml sections for a credential in
the token (the checks and the files are `aziot`'s; here the options, the confirmation, the output)."""

from __future__ import annotations

import argparse
import os
import sys

from .. import aziot
from .common import Stdin, UsageError, load_config, logged_in, pin


def cmd_aziot_config(args: argparse.Namespace, stdin: Stdin) -> int:
    prov = aziot.provisioning(
        id_scope=args.id_scope, registration_id=args.registration_id, hub=args.hub, device_id=args.device_id,
        x509=args.x509, sas_key=args.sas_key, identity_cert=args.identity_cert, global_endpoint=args.global_endpoint)
    if args.yes and not args.out:
        raise UsageError("--yes confirms writing --out; without --out nothing is written")
    cfg = load_config(args)
    user_pin = pin(args, cfg, stdin)
    with logged_in(args, cfg, stdin, user_pin) as hsm:
        chain = aziot.check_objects(hsm, prov)
        token_label = hsm.state.token_label or ""
    lib_path = args.lib_path or cfg.hsm.module
    if not args.out:
        user_pin.wipe()
        sys.stdout.write(aziot.render(lib_path, token_label, prov))
        return 0
    try:
        _confirm_out(args)
        aziot.write_config(args.out, lib_path, token_label, prov, user_pin)
    finally:
        user_pin.wipe()
    print(f"wrote {args.out} (mode 0600; it holds the token PIN)", file=sys.stderr)
    if chain:
        aziot.write_identity_cert(prov, chain)
        print(f"wrote {args.identity_cert}: the certificate chain of '{prov.key_label}' from the token",
              file=sys.stderr)
    if os.geteuid() != 0:
        print(f"note: {args.out} is owned by uid {os.geteuid()}; aziot expects root to own it", file=sys.stderr)
    return 0


def _confirm_out(args: argparse.Namespace) -> None:
    """The file will hold the PIN in clear: ask, or take --yes from a script."""
    if args.yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError(f"{args.out} would hold the token PIN (aziot reads it only from there): "
                         "confirm with --yes")
    answer = input(f"{args.out} will hold the token PIN in clear, mode 0600. Write it? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError(f"not written: {args.out}")
