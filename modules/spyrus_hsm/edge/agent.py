"""The IoT Edge module client: its lifecycle, and the thread that drives the other parts.

The agent's parts, one job each: this module keeps the SDK client connected (and re-mints the
SAS token by building a new client); `desired` applies the twin's desired properties and the
config file; `document` keeps the reported document; `methods` answers direct methods.

Threads, and what each may do:
- the agent thread owns the SDK client: connects (retrying with back-off), reads the twin,
  hands desired properties to `desired` in `$version` order and sends reported patches;
- SDK handler threads only queue desired patches, and answer direct methods (their HSM reads
  go through the sync Hsm API, bounded by a deadline);
- the HSM pool's listener only queues (it runs on an HSM worker or supervisor thread).
Every blocking SDK call goes through `sdkcalls` (bounded threads, a deadline, what the SDK
raises translated to a `sdkerrors.HubError` naming the hub and the reason, logged in one line).
Under the edge runtime the SDK has the workload API sign each SAS token; when a renewal fails
(the workload socket gone while aziot-edged restarts) the SDK never tries again, so the agent
reports it and builds a new client (a new token) once the workload API signs again, before
the old token expires.
Nothing here runs on the asyncio loop: the runtime's `apply_service` hands the new service
configuration to the loop. The module key (connection-string route) is read by the SDK from
the environment and never passes through this code.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections.abc import Callable
from typing import Any, TypeVar

from azure.iot.device.common.auth.sastoken import SasTokenError

from ..backoff import Backoff
from ..errors import one_line
from ..hsm import HsmState
from ..sdkerrors import HubError, HubTimeout
from ..threads import Worker
from .desired import ApplyError, DesiredConfig
from .document import ReportedDocument
from .environment import EdgeEnvironment
from .hooks import EdgeHooks
from .methods import METHODS, DirectMethods
from .sdkcalls import SdkCalls, shutdown_quietly

__all__ = ["METHODS", "ApplyError", "EdgeAgent", "EdgeHooks"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class EdgeAgent:
    def __init__(self, env: EdgeEnvironment, hooks: EdgeHooks, *, inventory_interval: float = 600.0,
                 retry_max: float = 30.0, reconnect_after: float = 30.0, hsm_deadline: float = 20.0,
                 sdk_timeout: float = 30.0, sdk_options: dict[str, Any] | None = None) -> None:
        self.env = env
        self.hooks = hooks
        self.retry_max = retry_max
        # The SDK stops reconnecting after a refused CONNECT (e.g. while edgeHub restarts):
        # a client down this long is replaced by a new one.
        self.reconnect_after = reconnect_after
        self.sdk = SdkCalls(env, sdk_timeout, dict(sdk_options or {}))
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._worker = Worker("edge-agent", self._run)
        self._stop = self._worker.stop_event
        self._connect_backoff = Backoff(1.0, retry_max)
        self._renew_backoff = Backoff(1.0, retry_max)
        self._client: Any = None
        self._was_connected = False
        self._down_since: float | None = None
        self._twin_stale = False
        self._renew_due: float | None = None   # a SAS renewal failed: when to try a new client
        self.document = ReportedDocument(hooks, renew_at=lambda: self.desired.renew_at(), wake=self._wake,
                                         inventory_interval=inventory_interval, hsm_deadline=hsm_deadline)
        self.desired = DesiredConfig(hooks, self.document)
        self.methods = DirectMethods(env, hooks, self.document, self.desired, self.sdk, self._wake)
        hooks.hsm.add_listener(self._on_hsm_state)

    # --- what the module around it calls ----------------------------------------------------

    def start(self) -> EdgeAgent:
        self._worker.start()
        return self

    def stop(self, timeout: float = 3.0) -> bool:
        """Disconnect within `timeout` seconds (edgeAgent allows 10 s for the whole module);
        False if the SDK did not finish in time (its threads are daemons: exit is not held up)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.put(("stop", None))
        client, self._client = self._client, None
        done = client is None or self.sdk.close(client, timeout)
        done = self._worker.close(deadline - time.monotonic()) and done
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

    def on_renewal(self, label: str, state: dict[str, Any]) -> None:
        """A renewal's state changed (renewal thread): reported under credentials.<label>.renewal."""
        self.document.on_renewal(label, state)

    def report_error(self, source: str, message: str) -> None:
        """Another part of the module failed (the API could not start, say): the twin's lastError."""
        self.document.record_error(source, message)

    def call_method(self, name: str, payload: Any) -> tuple[int, dict[str, Any]]:
        return self.methods.call(name, payload)

    # --- the agent thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._client is None:
                if self._connect():
                    self._connect_backoff.reset()
                else:
                    self._stop.wait(self._connect_backoff.next())
                continue
            try:
                self._step()
            except Exception as exc:  # never let the agent die: report and carry on
                log.exception("IoT Edge agent: unexpected error")
                self.document.record_error("edge", f"{type(exc).__name__}: {exc}")
        client, self._client = self._client, None  # one connected while stop() was looking
        if client is not None:
            shutdown_quietly(client)

    def _connect(self, client: Any = None) -> bool:
        try:
            client = client or self.sdk.new_client()
            self.sdk.connect(client)
            client.on_connection_state_change = functools.partial(self._queue.put, ("connection", None))
            client.on_background_exception = self._on_background_exception
            client.on_method_request_received = functools.partial(self.methods.on_request, client)
            client.on_twin_desired_properties_patch_received = self._on_patch
            if self._stop.is_set():
                raise ConnectionAbortedError("stopping")
            self._client = client
            self._was_connected = True
            log.info("connected to edgeHub as %s", self.env.describe())
            self.document.hsm_changed()
            self._read_twin()
            self._push()
            return True
        except Exception as exc:
            if self._client is client:
                self._client = None
            if client is not None:
                self.sdk.close_later(client)
            if not self._stop.is_set():
                message = str(exc) if isinstance(exc, HubError) else \
                    f"edgeHub connection failed ({self.env.describe()}): {one_line(exc)}"
                log.warning("%s; retrying", message)
                self.document.record_error("edge", message)
            return False

    def _step(self) -> None:
        due = self.document.inventory_due()
        pending = self.document.pending or not self.connected or self._renew_due is not None
        wait = 1.0 if pending else max(0.1, min(30.0, due - time.monotonic()))
        try:
            kind, arg = self._queue.get(timeout=wait)
        except queue.Empty:
            kind, arg = "tick", None
        if kind == "patch":
            if self.desired.on_patch(arg):
                self._refresh_twin()  # a gap or reordering: take the whole document instead
        elif kind == "hsm":
            self.document.hsm_changed()
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
        self.document.refresh_inventory_if_due()
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
            self.sdk.close_later(client)
        self._down_since = None
        self._was_connected = False

    def _handle_connection(self) -> None:
        connected = self.connected
        if connected and not self._was_connected:
            log.info("reconnected to edgeHub")
            self._refresh_twin()  # desired patches sent while away are not replayed
        elif not connected and self._was_connected:
            log.warning("edgeHub connection lost; the SDK is reconnecting")
        self._was_connected = connected

    def _on_hsm_state(self, state: HsmState) -> None:
        """HSM pool thread, possibly under the pool's lock: only queue."""
        if not self._stop.is_set():
            self._queue.put(("hsm", None))

    def _wake(self) -> None:
        self._queue.put(("push", None))

    # --- the twin ----------------------------------------------------------------------------

    def _on_patch(self, patch: dict[str, Any]) -> None:
        """SDK handler thread (up to four at once, so patches may arrive out of order)."""
        self._queue.put(("patch", patch))

    def _read_twin(self) -> None:
        """Read the whole twin and hand its desired document on (HubError if it cannot be read)."""
        client = self._client
        document = self._sdk("reading the module twin", client.get_twin)
        self._twin_stale = False
        self.desired.on_twin(document.get("desired", {}))

    def _refresh_twin(self) -> None:
        """`_read_twin`; if it fails, retried on a later step."""
        try:
            self._read_twin()
        except Exception as exc:
            log.warning("the module twin could not be read (%s); will retry", one_line(exc))
            self._twin_stale = True

    def _push(self) -> None:
        client = self._client
        if client is None or not client.connected:
            return
        patch = self.document.patch()
        if not patch:
            return
        try:
            self._sdk("sending reported properties", lambda: client.patch_twin_reported_properties(patch))
        except Exception as exc:
            log.warning("reported properties not sent (%s); will retry", one_line(exc))
            return
        self.document.acknowledge(patch)

    # --- SAS token renewal -------------------------------------------------------------------

    def _on_background_exception(self, exc: Exception) -> None:
        """SDK handler thread: only queue. A failed renewal is the one the agent acts on."""
        if isinstance(exc, SasTokenError):
            self._queue.put(("renewal-failed", exc))
        else:
            log.debug("IoT Edge client background error: %s", one_line(exc))

    def _handle_renewal_failure(self, exc: BaseException) -> None:
        self.document.record_error("edge", f"the SAS token for edgeHub could not be renewed ({one_line(exc)}); "
                                           "retrying with a new client while the current token lasts")
        if self._renew_due is None:
            self._renew_backoff.reset()
            self._renew_due = time.monotonic() + self._renew_backoff.next()

    def _retry_renewal(self) -> None:
        """Build a client with a fresh token; while that fails (the workload API still away),
        keep the connected one and back off; once it works, swap (old one shut down first:
        both would connect as the same client id)."""
        try:
            fresh = self.sdk.new_client("making a new SAS token")
        except Exception as exc:
            delay = self._renew_backoff.next()
            self._renew_due = time.monotonic() + delay
            log.warning("SAS token renewal still failing (%s); next try in %g s", one_line(exc), delay)
            return
        self._renew_due = None
        old, self._client = self._client, None
        if old is not None and not self.sdk.close(old, self.sdk.timeout):
            log.warning("the previous IoT Edge client did not shut down within %g s", self.sdk.timeout)
        self._was_connected = False
        if self._connect(fresh):
            log.info("SAS token renewed with a new IoT Edge client after the renewal failure")

    # --- SDK calls ---------------------------------------------------------------------------

    def _sdk(self, what: str, fn: Callable[[], T]) -> T:
        """An agent-thread SDK call; a client that does not answer in time is replaced."""
        try:
            return self.sdk.call(what, fn)
        except HubTimeout as exc:
            self._replace_client(str(exc))
            raise
