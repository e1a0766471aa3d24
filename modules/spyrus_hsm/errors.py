"""The root of every error spyrus-hsm raises, and the kinds they come in.

Each error class says what kind of failure it is (`SpyrusError.kind`); the ways out look the
kind up in one table each: the CLI's exit code (`cli.EXIT_CODES`) and the API's HTTP status
and problem type (`service.problems.HTTP`). A new error class picks a kind and needs nothing
else. This module imports nothing from the package, so every layer (hsm/ included) can use it.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class Kind(enum.Enum):
    """What went wrong, in the terms the caller acts on."""

    USAGE = "usage"              # the command line or request is malformed: change the call
    INVALID = "invalid"          # the data handed in (key, certificate, password) is unusable
    CONFIG = "config"            # configuration or installation is wrong: the operator fixes it
    NOT_FOUND = "not-found"      # no object, key or record by that name
    CONFLICT = "conflict"        # the name is taken, or names more than one thing
    REFUSED = "refused"          # the HSM refused a well-formed operation
    CREDENTIAL = "credential"    # a stored credential its peer would reject (chain, CN)
    UNAVAILABLE = "unavailable"  # not usable right now (HSM missing, not logged in, audit log)
    BUSY = "busy"                # too much work queued: back off and retry
    TIMEOUT = "timeout"          # the HSM did not answer in time: retry
    UPSTREAM = "upstream"        # DPS or IoT Hub did not do what was asked


class SpyrusError(Exception):
    """Base of every error the package raises.

    A subclass names its kind in its declaration, `class ChainError(SpyrusError,
    kind=Kind.CREDENTIAL)`, and inherits it otherwise.

    The message is for the operator: it may name what the token holds, files, readers, and
    what to do. `public` is what a remote caller (a leaf, through the API) may be told: only
    what it asked for. Without one (given where it is raised, or the class's `public_detail`),
    the API answers a fixed text for the kind and logs the message.
    """

    kind: ClassVar[Kind]
    public_detail: ClassVar[str | None] = None
    public: str | None = None

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public if public is not None else self.public_detail

    def __init_subclass__(cls, kind: Kind | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind


ONE_LINE_LIMIT = 500  # characters of an exception told in one line


def one_line(exc: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """An exception told in one line, the one way the package does it (logs, the twin's
    lastError, refused steps): ours as its message (it already says what and where); another's
    as `Type: message`, with its cause when that adds something (the SDK wraps the useful part,
    "Connection refused: not authorised", as the cause). White space folded, at most `limit`."""
    def told(e: BaseException) -> str:
        text = " ".join(str(e).split())
        if isinstance(e, SpyrusError) and text:
            return text
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    line = told(exc)
    cause = exc.__cause__
    if cause is not None and " ".join(str(cause).split()) not in line:
        line += f" ({told(cause)})"
    return line if len(line) <= limit else line[: limit - 1] + "…"
