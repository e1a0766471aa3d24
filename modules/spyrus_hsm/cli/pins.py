"""The user PIN's life after `token init`: token change-pin (C_SetPIN with the old PIN) and token
unblock-pin (C_InitPIN with the SO PIN, for a locked or lost PIN).

A PIN lives in more places than the token: the PIN file the module reads (and pkcs11-provider
with it), and `/etc/aziot/config.toml` when the edge runtime's keys are in the same token. The
commands change the token, optionally rewrite the PIN file, clear the record of refused PINs,
and then say what else still holds the old PIN.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import Config
from ..files import write_atomic
from ..hsm import RefusedPins, Secret, TokenSummary, change_user_pin, unblock_user_pin
from .common import EXIT_FAILED, Stdin, UsageError, load_config, pin, pin_file, secret


def cmd_token_change_pin(args: argparse.Namespace, stdin: Stdin) -> int:
    cfg = load_config(args)
    path = _pin_file_to_update(args, cfg)
    old = pin(args, cfg, stdin)
    new = _new_pin(args, stdin)
    refused = RefusedPins.for_file(cfg.state_dir, pin_file(args, cfg))
    try:
        info, cleared = change_user_pin(cfg.hsm.module, cfg.hsm.pool_settings().token, old, new, refused)
        print(f"changed the user PIN of token '{info.label}' (serial {info.serial})")
        return _after(args, cfg, info, new, path, cleared, refused)
    finally:
        old.wipe()
        new.wipe()


def cmd_token_unblock_pin(args: argparse.Namespace, stdin: Stdin) -> int:
    cfg = load_config(args)
    path = _pin_file_to_update(args, cfg)
    so_pin = secret(args.so_pin_file, "SO PIN", stdin)
    new = _new_pin(args, stdin)
    refused = RefusedPins.for_file(cfg.state_dir, pin_file(args, cfg))
    try:
        info, cleared = unblock_user_pin(cfg.hsm.module, cfg.hsm.pool_settings().token, so_pin, new, refused)
        print(f"set a new user PIN on token '{info.label}' (serial {info.serial}) with the SO PIN; "
              "the user PIN's tries are restored")
        return _after(args, cfg, info, new, path, cleared, refused)
    finally:
        so_pin.wipe()
        new.wipe()


def _pin_file_to_update(args: argparse.Namespace, cfg: Config) -> str | None:
    """The PIN file --update-pin-file rewrites (checked before the token is touched)."""
    if not args.update_pin_file:
        return None
    path = pin_file(args, cfg)
    if not path:
        raise UsageError("--update-pin-file needs the PIN file: give --pin-file or set hsm.pin_file")
    if args.new_pin_file and Path(args.new_pin_file).resolve() == Path(path).resolve():
        raise UsageError("--new-pin-file is the PIN file itself; write the new PIN elsewhere first")
    return path


def _new_pin(args: argparse.Namespace, stdin: Stdin) -> Secret:
    new = secret(args.new_pin_file, "new user PIN", stdin)
    if not args.new_pin_file and sys.stdin is not None and sys.stdin.isatty():
        again = stdin.secret("new user PIN (again)")
        same = again.reveal() == new.reveal()
        again.wipe()
        if not same:
            new.wipe()
            raise UsageError("the two new PINs differ; nothing changed")
    return new


def _after(args: argparse.Namespace, cfg: Config, info: TokenSummary, new: Secret, path: str | None,
           cleared: bool, refused: RefusedPins) -> int:
    """Rewrite the PIN file if asked, then list everything else that held the old PIN; 1 when
    the PIN file could not be rewritten."""
    print("what else holds the PIN:")
    current = pin_file(args, cfg)
    code = 0
    if path is not None:
        try:
            mode = _write_pin_file(path, new)
            print(f"  - the PIN file {path}: now holds the new PIN (mode {mode:04o}, written atomically)")
        except OSError as exc:
            code = EXIT_FAILED
            print(f"  - the PIN file {path} could NOT be written ({exc.strerror}) and still holds "
                  "the old PIN: write the new one there by hand now (mode 0600)")
            print(f"spyrus-hsm: error: the token has the new PIN, but the PIN file {path} could not "
                  f"be written ({exc.strerror})", file=sys.stderr)
    elif current:
        print(f"  - the PIN file {current} still holds the old PIN: write the new one there "
              "(mode 0600, or run this command with --update-pin-file)")
    else:
        print("  - the module's PIN file (hsm.pin_file) still holds the old PIN: write the new one "
              "there (mode 0600)")
    print("  - /etc/aziot/config.toml, if the edge runtime's keys are in this token "
          "('spyrus-hsm aziot-config'): its pin-value still holds the old PIN; write it again with "
          "'spyrus-hsm aziot-config ... --out /etc/aziot/config.toml' once the PIN file holds the "
          "new PIN, then 'sudo aziotctl config apply'")
    print("  - every other copy (the host file bound into the container, a secrets store): "
          "replace it, then restart the module so that it and pkcs11-provider log in with the new PIN")
    record = refused.path
    if cleared:
        print(f"  - the record of refused PINs of token {info.serial} ({record}): cleared")
    else:
        print(f"  - the record of refused PINs ({record}): nothing recorded for token {info.serial}")
    return code


def _write_pin_file(path: str, new: Secret) -> int:
    """The new PIN into `path`, keeping its owner and a mode of 0400 or 0600."""
    try:
        st = os.stat(path)
        mode, owner = (0o400 if st.st_mode & 0o777 == 0o400 else 0o600), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o600, None
    write_atomic(path, new.reveal() + b"\n", mode=mode, owner=owner)
    return mode
