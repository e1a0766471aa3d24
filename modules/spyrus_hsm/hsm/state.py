"""What the pool is told (`PoolSettings`) and what it tells (`HsmState`): plain values, shared by
the pool, the client facade and everyone who watches the token's state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from .library import TokenSelector
from .refusals import RefusedPins

Status = Literal["starting", "ready", "degraded", "stopped"]


@dataclass(frozen=True)
class PoolSettings:
    module_path: str
    token: TokenSelector
    workers: int = 4
    call_timeout: float = 10.0
    queue_limit: int = 256
    retry_min: float = 0.25
    retry_max: float = 5.0
    serial: bool = False  # the token executes one operation at a time: one worker, one session
    # where a PIN the token refused is remembered across processes (None: in this process only)
    refused_pins: RefusedPins | None = None


@dataclass(frozen=True)
class HsmState:
    status: Status
    reason: str | None = None
    token_label: str | None = None
    token_serial: str | None = None
    since: float = field(default_factory=time.time)
    recoveries: int = 0
    # The token changed in a way only a new process can re-read (see `recovery`): the runtime
    # exits with recovery.EXIT_RESTART.
    restart_required: bool = False
    # The last change of token seen (e.g. "token serial changed from X to Y"), kept once ready.
    last_change: str | None = None
    # Two tokens (hsm.second_*): each one's own state, this one being their sum (see TokenPair);
    # empty with one token.
    members: tuple[HsmState, ...] = ()

    @property
    def tokens(self) -> int:
        """Tokens configured."""
        return len(self.members) or 1

    @property
    def tokens_ready(self) -> int:
        if not self.members:
            return 1 if self.ready else 0
        return sum(1 for m in self.members if m.ready)

    @property
    def degraded(self) -> str | None:
        """Ready on fewer tokens than configured: which token is missing and why (else None)."""
        if not self.ready or not self.members:
            return None
        missing = [m for m in self.members if not m.ready and m.status != "starting"]
        if not missing:
            return None
        return "; ".join(f"token {m.name} is {m.status}: {m.reason or m.status}" for m in missing)

    @property
    def name(self) -> str:
        """How messages name this token: 'label' (serial S), as far as known."""
        label = f"'{self.token_label}'" if self.token_label else "(label unknown)"
        return f"{label} (serial {self.token_serial})" if self.token_serial else label

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def pin_refused(self) -> bool:
        """Degraded because the token refused the PIN (the pool words every refusal, wrong,
        locked or expired, with "PIN")."""
        return self.status == "degraded" and "PIN" in (self.reason or "")
