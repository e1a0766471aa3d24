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

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def pin_refused(self) -> bool:
        """Degraded because the token refused the PIN (the pool words every refusal, wrong,
        locked or expired, with "PIN")."""
        return self.status == "degraded" and "PIN" in (self.reason or "")
