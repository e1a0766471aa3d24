"""The IoT Edge module client: twin configuration, reported state and direct methods.

Threads, and what each may do:
- the agent thread owns the SDK client: connects (retrying with back-off), reads the twin,
  applies desired properties in `$version` order and sends reported patches;
- SDK handler threads only queue desired patches, and answer direct methods (their HSM reads
  go through the sync Hsm API, bounded by a deadline);
- the HSM pool's listener only queues (it runs on an HSM worker or supervisor thread).
Under the edge runtime the SDK has the workload API sign each SAS token; when a renewal fails
(the workload socket gone while aziot-edged restarts) the SDK never tries again, so the agent
reports it and builds a new client (a new token) once the workload API signs again, before
the old token expires.
Nothing here runs on the asyncio loop: the runtime's `apply_service` hands the new service
configuration to the loop. The module key (connection-string route) is read by the SDK from
the environment and never passes through this code.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from azure.iot.device import IoTHubModuleClient, MethodResponse
from azure.iot.device.common.auth.sastoken import SasTokenError

from .. import __version__, events
from ..config import Config, ConfigError, ServiceConfig
from ..errors import Kind, SpyrusError
from ..hsm import Hsm, HsmState
from ..identity import x509 as x509_id
from ..threads import call_with_deadline, spawn
from . import reported as rep
from . import twin
from .environment import EdgeEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")
PACKAGE_LOGGER = "spyrus_hsm"
METHODS = ("getStatus", "listCredentials", "reloadConfig")


@dataclass
class EdgeHooks:
    """What the agent needs from the module around it."""
    hsm: Hsm
    config: Config                                          # what the process was started with
    reload_config: Callable[[], Config]                     # re-reads the config file
    apply_service: Callable[[ServiceConfig], None] | None   # None: the HTTP service is off
    set_renew_at: Callable[[float], None] | None = None     # None: no operational certificate to renew


class EdgeAgent:
    def __init__(self, env: EdgeEnvironment, hooks: EdgeHooks, *, inventory_interval: float = 600.0,
                 retry_max: float = 30.0, reconnect_after: float = 30.0, hsm_deadline: float = 20.0,
                 sdk_timeout: float = 30.0, sdk_options: dict[str, Any] | None = None) -> None:
        self.env = env
        self.hooks = hooks
        self.inventory_interval = inventory_interval
        self.retry_max = retry_max
        # The SDK stops reconnecting after a refused CONNECT (e.g. while edgeHub restarts):
        # a client down this long is replaced by a new one.
        self.reconnect_after = reconnect_after
        self.sdk_timeout = sdk_timeout     # the SDK's twin GET/PATCH wait for an answer forever
        self.hsm_deadline = hsm_deadline   # a direct method must answer well within the hub's 30 s
        self.sdk_options = dict(sdk_options or {})
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.RLock()     # configuration and the reported document
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._was_connected = False
        self._down_since: float | None = None
        self._twin_stale = False
        self._service_base = hooks.config.service       # the file's service section, live keys as reloaded
        self._current = twin.TwinSettings(hooks.config.service, None)
        self._desired: dict[str, Any] = {}             # the twin's desired document
        self._applied_desired: dict[str, Any] = {}     # ... as last applied
        self._desired_version: int | None = None
        self._applied_version: int | None = None
        self._default_log_level = logging.getLogger(PACKAGE_LOGGER).level
        self._wanted: dict[str, Any] = {"version": __version__, "hsm": rep.hsm_section(hooks.hsm.state),
                                        "lastError": None}
        self._acked: dict[str, Any] = {}
        self._inventory_due = 0.0
        self._renewals: dict[str, dict[str, Any]] = {}  # operational certificate label -> renewal state
        self._renew_due: float | None = None   # a SAS renewal failed: when to try a new client
        self._renew_delay = 1.0
        hooks.hsm.add_listener(self._on_hsm_state)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        self._thread = spawn(self._run, "edge-agent")
        return self

    def stop(self, timeout: float = 3.0) -> bool:
        """Disconnect within `timeout` seconds (edgeAgent allows 10 s for the whole module);
        False if the SDK did not finish in time (its threads are daemons: exit is not held up)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.put(("stop", None))
        client, self._client = self._client, None
        closer = None
        if client is not None:
            closer = spawn(functools.partial(_shutdown_quietly, client), "edge-shutdown")
        done = True
        for t in (self._thread, closer):
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
                done = done and not t.is_alive()
        if not done:
            log.warning("the IoT Edge client did not shut down within %g s; exiting without waiting for it", timeout)
        return done

    @property
    def connected(self) -> bool:
        client = self._client
        return bool(client is not None and client.connected)

    def output_client(self) -> Any:
        """The SDK client while it is connected (for sending messages to outputs), else None."""
        client = self._client
        return client if client is not None and client.connected else None

    # --- the agent thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            if self._client is None:
                if self._connect():
                    delay = 1.0
                else:
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.retry_max)
                continue
            try:
                self._step()
            except Exception as exc:  # never let the agent die: report and carry on
                log.exception("IoT Edge agent: unexpected error")
                self._record_error("edge", f"{type(exc).__name__}: {exc}")
        client, self._client = self._client, None  # one connected while stop() was looking
        if client is not None:
            _shutdown_quietly(client)

    def _new_client(self) -> Any:
        """A module client from the environment; under IoT Edge this asks the workload API for
        the trust bundle and the first token's signature."""
        return IoTHubModuleClient.create_from_edge_environment(ensure_desired_properties=False, **self.sdk_options)

    def _connect(self, client: Any = None) -> bool:
        try:
            client = client or self._new_client()
            client.connect()
            client.on_connection_state_change = functools.partial(self._queue.put, ("connection", None))
            client.on_background_exception = self._on_background_exception
            client.on_method_request_received = functools.partial(self._on_method, client)
            client.on_twin_desired_properties_patch_received = self._on_patch
            if self._stop.is_set():
                raise ConnectionAbortedError("stopping")
            self._client = client
            self._was_connected = True
            log.info("connected to edgeHub as %s", self.env.describe())
            self._handle_hsm_state()
            if not self._refresh_twin():
                raise ConnectionError("the module twin could not be read")
            self._push()
            return True
        except Exception as exc:
            if self._client is client:
                self._client = None
            if client is not None:
                spawn(functools.partial(_shutdown_quietly, client), "edge-shutdown")
            if not self._stop.is_set():
                message = f"edgeHub connection failed ({self.env.describe()}): {_explain(exc)}"
                log.warning("%s; retrying", message)
                self._record_error("edge", message)
            return False

    def _step(self) -> None:
        due = self._inventory_due if self.hooks.hsm.state.ready else float("inf")
        pending = (bool(rep.changes(self._acked, self._wanted)) or not self.connected
                   or self._renew_due is not None)
        wait = 1.0 if pending else max(0.1, min(30.0, due - time.monotonic()))
        try:
            kind, arg = self._queue.get(timeout=wait)
        except queue.Empty:
            kind, arg = "tick", None
        if kind == "patch":
            self._handle_patch(arg)
        elif kind == "hsm":
            self._handle_hsm_state()
        elif kind == "connection":
            self._handle_connection()
        elif kind == "renewal-failed":
            self._handle_renewal_failure(arg)
        if self._renew_due is not None and time.monotonic() >= self._renew_due:
            self._retry_renewal()
            if self._client is None:
                return
        if self._twin_stale and self.connected:
            self._refresh_twin()
        if self.hooks.hsm.state.ready and time.monotonic() >= self._inventory_due:
            self._refresh_inventory()
        self._push()
        self._watch_connection()

    def _watch_connection(self) -> None:
        if self.connected:
            self._down_since = None
            return
        now = time.monotonic()
        self._down_since = self._down_since or now
        if now - self._down_since < self.reconnect_after:
            return
        self._replace_client(f"edgeHub connection down for {now - self._down_since:.0f} s and the SDK "
                             "is not reconnecting")

    def _replace_client(self, why: str) -> None:
        """Drop the client (shut down in the background); the agent thread connects anew."""
        log.warning("%s; replacing the IoT Edge client", why)
        client, self._client = self._client, None
        if client is not None:
            spawn(functools.partial(_shutdown_quietly, client), "edge-shutdown")
        self._down_since = None
        self._was_connected = False

    # --- SAS token renewal -------------------------------------------------------------------

    def _on_background_exception(self, exc: Exception) -> None:
        """SDK handler thread: only queue. A failed renewal is the one the agent acts on."""
        if isinstance(exc, SasTokenError):
            self._queue.put(("renewal-failed", exc))
        else:
            log.debug("IoT Edge client background error: %s", _explain(exc))

    def _handle_renewal_failure(self, exc: BaseException) -> None:
        self._record_error("edge", f"the SAS token for edgeHub could not be renewed ({_explain(exc)}); "
                                   "retrying with a new client while the current token lasts")
        if self._renew_due is None:
            self._renew_delay = 1.0
            self._renew_due = time.monotonic() + self._renew_delay

    def _retry_renewal(self) -> None:
        """Build a client with a fresh token; while that fails (the workload API still away),
        keep the connected one and back off; once it works, swap (old one shut down first:
        both would connect as the same client id)."""
        try:
            fresh = call_with_deadline(self._new_client, self.sdk_timeout, "making a new SAS token",
                                       "edge-sdk-call")
        except Exception as exc:
            self._renew_delay = min(self._renew_delay * 2, self.retry_max)
            self._renew_due = time.monotonic() + self._renew_delay
            log.warning("SAS token renewal still failing (%s); next try in %g s", _explain(exc), self._renew_delay)
            return
        self._renew_due = None
        old, self._client = self._client, None
        if old is not None:
            spawn(functools.partial(_shutdown_quietly, old), "edge-shutdown").join(self.sdk_timeout)
        self._was_connected = False
        if self._connect(fresh):
            log.info("SAS token renewed with a new IoT Edge client after the renewal failure")

    def _sdk(self, what: str, fn: Callable[[], T]) -> T:
        """An SDK call that waits for edgeHub's answer, bounded; a client that does not answer
        in time is replaced."""
        try:
            return call_with_deadline(fn, self.sdk_timeout, what, "edge-sdk-call")
        except TimeoutError as exc:
            self._replace_client(str(exc))
            raise

    # --- desired properties ------------------------------------------------------------------

    def _on_patch(self, patch: dict[str, Any]) -> None:
        """SDK handler thread (up to four at once, so patches may arrive out of order)."""
        self._queue.put(("patch", patch))

    def _handle_patch(self, patch: dict[str, Any]) -> None:
        version = patch.get("$version")
        known = self._desired_version
        if isinstance(version, int) and known is not None:
            if version <= known:
                return  # already seen (or superseded by a twin read)
            if version != known + 1:
                self._refresh_twin()  # a gap or reordering: take the whole document instead
                return
        self._apply_desired(twin.merge_patch(self._desired, patch), version if isinstance(version, int) else None)

    def _refresh_twin(self) -> bool:
        """Read the whole twin and apply its desired document if it is new; False (and retried
        on a later step) if it could not be read."""
        client = self._client
        try:
            document = self._sdk("reading the module twin", client.get_twin)
        except Exception as exc:
            log.warning("the module twin could not be read (%s); will retry", _explain(exc))
            self._twin_stale = True
            return False
        self._twin_stale = False
        desired = document.get("desired", {})
        version = desired.get("$version")
        if self._applied_version is None or version != self._desired_version:
            self._apply_desired(twin.settings(desired), version if isinstance(version, int) else None)
        return True

    def _apply_desired(self, doc: dict[str, Any], version: int | None) -> None:
        with self._lock:
            self._desired, self._desired_version = doc, version
            try:
                wanted = twin.evaluate(doc, self._service_base, version)
                self._apply(wanted)
            except (twin.TwinConfigError, ApplyError) as exc:
                self._reject("twin", str(exc))
                return
            self._applied_desired, self._applied_version = doc, version
            self._wanted["config"] = rep.config_section("applied", version, version, "twin")
        log.info("module twin desired properties version %s applied", version)

    def _apply(self, wanted: twin.TwinSettings) -> list[str]:
        """Apply (service first: if it fails, nothing has changed); the live keys changed."""
        changed = twin.live_changes(self._current.service, wanted.service)
        if wanted.service != self._current.service and self.hooks.apply_service is not None:
            try:
                self.hooks.apply_service(wanted.service)
            except Exception as exc:
                raise ApplyError(f"the service could not be reconfigured: {_explain(exc)}") from None
        if wanted.renew_at != self._current.renew_at:
            renew_at = wanted.renew_at or self.hooks.config.cloud.renew_at
            if self.hooks.set_renew_at is not None:
                self.hooks.set_renew_at(renew_at)
            self._inventory_due = 0.0  # the reported renewAt instants move with it
            changed.append("cloud.renewAt")
        if wanted.log_level != self._current.log_level:
            level = twin.LOG_LEVELS[wanted.log_level] if wanted.log_level else self._default_log_level
            logging.getLogger(PACKAGE_LOGGER).setLevel(level)
            changed.append("logLevel")
        self._current = wanted
        return changed

    def _reject(self, source: str, message: str) -> None:
        log.warning("configuration rejected: %s", message)
        events.config_rejected(source, message)
        self._wanted["config"] = rep.config_section("rejected", self._desired_version, self._applied_version,
                                                    source, message)
        self._record_error("config", message)

    # --- reported properties -----------------------------------------------------------------

    def on_renewal(self, label: str, state: dict[str, Any]) -> None:
        """A renewal's state changed (renewal thread): reported under credentials.<label>.renewal."""
        with self._lock:
            moved = (self._renewals.get(label) or {}).get("label") != state.get("label")
            self._renewals[label] = dict(state)
            section = self._wanted.get("credentials")
            if section is not None:
                items = rep.with_renewal_times(section["items"], self._renewals)
                self._wanted["credentials"] = {**section, "items": items, **rep.renewal_entries(self._renewals)}
            if moved:
                self._inventory_due = 0.0  # another generation in use: the inventory changed
        self._queue.put(("push", None))

    def _on_hsm_state(self, state: HsmState) -> None:
        """HSM pool thread, possibly under the pool's lock: only queue."""
        if not self._stop.is_set():
            self._queue.put(("hsm", None))

    def _handle_hsm_state(self) -> None:
        state = self.hooks.hsm.state
        with self._lock:
            was_ready = bool(self._wanted["hsm"]["ready"])
            self._wanted["hsm"] = rep.hsm_section(state)
        if state.ready and not was_ready:
            self._inventory_due = 0.0  # read the token's objects now
        elif not state.ready and state.status != "stopped" and state.reason:
            self._record_error("hsm", f"HSM {state.status}: {state.reason}")

    def _handle_connection(self) -> None:
        connected = self.connected
        if connected and not self._was_connected:
            log.info("reconnected to edgeHub")
            self._refresh_twin()  # desired patches sent while away are not replayed
        elif not connected and self._was_connected:
            log.warning("edgeHub connection lost; the SDK is reconnecting")
        self._was_connected = connected

    def _refresh_inventory(self) -> None:
        self._inventory_due = time.monotonic() + self.inventory_interval
        try:
            items = self._read_inventory()
        except Exception as exc:
            self._record_error("hsm", f"reading the credential inventory failed: {_explain(exc)}")
            self._inventory_due = time.monotonic() + min(60.0, self.inventory_interval)
            return
        with self._lock:
            self._wanted["credentials"] = rep.credentials_section(items, renewals=self._renewals)

    def _read_inventory(self) -> list[dict[str, Any]]:
        hsm = self.hooks.hsm
        renew_at = self._current.renew_at or self.hooks.config.cloud.renew_at
        return call_with_deadline(lambda: rep.inventory(hsm.list_objects(), x509_id.credentials(hsm), renew_at),
                                  self.hsm_deadline, "reading the credential inventory", "edge-hsm-read")

    def report_error(self, source: str, message: str) -> None:
        """Another part of the module failed (the API could not start, say): the twin's lastError."""
        self._record_error(source, message)

    def _record_error(self, source: str, message: str) -> None:
        with self._lock:
            last = self._wanted.get("lastError")
            if last and last["source"] == source and last["message"] == rep.clip(message):
                return  # the same error again (e.g. each HSM retry): keep its first time
            self._wanted["lastError"] = rep.error_entry(source, message, dt.datetime.now(dt.UTC))
        self._queue.put(("push", None))

    def _push(self) -> None:
        client = self._client
        if client is None or not client.connected:
            return
        with self._lock:
            patch = copy.deepcopy(rep.changes(self._acked, self._wanted))
        if not patch:
            return
        try:
            self._sdk("sending reported properties", lambda: client.patch_twin_reported_properties(patch))
        except Exception as exc:
            log.warning("reported properties not sent (%s); will retry", _explain(exc))
            return
        with self._lock:
            self._acked.update(patch)

    # --- direct methods ----------------------------------------------------------------------

    def _on_method(self, client: Any, request: Any) -> None:
        """SDK handler thread. Always answers, whatever happens."""
        try:
            status, payload = self.call_method(request.name, request.payload)
        except Exception as exc:
            log.exception("direct method %s failed", request.name)
            status, payload = 500, {"error": rep.clip(f"{type(exc).__name__}: {exc}")}
        log.info("direct method %s: %d", request.name, status)
        try:
            client.send_method_response(MethodResponse.create_from_method_request(request, status, payload))
        except Exception as exc:
            log.warning("direct method %s: the response was not sent (%s)", request.name, _explain(exc))
        self._queue.put(("push", None))

    def call_method(self, name: str, payload: Any) -> tuple[int, dict[str, Any]]:
        if name == "getStatus":
            return 200, self.status()
        if name == "listCredentials":
            return self._list_credentials()
        if name == "reloadConfig":
            return self.reload()
        return 404, {"error": f"unknown method '{name}'; methods: {', '.join(METHODS)}"}

    def status(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy({
                "version": __version__,
                "module": {"deviceId": self.env.device_id, "moduleId": self.env.module_id,
                           "hub": self.env.hub_hostname, "gateway": self.env.gateway_hostname},
                "hsm": rep.hsm_section(self.hooks.hsm.state),
                "service": {"enabled": self.hooks.apply_service is not None,
                            "settings": _live_settings(self._current.service)},
                "logLevel": self._current.log_level,
                "config": self._wanted.get("config"),
                "lastError": self._wanted.get("lastError"),
            })

    def _list_credentials(self) -> tuple[int, dict[str, Any]]:
        state = self.hooks.hsm.state
        if not state.ready:
            return 503, {"error": f"the HSM is not ready: {state.reason or state.status}",
                         "hsm": rep.hsm_section(state)}
        try:
            items = self._read_inventory()
        except Exception as exc:
            return 503, {"error": rep.clip(_explain(exc)), "hsm": rep.hsm_section(self.hooks.hsm.state)}
        with self._lock:
            self._wanted["credentials"] = rep.credentials_section(items, renewals=self._renewals)
        return 200, {"token": {"label": state.token_label, "serial": state.token_serial},
                     **rep.credentials_section(items, limit=1000)}

    def reload(self) -> tuple[int, dict[str, Any]]:
        """Re-read the config file; apply its live service settings (under the twin's), list
        what needs a restart. An invalid file changes nothing. If the twin's desired document
        was rejected, the file is applied under the last twin document that was applied (and
        the twin's stays rejected, unless the new file makes it valid)."""
        with self._lock:
            try:
                reloaded = self.hooks.reload_config()
                base = _with_fixed(reloaded.service, self.hooks.config.service)
                twin_error = None
                try:
                    wanted = twin.evaluate(self._desired, base, self._desired_version)
                except twin.TwinConfigError as exc:
                    if self._applied_desired == self._desired:
                        raise
                    twin_error = str(exc)
                    wanted = twin.evaluate(self._applied_desired, base, self._applied_version)
                changed = self._apply(wanted)
            except (ConfigError, twin.TwinConfigError, ApplyError) as exc:
                self._reject("file", str(exc))
                return 400, {"status": "rejected", "error": rep.clip(str(exc))}
            self._service_base = base
            if twin_error is None:
                self._applied_desired, self._applied_version = self._desired, self._desired_version
            self._wanted["config"] = rep.config_section("applied" if twin_error is None else "rejected",
                                                        self._desired_version, self._applied_version, "file",
                                                        twin_error)
            restart = twin.restart_required(self.hooks.config, reloaded)
        log.info("config file %s reloaded: changed %s; restart required for %s", reloaded.source,
                 ", ".join(changed) or "nothing", ", ".join(restart) or "nothing")
        body: dict[str, Any] = {"status": "applied", "source": reloaded.source, "changed": changed,
                                "restartRequired": restart}
        if twin_error is not None:
            body["twinRejected"] = rep.clip(twin_error)
        return 200, body


class ApplyError(SpyrusError, RuntimeError, kind=Kind.REFUSED):
    """A valid configuration that could not be applied; nothing was changed."""


def _with_fixed(service: ServiceConfig, running: ServiceConfig) -> ServiceConfig:
    """`service` with the settings that are fixed at start taken from the running service."""
    return replace(service, **{name: getattr(running, name) for name in twin.FIXED_FIELDS})


def _live_settings(cfg: ServiceConfig) -> dict[str, Any]:
    mapping = twin.service_mapping(cfg)
    return {key: mapping[name] for key, name in twin.LIVE.items()}


def _shutdown_quietly(client: Any) -> None:
    try:
        client.shutdown()
    except Exception as exc:
        log.debug("IoT Edge client shutdown: %s", _explain(exc))


def _explain(exc: BaseException) -> str:
    """The SDK wraps the useful part ("Connection refused: not authorised") as the cause."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text
