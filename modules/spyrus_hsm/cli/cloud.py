"""Commands that talk to Azure: register (DPS, with credentials in the token) and renew (an
operational certificate issued through DPS, by hand: `cloud.renewal.renew_now`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import registration_needs
from .common import Stdin, UsageError, hsm_and_config, provider_loader, read_input_file


def cmd_register(args: argparse.Namespace, stdin: Stdin) -> int:
    from ..cloud.dps import DpsRequest, Provisioner

    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except ValueError:
            raise UsageError("--payload must be JSON, e.g. '{\"site\": \"plant-7\"}'") from None
    with hsm_and_config(args, stdin) as (hsm, cfg):
        hsm.require(*registration_needs(symmetric=bool(args.sas_key), issue_cert=bool(args.issue_cert)))
        ca_file = args.server_ca or cfg.cloud.server_ca_file
        ca_pem = read_input_file(ca_file, "server CA file").decode() if ca_file else None
        load_provider = provider_loader(args, cfg, "X.509 registration")
        req = DpsRequest(
            id_scope=args.id_scope, registration_id=args.registration_id,
            provisioning_host=args.provisioning_host or cfg.cloud.provisioning_host,
            attestation="x509" if args.x509 else "symmetricKey", key=args.x509 or args.sas_key,
            group=args.group, payload=payload, server_ca_pem=ca_pem, issue_cert=args.issue_cert)
        assignment = Provisioner(hsm, cfg.state_dir, load_provider).register(
            req, force=args.force, timeout=args.timeout or cfg.cloud.registration_timeout)
    print(json.dumps(assignment.to_api(), indent=2))
    return 0


def cmd_renew(args: argparse.Namespace, stdin: Stdin) -> int:
    """One renewal of the operational certificate LABEL (cloud.issue_cert) by hand: a new key
    pair, a DPS registration with the config's onboarding credential, the new certificate
    proven by connecting to the hub with it, then the previous generation deleted."""
    from .. import times
    from ..cloud import renewal
    from ..identity import issued as issued_id

    with hsm_and_config(args, stdin) as (hsm, cfg):
        c = cfg.cloud
        if not (c.id_scope and c.registration_id and c.key):
            raise UsageError("renew registers with the onboarding credential of the config's cloud section: "
                             "set cloud.id_scope, cloud.registration_id and cloud.key")
        hsm.require(*registration_needs(symmetric=c.attestation == "symmetricKey", issue_cert=True))
        load_provider = provider_loader(args, cfg, "renew")
        ca_pem = read_input_file(c.server_ca_file, "server CA file").decode() if c.server_ca_file else None
        # The second token's registration cache and TLS files are its own (as in serve).
        state_dir = renewal.token_state_dir(Path(cfg.state_dir), getattr(args, "token", None) == "second")
        in_use, renewed = renewal.renew_now(hsm, c, args.label, state_dir, ca_pem, load_provider,
                                            force=args.force, timeout=args.timeout)
        if renewed is None:
            due = renewal.due_at(in_use.leaf, c.renew_at)
            print(json.dumps({"renewed": False, "label": in_use.label, "renewAt": times.iso(due),
                              **issued_id.describe(in_use.leaf)}, indent=2))
            print(f"spyrus-hsm: '{in_use.label}' is not due for renewal until {times.iso(due)}; "
                  "--force renews now", file=sys.stderr)
            return 0
        for warning in renewed.warnings:
            print(f"spyrus-hsm: warning: renewed, but {warning}", file=sys.stderr)
    cred = renewed.credential
    print(json.dumps({"renewed": True, "label": cred.label, "previous": in_use.label,
                      "renewAt": times.iso(renewal.due_at(cred.leaf, c.renew_at)),
                      **issued_id.describe(cred.leaf)}, indent=2))
    return 0
