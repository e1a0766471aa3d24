"""What the IoT Edge agent's parts share: the hooks into the module around them, and how an
exception is told in one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, PolicyRule, ServiceConfig
from ..hsm import Hsm


@dataclass
class EdgeHooks:
    """What the agent needs from the module around it."""
    hsm: Hsm
    config: Config                                          # what the process was started with
    reload_config: Callable[[], Config]                     # re-reads the config file
    # (the service settings, the config file's policy as their ceiling); None: the HTTP service is off
    apply_service: Callable[[ServiceConfig, tuple[PolicyRule, ...]], None] | None
    set_renew_at: Callable[[float], None] | None = None     # None: no operational certificate to renew


def explain(exc: BaseException) -> str:
    """`Type: message`, with the cause when it adds something (the SDK wraps the useful part,
    "Connection refused: not authorised", as the cause)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text
