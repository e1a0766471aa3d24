"""The `spyrus-hsm` command: provisioning and everyday use of the HSM.

Secrets (PINs, keys, passwords) come only from files or standard input, never from argv.
Exit codes: 0 success; 1 the operation was attempted and failed (wrong PIN, unknown label,
bad PKCS#12 password, HSM unavailable); 2 the command cannot run as given (usage, config,
missing module or token, unreadable or invalid input); 141 standard output was closed early
(`spyrus-hsm list | head -1`). An error's kind picks 1 or 2: `EXIT_CODES`.

`parser` declares the commands; each lives in the module of its concern (`keys`, `certs`, `cloud`,
`aziot_config`, `service`) and builds on what they share (`common`: secrets, config and HSM,
output).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from ..errors import SpyrusError
from .common import EXIT_CODES, EXIT_FAILED, EXIT_PIPE, EXIT_USAGE, Command, Stdin, UsageError
from .parser import build_parser

__all__ = ["EXIT_CODES", "EXIT_FAILED", "EXIT_PIPE", "EXIT_USAGE", "UsageError", "build_parser", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # the SDK's warnings from its own threads repeat the error printed below
        logging.getLogger("azure.iot.device").setLevel(logging.ERROR)
    func: Command = args.func
    try:
        code = func(args, Stdin())
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
