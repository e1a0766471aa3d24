"""Upstream events: one message on a module output (`events` by default) per thing an operator
should hear about, with the application property `type` for edgeHub's routes, e.g.

    FROM /messages/modules/spyrus_hsm/outputs/events WHERE type = 'hsm.unavailable' INTO $upstream

Types: hsm.unavailable, hsm.pinRefused, hsm.recovered, hsm.degraded and hsm.tokensRestored (two
tokens: one missing, both back), config.rejected, certificate.expiring,
certificate.renewed and requests.refused (every `summary_interval` seconds, counts of denied and
rate-limited requests by principal, only when there were some).

Recording an event never blocks and never raises: it appends to a bounded buffer (the oldest
event is dropped when it is full, and the drop is counted in the next message) that a sender
thread drains whenever edgeHub is connected. Each event carries an `eventId` (also the message
id) by which a receiver can recognise a copy. A send is made once and waited for: one that gets
no answer is waited for again rather than sent again, so a late answer delivers the event once;
the sends with no answer hold at most two threads (`threads.Lane`), after which the sender
waits for one of them to return before it sends anything else. So the request path, the HSM pool's listeners and
the edge agent can all call in. Other code reports through the module-level functions
(`events.certificate_renewed(label, not_after)`), which do nothing unless the module runs under
IoT Edge with events on. Bodies carry names, counts and times only: never a token, key or PIN.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from azure.iot.device import Message

from . import times
from .config import EventsConfig
from .hsm import HsmState
from .threads import Lane, Worker
from .twinvalues import clip

log = logging.getLogger(__name__)
SEND_TIMEOUT = 10.0          # seconds for edgeHub to acknowledge one message
RETRY_DELAY = 2.0            # seconds before trying again after a failed send
MAX_ATTEMPTS = 5             # sends of one event while connected before it is given up (counted as dropped)
MAX_PRINCIPALS = 200         # per summary; the rest are counted under "(other)"
UNAUTHENTICATED = "(unauthenticated)"

ClientSource = Callable[[], Any]  # the connected SDK client, or None


class Events:
    def __init__(self, cfg: EventsConfig, device_id: str, module_id: str,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        self.cfg = cfg
        self.send_timeout = send_timeout
        self.device_id = device_id
        self.module_id = module_id
        self._lock = threading.Lock()
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._dropped = 0
        self._attempts = 0                       # failed sends of the oldest event
        self._lane = Lane("edge-events-send", width=2)
        self._inflight: dict[str, Future[Any]] = {}  # eventId -> its send, until it returns
        self._wake = threading.Event()
        self._worker = Worker("edge-events", on_close=self._wake.set)
        self._stop = self._worker.stop_event
        self._refused: dict[str, collections.Counter[str]] = {}
        self._window_start = time.time()
        self._hsm_announced: str | None = None   # the unavailable-type event of the current outage
        self._degraded = False                    # two tokens, one missing: announced (hsm.degraded)
        self._expiry_announced: set[tuple[str, str]] = set()

    # --- recording (any thread; never blocks, never raises) ------------------------------------

    def emit(self, type_: str, **fields: Any) -> None:
        self._enqueue({"type": type_, "time": _now(), "eventId": uuid.uuid4().hex, "deviceId": self.device_id,
                       "moduleId": self.module_id, **fields})

    def _enqueue(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if len(self._buffer) >= self.cfg.buffer:
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append(entry)
        self._wake.set()

    def hsm_state(self, state: HsmState) -> None:
        """An HSM pool listener (it may run under the pool's lock: only records)."""
        if state.ready:
            if self._hsm_announced is not None:
                self._hsm_announced = None
                self.emit("hsm.recovered", tokenLabel=state.token_label, tokenSerial=state.token_serial,
                          recoveries=state.recoveries)
            if state.degraded and not self._degraded:
                self.emit("hsm.degraded", reason=clip(state.degraded), tokensReady=state.tokens_ready)
            elif self._degraded and not state.degraded:
                self.emit("hsm.tokensRestored", tokensReady=state.tokens_ready)
            self._degraded = bool(state.degraded)
            return
        if state.status != "degraded":
            return
        kind = "hsm.pinRefused" if state.pin_refused else "hsm.unavailable"
        if kind != self._hsm_announced:
            self._hsm_announced = kind
            self.emit(kind, reason=clip(state.reason), tokenLabel=state.token_label)

    def request_refused(self, principal: str | None, status: int) -> None:
        """Count a refused API request (401/403 denied, 429 rate-limited) for the next summary."""
        reason = "denied" if status in (401, 403) else "rateLimited" if status == 429 else None
        if reason is None:
            return
        name = principal or UNAUTHENTICATED
        with self._lock:
            if name not in self._refused and len(self._refused) >= MAX_PRINCIPALS:
                name = "(other)"
            self._refused.setdefault(name, collections.Counter())[reason] += 1

    def certificate_expiring(self, label: str, not_after: dt.datetime) -> None:
        """Announced once per certificate (label and expiry) within `expiry_warning_days`."""
        days = (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        key = (label, not_after.isoformat())
        if days > self.cfg.expiry_warning_days or key in self._expiry_announced:
            return
        self._expiry_announced.add(key)
        self.emit("certificate.expiring", label=label, notAfter=times.iso(not_after), daysLeft=round(days, 1))

    def _summary(self) -> None:
        """Queue the counts of refused requests since the last summary, if there were any."""
        now = time.time()
        with self._lock:
            counts, self._refused = self._refused, {}
            start, self._window_start = self._window_start, now
        if not counts:
            return
        principals = {name: {"denied": c["denied"], "rateLimited": c["rateLimited"]} for name, c in counts.items()}
        self.emit("requests.refused", periodSeconds=round(now - start, 1), principals=principals,
                  denied=sum(p["denied"] for p in principals.values()),
                  rateLimited=sum(p["rateLimited"] for p in principals.values()))

    # --- sending (its own thread) --------------------------------------------------------------

    def start(self, client: ClientSource) -> Events:
        self._worker.spawn(lambda: self._run(client), "edge-events")
        return self

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop sending; False if the sender did not end within `timeout` seconds."""
        return self._worker.close(timeout)

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def _run(self, client_source: ClientSource) -> None:
        next_summary = time.monotonic() + self.cfg.summary_interval
        while not self._stop.is_set():
            wait = RETRY_DELAY
            try:
                if time.monotonic() >= next_summary:
                    next_summary = time.monotonic() + self.cfg.summary_interval
                    self._summary()
                client = client_source()
                if client is not None and self._send_pending(client):
                    wait = max(0.05, next_summary - time.monotonic())
            except Exception:  # never let the sender die: the events would pile up unsent
                log.exception("upstream events: unexpected error")
            self._wake.wait(min(wait, max(0.05, next_summary - time.monotonic())))
            self._wake.clear()

    def _send_pending(self, client: Any) -> bool:
        """Send the buffered events in order; False if one could not be sent (kept for later)."""
        while not self._stop.is_set():
            with self._lock:
                if not self._buffer:
                    return True
                entry, dropped = self._buffer[0], self._dropped
            given_up = False
            try:
                self._send(client, entry, dropped)
            except Exception as exc:
                self._attempts += 1
                if self._attempts < MAX_ATTEMPTS:
                    log.debug("event %s not sent (%s: %s); kept for later", entry["type"], type(exc).__name__, exc)
                    return False
                # An event edgeHub keeps refusing must not hold up every event behind it.
                log.warning("event %s not sent after %d attempts (%s: %s); dropped", entry["type"], MAX_ATTEMPTS,
                            type(exc).__name__, exc)
                self._inflight.pop(entry["eventId"], None)
                given_up = True
            self._attempts = 0
            with self._lock:
                if self._buffer and self._buffer[0] is entry:
                    self._buffer.popleft()
                    # given up: one more lost (unless the buffer already dropped it, and counted it)
                    self._dropped += given_up
                if not given_up:  # the count it carried has been told; given up, it has not
                    self._dropped -= dropped
        return True

    def _send(self, client: Any, entry: dict[str, Any], dropped: int) -> None:
        """One send of `entry`, or a further wait for the send of it still under way."""
        what = f"sending a {entry['type']} event"
        future = self._inflight.get(entry["eventId"])
        if future is None:
            message = _message(entry, dropped)
            future = self._lane.submit(functools.partial(client.send_message_to_output, message, self.cfg.output),
                                       self.send_timeout, what)
            self._inflight[entry["eventId"]] = future
            future.add_done_callback(lambda _: self._wake.set())
        if not wait([future], self.send_timeout).done:
            raise TimeoutError(f"{what}: no answer within {self.send_timeout:g} s (still waiting for it)")
        del self._inflight[entry["eventId"]]
        future.result()

def _message(entry: dict[str, Any], dropped: int) -> Message:
    body = dict(entry, droppedBefore=dropped) if dropped else entry
    message = Message(json.dumps(body), content_encoding="utf-8",  # type: ignore[no-untyped-call]
                      content_type="application/json", message_id=entry["eventId"])
    message.custom_properties["type"] = entry["type"]
    return message




def _now() -> str:
    return times.iso(dt.datetime.now(dt.UTC))


# --- the process's events, for code that does not hold the object ------------------------------

_current: Events | None = None


def install(events: Events | None) -> None:
    global _current
    _current = events


def request_refused(principal: str | None, status: int) -> None:
    if _current is not None:
        _current.request_refused(principal, status)


def config_rejected(source: str, message: str) -> None:
    if _current is not None:
        _current.emit("config.rejected", source=source, error=clip(message))


def certificate_expiring(label: str, not_after: dt.datetime) -> None:
    if _current is not None:
        _current.certificate_expiring(label, not_after)


def certificate_renewed(label: str, not_after: dt.datetime, previous_not_after: dt.datetime | None = None) -> None:
    """For certificate renewal: announce that `label` now holds a certificate valid until
    `not_after` (and, if given, what the one it replaced was valid until)."""
    if _current is not None:
        _current.emit("certificate.renewed", label=label, notAfter=times.iso(not_after),
                      previousNotAfter=times.iso(previous_not_after) if previous_not_after else None)
