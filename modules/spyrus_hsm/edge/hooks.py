"""What the IoT Edge agent's parts share: the hooks into the module around them."""

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
