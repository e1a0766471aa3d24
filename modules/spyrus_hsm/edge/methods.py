"""The module's direct methods: getStatus, listCredentials and reloadConfig.

Called on SDK handler threads, which always answer; an HSM read is bounded by the document's
deadline (a direct method must answer well within the hub's 30 s).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from azure.iot.device import MethodResponse

from .. import __version__
from ..config import ServiceConfig
from ..errors import one_line
from . import reported as rep
from . import twin
from .desired import DesiredConfig
from .document import ReportedDocument
from .environment import EdgeEnvironment
from .hooks import EdgeHooks
from .sdkcalls import SdkCalls

log = logging.getLogger(__name__)
METHODS = ("getStatus", "listCredentials", "reloadConfig")


class DirectMethods:
    def __init__(self, env: EdgeEnvironment, hooks: EdgeHooks, document: ReportedDocument,
                 desired: DesiredConfig, sdk: SdkCalls, wake: Callable[[], None]) -> None:
        self.env = env
        self.hooks = hooks
        self.document = document
        self.desired = desired
        self.sdk = sdk
        self._wake = wake  # the agent thread sends what a method changed in the reported document

    def on_request(self, client: Any, request: Any) -> None:
        """SDK handler thread. Always answers, whatever happens."""
        try:
            status, payload = self.call(request.name, request.payload)
        except Exception as exc:
            log.exception("direct method %s failed", request.name)
            status, payload = 500, {"error": rep.clip(f"{type(exc).__name__}: {exc}")}
        log.info("direct method %s: %d", request.name, status)
        response = MethodResponse.create_from_method_request(request, status, payload)
        try:
            self.sdk.call(f"answering direct method {request.name}", lambda: client.send_method_response(response))
        except Exception as exc:
            log.warning("direct method %s: the response was not sent (%s)", request.name, one_line(exc))
        self._wake()

    def call(self, name: str, payload: Any) -> tuple[int, dict[str, Any]]:
        if name == "getStatus":
            return 200, self.status()
        if name == "listCredentials":
            return self.list_credentials()
        if name == "reloadConfig":
            return self.desired.reload()
        return 404, {"error": f"unknown method '{name}'; methods: {', '.join(METHODS)}"}

    def status(self) -> dict[str, Any]:
        with self.document.lock:
            current = self.desired.current
            return copy.deepcopy({
                "version": __version__,
                "module": {"deviceId": self.env.device_id, "moduleId": self.env.module_id,
                           "hub": self.env.hub_hostname, "gateway": self.env.gateway_hostname},
                "hsm": rep.hsm_section(self.hooks.hsm.state),
                "service": {"enabled": self.hooks.apply_service is not None,
                            "settings": _live_settings(current.service)},
                "logLevel": current.log_level,
                "config": self.document.get("config"),
                "lastError": self.document.get("lastError"),
            })

    def list_credentials(self) -> tuple[int, dict[str, Any]]:
        state = self.hooks.hsm.state
        if not state.ready:
            return 503, {"error": f"the HSM is not ready: {state.reason or state.status}",
                         "hsm": rep.hsm_section(state)}
        try:
            items = self.document.read_inventory()
        except Exception as exc:
            return 503, {"error": rep.clip(one_line(exc)), "hsm": rep.hsm_section(self.hooks.hsm.state)}
        self.document.set_inventory(items)
        return 200, {"token": {"label": state.token_label, "serial": state.token_serial},
                     **rep.credentials_section(items, limit=1000)}


def _live_settings(cfg: ServiceConfig) -> dict[str, Any]:
    mapping = twin.service_mapping(cfg)
    return {key: mapping[name] for key, name in twin.LIVE.items()}
