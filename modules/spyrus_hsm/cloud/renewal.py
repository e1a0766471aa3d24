"""Renewal of an operational certificate issued through DPS, with a fresh HSM key each time.

The credential configured as `cloud.issue_cert: L` lives in the token in generations: `L`
(the first), then `L@2`, `L@3`, … — each a key pair and its issued chain under one label and
one CKA_ID. One renewal (`renew_once`):

  1. removes incomplete generations (a key without its certificate: an attempt that died);
  2. generates the next generation's key pair (P-384) in the HSM;
  3. registers with DPS again with the onboarding credential, sending that key's CSR; the
     chain is checked and stored beside the key (`Provisioner`);
  4. moves the connection to the new credential (`move`), which returns once the hub has
     accepted it. That is the COMMIT POINT. Before it, any error (or a deadline passed) removes
     the new generation and leaves the old credential in use; after it, nothing undoes the
     renewal:
  5. announces it (the `certificate-renewed` message, the upstream event): a failure is a
     warning in the renewal state;
  6. deletes the previous generations: a failure is a warning too, and the deletion is tried
     again later (`Renewer`) and at the start of every attempt (step 1), never a new renewal.

Invariants (tests/unit/test_renewal_faults.py drives every step through an error and a
deadline passed; tests/integration/test_renewal.py kills the process at each step): the
connection always uses a complete generation whose certificate DPS issued; besides it the token
holds at most one other generation, which the next attempt (or the next start) removes. At
start the credential is the newest complete generation (`current`); during a renewal it is the
one the connection uses (`in_use`), so a generation completed late by a call that missed its
deadline is removed, never used.

`Renewer` runs this in `serve`: when `renew_at` of the certificate's lifetime has passed (or it
has expired), and again after a failure with a jittered, capped exponential backoff that honours
DPS's retry-after. Its state (`RenewalStatus`) is what the twin reports under
`credentials.<label>.renewal`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import times
from ..backoff import Backoff
from ..config import CloudConfig
from ..hsm import Hsm, ObjectNotFound, Pkcs11Uri
from ..identity import issued as issued_id
from ..identity import x509 as x509_id
from ..keystore import KeyStore
from ..threads import Worker
from .dps import Assignment, DpsRequest, Provisioner
from .hub import HubClient, HubIdentity

log = logging.getLogger(__name__)
SEPARATOR = "@"
Move = Callable[[x509_id.X509Credential, Assignment], None]      # returns once the hub accepted it
Announce = Callable[[x509_id.X509Credential, x509_id.X509Credential], None]  # (new, previous)


# With two tokens each token holds its own generations of the same labels, renewed on its own:
# the second token's DPS registration cache and TLS files live in a directory of its own under
# the state directory (renewal deletes TLS files by label), and its renewal is reported under a
# name of its own (`credentials.<name>.renewal`, the metrics' label), valid as a twin key.
SECOND = "second-token"  # the second of two tokens: its directory, its renewal's name


def token_state_dir(state_dir: Path, second: bool) -> Path:
    """Where one token's registration cache (and its `tls` directory) lives."""
    return state_dir / SECOND if second else state_dir


def reported_name(base: str, second: bool) -> str:
    """What one token's renewal of `base` is reported under: `base` for the first token (as with
    one token), `base(second-token)` for the second."""
    return f"{base}({SECOND})" if second else base


# --- generations in the token -----------------------------------------------------------------

def label_for(base: str, number: int) -> str:
    return base if number == 1 else f"{base}{SEPARATOR}{number}"


def generation_of(base: str, label: str) -> int | None:
    """The generation number of `label` in the family of `base`, or None if it is not one."""
    if label == base:
        return 1
    suffix = label[len(base) + 1:] if label.startswith(base + SEPARATOR) else ""
    return int(suffix) if suffix.isdigit() and not suffix.startswith("0") and int(suffix) > 1 else None


@dataclass(frozen=True)
class Generation:
    label: str
    number: int
    types: frozenset[str]

    @property
    def complete(self) -> bool:
        return {"private", "cert"} <= self.types


def generations(hsm: KeyStore, base: str) -> list[Generation]:
    """The generations of `base` in the token, oldest first."""
    types: dict[str, set[str]] = {}
    for o in hsm.list_objects():
        if generation_of(base, o.label) is not None:
            types.setdefault(o.label, set()).add(o.type)
    found = [Generation(label, generation_of(base, label) or 0, frozenset(t)) for label, t in types.items()]
    return sorted(found, key=lambda g: g.number)


