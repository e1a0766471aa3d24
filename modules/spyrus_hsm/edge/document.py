"""The module twin's reported document as the agent keeps it: what it wants reported, what the
hub has acknowledged, the HSM's state, the credential inventory (read from the HSM now and then)
and the last error. Sections are built by `reported` (pure functions); this holds them.

Thread-safe: the agent thread, SDK handler threads (direct methods), the renewal thread and
other parts of the module (`record_error`) all write here, under `lock` (which the desired
configuration shares: a configuration change and its `config` section are one step). Whoever
changes something calls `wake` so that the agent thread sends the patch.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import one_line
from ..identity import x509 as x509_id
from ..threads import Lane
from . import reported as rep
from .hooks import EdgeHooks


class ReportedDocument:
    def __init__(self, hooks: EdgeHooks, *, renew_at: Callable[[], float], wake: Callable[[], None],
                 inventory_interval: float, hsm_deadline: float) -> None:
        self.hooks = hooks
        self.lock = threading.RLock()
        self.inventory_interval = inventory_interval
        self.hsm_deadline = hsm_deadline   # a direct method must answer well within the hub's 30 s
        self._reads = Lane("edge-hsm-read", 1)  # a hung read holds one thread, not one per call
        self._renew_at = renew_at          # the renewal fraction in force (the twin's or the file's)
        self._wake = wake
        self._wanted: dict[str, Any] = {"version": __version__, "hsm": rep.hsm_section(hooks.hsm.state),
                                        "lastError": None}
        self._acked: dict[str, Any] = {}
        self._inventory_due = 0.0
        self._renewals: dict[str, dict[str, Any]] = {}  # operational certificate label -> renewal state

    def get(self, key: str) -> Any:
        with self.lock:
            return copy.deepcopy(self._wanted.get(key))

    def set(self, key: str, section: Any) -> None:
        with self.lock:
            self._wanted[key] = section

    # --- what goes to the hub ----------------------------------------------------------------

    @property
    def pending(self) -> bool:
        with self.lock:
            return bool(rep.changes(self._acked, self._wanted))

    def patch(self) -> dict[str, Any]:
        """What the hub has not acknowledged yet (a copy)."""
        with self.lock:
            return copy.deepcopy(rep.changes(self._acked, self._wanted))

    def acknowledge(self, patch: dict[str, Any]) -> None:
        with self.lock:
            self._acked.update(patch)

    # --- what changes it ---------------------------------------------------------------------

    def record_error(self, source: str, message: str) -> None:
        with self.lock:
            last = self._wanted.get("lastError")
            if last and last["source"] == source and last["message"] == rep.clip(message):
                return  # the same error again (e.g. each HSM retry): keep its first time
            self._wanted["lastError"] = rep.error_entry(source, message, dt.datetime.now(dt.UTC))
        self._wake()

    def on_renewal(self, label: str, state: dict[str, Any]) -> None:
        """A renewal's state changed (renewal thread): reported under credentials.<label>.renewal."""
        with self.lock:
            moved = (self._renewals.get(label) or {}).get("label") != state.get("label")
            self._renewals[label] = dict(state)
            section = self._wanted.get("credentials")
            if section is not None:
                items = rep.with_renewal_times(section["items"], self._renewals)
                self._wanted["credentials"] = {**section, "items": items, **rep.renewal_entries(self._renewals)}
            if moved:
                self._inventory_due = 0.0  # another generation in use: the inventory changed
        self._wake()

    def hsm_changed(self) -> None:
        """The HSM's state changed (agent thread)."""
        state = self.hooks.hsm.state
        with self.lock:
            was_ready = bool(self._wanted["hsm"]["ready"])
            self._wanted["hsm"] = rep.hsm_section(state)
        if state.ready and not was_ready:
            self._inventory_due = 0.0  # read the token's objects now
        elif not state.ready and state.status != "stopped" and state.reason:
            self.record_error("hsm", f"HSM {state.status}: {state.reason}")

    # --- the credential inventory ------------------------------------------------------------

    def inventory_stale(self) -> None:
        """Read the inventory again at the next step (the reported renewAt instants moved, say)."""
        self._inventory_due = 0.0

    def inventory_due(self) -> float:
        """When the inventory is next read (monotonic time; never while the HSM is not ready)."""
        return self._inventory_due if self.hooks.hsm.state.ready else float("inf")

    def refresh_inventory_if_due(self) -> None:
        if not self.hooks.hsm.state.ready or time.monotonic() < self._inventory_due:
            return
        self._inventory_due = time.monotonic() + self.inventory_interval
        try:
            items = self.read_inventory()
        except Exception as exc:
            self.record_error("hsm", f"reading the credential inventory failed: {one_line(exc)}")
            self._inventory_due = time.monotonic() + min(60.0, self.inventory_interval)
            return
        self.set_inventory(items)

    def read_inventory(self) -> list[dict[str, Any]]:
        hsm = self.hooks.hsm
        renew_at = self._renew_at()
        return self._reads.call(lambda: rep.inventory(hsm.list_objects(), x509_id.credentials(hsm), renew_at),
                                self.hsm_deadline, "reading the credential inventory")

    def set_inventory(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self._wanted["credentials"] = rep.credentials_section(items, renewals=self._renewals)
