"""Commands that run the module or check it: serve (the container's entrypoint) and selftest."""

from __future__ import annotations

import argparse
import os

from .common import Stdin, UsageError, load_config


def cmd_serve(args: argparse.Namespace, stdin: Stdin) -> int:
    from .. import coredump

    coredump.disable()  # before the PIN is read or any key made: nothing of it may reach a core file
    from ..runtime import serve

    if args.token is not None:
        raise UsageError("serve uses every configured token; --token is for the other commands")
    cfg = load_config(args, both_tokens=True)
    if not (args.pin_file or cfg.hsm.pin_file):
        raise UsageError("serve needs hsm.pin_file (or SPYRUS_HSM_PIN_FILE): the PIN is re-read "
                         "from it when the HSM reconnects")
    if args.pin_file:
        from dataclasses import replace

        cfg = replace(cfg, hsm=replace(cfg.hsm, pin_file=args.pin_file))
    from .. import logformat, telemetry

    logformat.apply(cfg.logging.format, os.environ)

    return serve(cfg, telemetry.setup("spyrus-hsm", set_global=True, prometheus=cfg.metrics.enabled))


def cmd_selftest(args: argparse.Namespace, stdin: Stdin) -> int:
    from ..selftest import run_selftest

    return run_selftest(args.config, args.pin_file, json_out=args.json, token=args.token)