def current(hsm: KeyStore, base: str) -> x509_id.X509Credential | None:
    """The credential to use: the newest complete generation (None before the first issuance)."""
    for generation in reversed(generations(hsm, base)):
        if generation.complete:
            return x509_id.select(hsm, label=generation.label)
    return None


def require_current(hsm: KeyStore, base: str) -> x509_id.X509Credential:
    found = current(hsm, base)
    if found is None:
        raise ObjectNotFound(f"no certificate has been issued for '{base}' yet, so there is nothing to renew; "
                             f"run 'spyrus-hsm register … --issue-cert {base}' first")
    return found


def tidy(hsm: KeyStore, base: str, keep: str | None = None, tls_dir: Path | None = None) -> list[str]:
    """Delete the generations of `base` that cannot be used, and with `keep` (the credential
    now in use) every other one. Returns the labels deleted. Generation 1 without a certificate
    and nothing complete beside it is kept: it is the key of a first issuance (perhaps made by
    hand with `key generate`), which the next registration certifies."""
    found = generations(hsm, base)
    if keep is not None:
        doomed = [g.label for g in found if g.label != keep]
    else:
        first_only = not any(g.complete for g in found)
        doomed = [g.label for g in found if not g.complete and not (first_only and g.number == 1)]
    for label in doomed:
        discard(hsm, label, tls_dir)
    return doomed


def discard(hsm: KeyStore, label: str, tls_dir: Path | None = None) -> None:
    """Delete one generation: its key pair and certificates, and the TLS files written for it."""
    hsm.delete(Pkcs11Uri(object=label))
    if tls_dir is not None:
        for path in (tls_dir / f"{label}.chain.pem", tls_dir / f"{label}.keyref.pem"):
            path.unlink(missing_ok=True)


# --- one renewal --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Renewed:
    """A renewal past its commit point: `credential` is in use, whatever `warnings` say went
    wrong after that (the announcement, the deletion of older generations)."""
    credential: x509_id.X509Credential
    previous: x509_id.X509Credential
    warnings: tuple[str, ...] = ()
    leftovers: bool = False     # older generations could not be deleted: try again later


def renew_once(hsm: KeyStore, provisioner: Provisioner, request: DpsRequest, base: str, move: Move, *,
               timeout: float, tls_dir: Path | None = None, in_use: x509_id.X509Credential | None = None,
               announce: Announce | None = None, name: str | None = None) -> Renewed:
    """Steps 1 to 6 above. `in_use`: the generation the connection uses (default: the newest
    complete one). Before the commit point (`move` returned) an error discards the new
    generation and is raised, the old credential untouched; after it, errors are returned as
    warnings and never undo the renewal. `name`: what the log calls the renewal (default
    `base`; with two tokens the second token's is told apart)."""
    who = name or base
    in_use = in_use or require_current(hsm, base)
    for label in tidy(hsm, base, keep=in_use.label, tls_dir=tls_dir):
        log.info("renewal of '%s': removed '%s', left by an earlier attempt", who, label)
    label = label_for(base, max(g.number for g in generations(hsm, base)) + 1)
    try:
        log.info("renewal of '%s': step 1/4: generating key pair '%s' in the HSM", who, label)
        issued_id.operational_key(hsm, label)
        log.info("renewal of '%s': step 2/4: registering with DPS for a certificate for '%s'", who, label)
        assignment = provisioner.register(replace(request, issue_cert=label), force=True, timeout=timeout)
        cred = x509_id.select(hsm, label=label)
        log.info("renewal of '%s': step 3/4: moving the connection to '%s' (valid until %s)", who, label,
                 times.iso(cred.leaf.not_valid_after_utc))
        move(cred, assignment)
    except BaseException:
        with contextlib.suppress(Exception):  # the HSM may be what failed; the next attempt's tidy catches up
            discard(hsm, label, tls_dir)
        raise
    # COMMIT POINT: the hub accepted the new credential; from here on nothing undoes the renewal.
    warnings: list[str] = []
    if announce is not None:
        try:
            announce(cred, in_use)
        except Exception as exc:
            warnings.append(f"the renewal was not announced: {exc}")
    log.info("renewal of '%s': step 4/4: deleting the previous generation '%s'", who, in_use.label)
    leftovers = False
    try:
        tidy(hsm, base, keep=label, tls_dir=tls_dir)
    except Exception as exc:
        leftovers = True
        warnings.append(f"the previous generation '{in_use.label}' is not deleted yet: {exc}")
    for warning in warnings:
        log.warning("renewal of '%s' to '%s' done, but %s", who, label, warning)
    return Renewed(cred, in_use, tuple(warnings), leftovers)


