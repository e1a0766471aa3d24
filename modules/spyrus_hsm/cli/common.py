"""What every command shares: exit codes, secrets from files or standard input, the config and
the logged-in HSM, input files and output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .. import config as config_mod
from ..config import Config
from ..errors import Kind, SpyrusError
from ..files import write_atomic
from ..hsm import Hsm, HsmConfigError, RefusedPins, Secret, read_secret_file, read_secret_stream
from ..identity import tls

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


class Stdin:
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


Command = Callable[[argparse.Namespace, Stdin], int]


def _flag(what: str) -> str:
    return {"SO PIN": "so-pin-file", "user PIN": "pin-file", "PIN": "pin-file", "new user PIN": "new-pin-file",
            "key": "key-file", "password": "password-file"}.get(what, "file")


def secret(path: str | None, what: str, stdin: Stdin) -> Secret:
    """From the file `path`, or from standard input when there is none or it is "-"."""
    if path and path != "-":
        return read_secret_file(path, what)
    return stdin.secret(what)


def load_config(args: argparse.Namespace, require_token: bool = True, both_tokens: bool = False) -> Config:
    """The config, its `hsm` section addressing the one token --token names (the first by
    default) unless `both_tokens` (serve)."""
    cfg = config_mod.load(args.config, require_token=require_token)
    which = getattr(args, "token", None)
    if not both_tokens and (which is not None or cfg.hsm.two_tokens):
        cfg = replace(cfg, hsm=cfg.hsm.token(which or "first"))
    return cfg


def pin_file(args: argparse.Namespace, cfg: Config) -> str | None:
    """The user PIN's file (--pin-file, else hsm.pin_file); None: the PIN comes on stdin."""
    path: str | None = args.pin_file or cfg.hsm.pin_file
    return path


def pin(args: argparse.Namespace, cfg: Config, stdin: Stdin) -> Secret:
    return secret(pin_file(args, cfg), "PIN", stdin)


@contextmanager
def logged_in(args: argparse.Namespace, cfg: Config, stdin: Stdin, user_pin: Secret | None = None) -> Iterator[Hsm]:
    """The HSM of `cfg`, logged in; `user_pin` when the caller has read it already (it needs it again)."""
    refused = RefusedPins.for_file(cfg.state_dir, pin_file(args, cfg))
    hsm = Hsm(cfg.hsm.pool_settings(refused), user_pin or pin(args, cfg, stdin))
    hsm.start(wait=True)
    try:
        yield hsm
    finally:
        hsm.close()


@contextmanager
def hsm_and_config(args: argparse.Namespace, stdin: Stdin) -> Iterator[tuple[Hsm, Config]]:
    """The config, loaded once, and its HSM, logged in."""
    cfg = load_config(args)
    with logged_in(args, cfg, stdin) as hsm:
        yield hsm, cfg


def read_input_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc.strerror}") from None


def emit(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "out", None):
        write_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def provider_loader(args: argparse.Namespace, cfg: Config, what: str) -> Callable[[], None]:
    """Loads pkcs11-provider when called (only X.509 paths need it); it reads the PIN from a file."""
    pin_file = args.pin_file or cfg.hsm.pin_file

    def load() -> None:
        if not pin_file:
            raise UsageError(f"{what} needs hsm.pin_file: pkcs11-provider reads the PIN from it")
        tls.load_provider(cfg.hsm.module, pin_file, Path(cfg.state_dir) / "openssl")

    return load
