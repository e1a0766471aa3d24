"""The module's live configuration from the twin's desired properties and the config file.

Desired patches are applied in `$version` order (one seen twice or superseded by a twin read is
skipped; a gap asks for the whole twin); `reloadConfig` re-reads the file. Both go one way,
`_settle`: the desired document is evaluated over the file's service section, applied (the
service first: if that fails nothing has changed) and the outcome reported in the `config`
section. An invalid document or file changes nothing and is reported as rejected.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from .. import events
from ..config import ConfigError, PolicyRule, ServiceConfig
from ..errors import Kind, SpyrusError, one_line
from . import reported as rep
from . import twin
from .document import ReportedDocument
from .hooks import EdgeHooks

log = logging.getLogger(__name__)
PACKAGE_LOGGER = "spyrus_hsm"


class ApplyError(SpyrusError, RuntimeError, kind=Kind.REFUSED):
    """A valid configuration that could not be applied; nothing was changed."""


class DesiredConfig:
    def __init__(self, hooks: EdgeHooks, document: ReportedDocument) -> None:
        self.hooks = hooks
        self.document = document
        self._lock = document.lock  # a change and its reported `config` section are one step
        self._service_base = hooks.config.service       # the file's service section, live keys as reloaded
        self.current = twin.TwinSettings(hooks.config.service, None)
        self._desired: dict[str, Any] = {}             # the twin's desired document
        self._applied_desired: dict[str, Any] = {}     # ... as last applied
        self._desired_version: int | None = None
        self._applied_version: int | None = None
        self._default_log_level = logging.getLogger(PACKAGE_LOGGER).level

    def renew_at(self) -> float:
        return self.current.renew_at or self.hooks.config.cloud.renew_at

    # --- from the twin -----------------------------------------------------------------------

    def on_patch(self, patch: dict[str, Any]) -> bool:
        """A desired patch (agent thread); True when the whole twin must be read instead (a gap
        or reordering in the versions)."""
        version = patch.get("$version")
        known = self._desired_version
        if isinstance(version, int) and known is not None:
            if version <= known:
                return False  # already seen (or superseded by a twin read)
            if version != known + 1:
                return True
        self._take(twin.merge_patch(self._desired, patch), version)
        return False

    def on_twin(self, desired: dict[str, Any]) -> None:
        """The twin's whole desired document (agent thread), applied if it is new."""
        version = desired.get("$version")
        if self._applied_version is None or version != self._desired_version:
            self._take(twin.settings(desired), version)

    def _take(self, doc: dict[str, Any], version: Any) -> None:
        with self._lock:
            self._desired, self._desired_version = doc, version if isinstance(version, int) else None
            try:
                self._settle(self._service_base, "twin", fall_back=False)
            except (twin.TwinConfigError, ApplyError) as exc:
                self._reject("twin", str(exc))
                return
        log.info("module twin desired properties version %s applied", self._desired_version)

    # --- from the file -----------------------------------------------------------------------

    def reload(self) -> tuple[int, dict[str, Any]]:
        """Re-read the config file; apply its live service settings (under the twin's), list
        what needs a restart. An invalid file changes nothing. If the twin's desired document
        was rejected, the file is applied under the last twin document that was applied (and
        the twin's stays rejected, unless the new file makes it valid)."""
        with self._lock:
            try:
                reloaded = self.hooks.reload_config()
                changed, twin_error = self._settle(_with_fixed(reloaded.service, self.hooks.config.service),
                                                   "file", fall_back=True)
            except (ConfigError, twin.TwinConfigError, ApplyError) as exc:
                self._reject("file", str(exc))
                return 400, {"status": "rejected", "error": rep.clip(str(exc))}
            restart = twin.restart_required(self.hooks.config, reloaded)
        log.info("config file %s reloaded: changed %s; restart required for %s", reloaded.source,
                 ", ".join(changed) or "nothing", ", ".join(restart) or "nothing")
        body: dict[str, Any] = {"status": "applied", "source": reloaded.source, "changed": changed,
                                "restartRequired": restart}
        if twin_error is not None:
            body["twinRejected"] = rep.clip(twin_error)
        return 200, body

    # --- the one way a configuration is applied ----------------------------------------------

    def _settle(self, base: ServiceConfig, source: str, *, fall_back: bool) -> tuple[list[str], str | None]:
        """Evaluate the desired document over `base` and apply it: the live keys changed, and the
        reason the desired document was not valid when `fall_back` let the last one applied stand
        in for it (None when it was). Raises, having changed nothing, if it cannot be applied."""
        twin_error = None
        try:
            wanted = twin.evaluate(self._desired, base, self._desired_version)
        except twin.TwinConfigError as exc:
            if not fall_back or self._applied_desired == self._desired:
                raise
            twin_error = str(exc)
            wanted = twin.evaluate(self._applied_desired, base, self._applied_version)
        changed = self._apply(wanted, base.policy)
        self._service_base = base
        if twin_error is None:
            self._applied_desired, self._applied_version = self._desired, self._desired_version
        self.document.set("config", rep.config_section("applied" if twin_error is None else "rejected",
                                                       self._desired_version, self._applied_version, source,
                                                       twin_error))
        return changed, twin_error

    def _apply(self, wanted: twin.TwinSettings, ceiling: tuple[PolicyRule, ...]) -> list[str]:
        """Apply (service first: if it fails, nothing has changed); the live keys changed.
        `ceiling`: the config file's policy, which the twin's cannot widen."""
        changed = twin.live_changes(self.current.service, wanted.service)
        if wanted.service != self.current.service and self.hooks.apply_service is not None:
            try:
                self.hooks.apply_service(wanted.service, ceiling)
            except Exception as exc:
                raise ApplyError(f"the service could not be reconfigured: {one_line(exc)}") from None
        if wanted.renew_at != self.current.renew_at:
            renew_at = wanted.renew_at or self.hooks.config.cloud.renew_at
            if self.hooks.set_renew_at is not None:
                self.hooks.set_renew_at(renew_at)
            self.document.inventory_stale()  # the reported renewAt instants move with it
            changed.append("cloud.renewAt")
        if wanted.log_level != self.current.log_level:
            level = twin.LOG_LEVELS[wanted.log_level] if wanted.log_level else self._default_log_level
            logging.getLogger(PACKAGE_LOGGER).setLevel(level)
            changed.append("logLevel")
        self.current = wanted
        return changed

    def _reject(self, source: str, message: str) -> None:
        log.warning("configuration rejected: %s", message)
        events.config_rejected(source, message)
        self.document.set("config", rep.config_section("rejected", self._desired_version, self._applied_version,
                                                       source, message))
        self.document.record_error("config", message)


def _with_fixed(service: ServiceConfig, running: ServiceConfig) -> ServiceConfig:
    """`service` with the settings that are fixed at start taken from the running service."""
    return replace(service, **{name: getattr(running, name) for name in twin.FIXED_FIELDS})