def due_at(leaf: x509.Certificate, renew_at: float, received: dt.datetime | None = None) -> dt.datetime:
    """When `renew_at` of the certificate's lifetime has passed. For a certificate just received
    (`received`), no sooner than `renew_at` of the lifetime left then: issuers backdate
    notBefore for clock skew (the emulator by a minute), which for a short-lived certificate
    would make it due on arrival and renew it in a loop."""
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    due = start + (end - start) * renew_at
    return max(due, received + (end - received) * renew_at) if received is not None else due


# --- in serve ---------------------------------------------------------------------------------

@dataclass
class RenewalStatus:
    """What the twin reports under `credentials.<label>.renewal` (times: `times.iso`)."""
    state: str = "scheduled"            # scheduled | renewing | failed
    label: str | None = None            # the generation in use
    not_after: str | None = None
    renew_at: str | None = None         # when it is due (`due_at`); the inventory's renewAt is this
    last_attempt: str | None = None
    last_success: str | None = None
    next_attempt: str | None = None     # renewAt, or later after a failure (backoff)
    failures: int = 0                   # consecutive
    error: str | None = None            # why the last attempt failed (before its commit point)
    warning: str | None = None          # what went wrong after a commit point, until it is put right

    def to_twin(self) -> dict[str, Any]:
        return {"state": self.state, "label": self.label, "notAfter": self.not_after, "renewAt": self.renew_at,
                "lastAttempt": self.last_attempt, "lastSuccess": self.last_success,
                "nextAttempt": self.next_attempt, "failures": self.failures, "error": self.error,
                "warning": self.warning}


def retry_backoff(initial: float = 30.0, cap: float = 3600.0) -> Backoff:
    """After a failed renewal: exponential from `initial`, capped, jittered over its upper half
    (devices of a fleet that failed together do not retry together); never sooner than DPS asked."""
    return Backoff(initial, cap, jitter="upper-half")


class Renewer:
    """The renewal loop of one operational credential, on its own thread."""

    def __init__(self, hsm: KeyStore, provisioner: Provisioner, request: DpsRequest, move: Move, *,
                 renew_at: float, backoff: Backoff, timeout: float, tls_dir: Path,
                 report: Callable[[dict[str, Any]], None], announce: Announce | None = None,
                 name: str | None = None) -> None:
        assert request.issue_cert
        self.hsm = hsm
        self.provisioner = provisioner
        self.request = request
        self.base = request.issue_cert
        self.name = name or self.base  # what the log and the reports call it (two tokens: one each)
        self.move = move
        self.announce = announce
        self.renew_at = renew_at
        self.backoff = backoff
        self.timeout = timeout
        self.tls_dir = tls_dir
        self._report = report
        self.status = RenewalStatus()
        self._retry_at: dt.datetime | None = None
        self._cred: x509_id.X509Credential | None = None
        self._received: dt.datetime | None = None
        self._leftovers = False             # older generations a commit left behind, to delete
        self._reported: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._worker = Worker("certificate-renewal", self._run, on_close=self._wake.set)

    def start(self, in_use: x509_id.X509Credential, received: dt.datetime | None = None,
              leftovers: bool = False) -> Renewer:
        """Watch `in_use` on the renewal thread; `received`: when it was issued, if just now;
        `leftovers`: older generations are still there (a tidy that failed): the thread deletes
        them first, and keeps trying."""
        self.watch(in_use, received)
        self._leftovers = leftovers
        self._worker.start()
        return self

    def watch(self, in_use: x509_id.X509Credential, received: dt.datetime | None = None) -> Renewer:
        """Name the credential the connection uses (`start` does, or a caller of `attempt`)."""
        self._in_use(in_use, received)
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread (waited for at most `timeout`); True once it has ended."""
        return self._worker.close(timeout)

    def set_renew_at(self, renew_at: float) -> None:
        """A new fraction of the lifetime (from the twin): rescheduled at once."""
        self.renew_at = renew_at
        self._wake.set()

    def due(self) -> dt.datetime:
        with self._lock:
            assert self._cred is not None, "start() names the credential in use"
            return due_at(self._cred.leaf, self.renew_at, self._received)

    def next_attempt(self) -> dt.datetime:
        due = self.due()
        return max(due, self._retry_at) if self._retry_at else due

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._worker.stopping:
            if self._leftovers:
                self.delete_leftovers()
            self._publish(renew_at=times.iso(self.due()), next_attempt=times.iso(self.next_attempt()))
            wait = (self.next_attempt() - now()).total_seconds()
            if wait > 0:
                limit = self.backoff.initial if self._leftovers else 60.0  # re-checked (clock changes)
                self._wake.wait(min(wait, limit))
                self._wake.clear()
                continue
            self.attempt()

    def attempt(self) -> None:
        """One renewal now, its outcome in `status` (and reported)."""
        started = now()
        assert self._cred is not None
        self._publish(state="renewing", last_attempt=times.iso(started), next_attempt=None)
        try:
            renewed = renew_once(self.hsm, self.provisioner, self.request, self.base, self.move,
                                 timeout=self.timeout, tls_dir=self.tls_dir, in_use=self._cred,
                                 announce=self.announce, name=self.name)
        except Exception as exc:
            failures = self.status.failures + 1
            delay = self.backoff.delay(failures, getattr(exc, "retry_after", None))
            self._retry_at = now() + dt.timedelta(seconds=delay)
            log.warning("renewal of '%s' failed (attempt %d): %s; the current certificate stays in use; "
                        "next attempt in %.0f s", self.name, failures, exc, delay)
            self._publish(state="failed", failures=failures, error=f"{type(exc).__name__}: {exc}",
                          next_attempt=times.iso(self._retry_at))
            return
        self._retry_at = None
        self._in_use(renewed.credential, now())
        self._leftovers = renewed.leftovers
        self._publish(state="scheduled", last_success=times.iso(now()), failures=0, error=None,
                      warning="; ".join(renewed.warnings) or None, next_attempt=times.iso(self.next_attempt()))
        log.info("renewal of '%s' done in %.1f s: now '%s', valid until %s", self.name,
                 (now() - started).total_seconds(), renewed.credential.label,
                 times.iso(renewed.credential.leaf.not_valid_after_utc))

    def delete_leftovers(self) -> None:
        """Delete the generations a renewal could not delete after its commit point."""
        assert self._cred is not None
        try:
            deleted = tidy(self.hsm, self.base, keep=self._cred.label, tls_dir=self.tls_dir)
        except Exception as exc:
            log.debug("renewal of '%s': older generations still not deleted: %s", self.name, exc)
            return
        log.info("renewal of '%s': deleted %s, left by the last renewal", self.name, ", ".join(deleted) or "nothing")
        self._leftovers = False
        self._publish(warning=None)

    def _in_use(self, cred: x509_id.X509Credential, received: dt.datetime | None) -> None:
        with self._lock:
            self._cred, self._received = cred, received
            self.status.label = cred.label
            self.status.not_after = times.iso(cred.leaf.not_valid_after_utc)
            self.status.renew_at = times.iso(due_at(cred.leaf, self.renew_at, received))

    def _publish(self, **changes: Any) -> None:
        """Change the status and report it if it differs from what was last reported (a report
        that failed is sent again on the next pass of the loop, at most a minute later)."""
        with self._lock:
            for name, value in changes.items():
                setattr(self.status, name, value)
            document = self.status.to_twin()
        if document == self._reported:
            return
        try:
            self._report(document)
        except Exception as exc:
            log.debug("renewal state not reported (sent again later): %s", exc)
            return
        self._reported = document


def now() -> dt.datetime:
    return times.now()


def renew_now(hsm: Hsm, cloud: CloudConfig, base: str, state_dir: Path, server_ca_pem: str | None,
              load_provider: Callable[[], None], *, force: bool = False,
              timeout: float | None = None) -> tuple[x509_id.X509Credential, Renewed | None]:
    """One renewal by hand (`spyrus-hsm renew`, `serve` stopped) with `cloud`'s onboarding credential: the
    credential in use, and what `renew_once` did (None: not due, and not `force`d). Its move connects to
    the hub with the new certificate and closes the connection: the hub accepting it is the commit point."""
    in_use = require_current(hsm, base)
    if not force and due_at(in_use.leaf, cloud.renew_at) > now():
        return in_use, None
    load_provider()  # the new certificate is proven through it: fail before any change if it cannot load

    def prove(cred: x509_id.X509Credential, assignment: Assignment) -> None:
        files = x509_id.write_tls_files(cred, hsm.state.token_label or "", state_dir / "tls")
        HubClient(hsm, HubIdentity(assignment.assigned_hub, assignment.device_id, cloud.module_id, x509=files,
                                   server_ca_pem=server_ca_pem)).connect().shutdown()

    request = DpsRequest.onboarding(cloud, server_ca_pem, issue_cert=base)
    return in_use, renew_once(hsm, Provisioner(hsm, state_dir, load_provider), request, base, prove,
                              timeout=timeout or cloud.registration_timeout, tls_dir=state_dir / "tls")
