"""The API's short-lived TLS credential renewing by itself (the `api-tls` thread of
service/server_tls), faults from tests/p11shim: a renewal that meets an unplugged token keeps
the current credential, says why and when it tries again; once the token is back it renews at
once, without being asked. With the thread's clocks and waits in the test's hands (`Timeline`):
a wall clock that steps past the certificate's end is noticed within one 60 s wake; a service
certificate near its own end is not asked again and again for certificates it cannot make
longer-lived; a service certificate replaced in the token is used by the next renewal. Runs in
the pytest process whose module is the shim."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from service_harness import HOST, store_hsm_certificate
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.config import service_section
from spyrus_hsm.hsm import Hsm, Pkcs11Uri
from spyrus_hsm.identity import service_ca
from spyrus_hsm.service import api_tls as server_tls_mod
from spyrus_hsm.service.api_tls import Placement, ServerTls

pytestmark = [pytest.mark.shim, pytest.mark.timeout(90)]
GUARD = 30.0  # seconds: only so that a credential that never renews fails instead of hanging


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plugged(token_env: Any, hsm: Hsm) -> Iterator[Any]:
    token_env.set_shim(state="plugged")
    yield token_env
    token_env.set_shim(state="plugged")
    wait_for(lambda: hsm.state.ready, GUARD, "the HSM ready after the test")


def test_a_renewal_that_meets_an_unplugged_token_keeps_the_credential_and_renews_once_it_is_back(
        hsm: Hsm, plugged: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    label = "api-renew-" + str(int(time.time() * 1000) % 100000)
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True)
    cfg = service_section({"tls_key_label": label, "tls_lifetime": 3600, "policy": []}, "test")
    clock = Clock()
    server_tls = ServerTls(cfg, hsm, tmp_path / "tls", clock=clock)
    try:
        assert server_tls.placement is Placement.ISSUED
        first, not_after = server_tls.current, server_tls.not_after
        assert not_after is not None
        clock.now += 1801  # past half of the hour: due
        plugged.set_shim(state="unplugged")
        assert server_tls.renew_now()  # what the thread does when due; the token is away (the pool notices)
        assert server_tls.current is first and server_tls.last_error
        assert server_tls.not_serving() is None  # the current certificate is still valid
        plugged.set_shim(state="plugged")
        # Nobody asks again: the thread renews by itself once the HSM is back.
        wait_for(lambda: server_tls.current is not first, GUARD, "renewed after the replug")
        assert server_tls.last_error is None
        assert server_tls.not_after is not None and server_tls.not_after > not_after
        clock.now = server_tls.not_after + 1  # and were it to expire unrenewed, readiness says so
        assert "expired" in (server_tls.not_serving() or "")
    finally:
        server_tls.close()


# --- the renewal thread on the test's time ------------------------------------------------------------

HOUR = 3600.0
LIFETIME = 72 * 3600  # service.tls_lifetime's default


class Timeline:
    """The renewal thread's time, in the test's hands: `now` the wall clock (`step` moves it
    alone, as NTP or a resume from suspend does), `elapsed` the monotonic one; `elapse` lets time
    pass on both. The thread's waits (`wait`) end when that much monotonic time has passed or
    their event is set, and `waits` lists the timeouts it asked for."""

    def __init__(self) -> None:
        self.now, self.elapsed = time.time(), 0.0
        self.waits: list[float] = []
        self._cond = threading.Condition()

    def clock(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def wait(self, event: threading.Event, seconds: float) -> bool:
        with self._cond:
            self.waits.append(seconds)
            self._cond.notify_all()
            end = self.elapsed + seconds
            while self.elapsed < end and not event.is_set():
                self._cond.wait(0.01)
        return event.is_set()

    def step(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds

    def elapse(self, seconds: float) -> None:
        """`seconds` pass; returns once the thread is waiting again (fails if it never wakes)."""
        with self._cond:
            before = len(self.waits)
            self.now += seconds
            self.elapsed += seconds
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: len(self.waits) > before, GUARD):
                raise AssertionError(f"the renewal thread did not wake within {seconds:g} s of its time "
                                     f"(it last asked to wait {self.waits[-1]:g} s)")

    def started(self) -> None:
        """Returns once the thread is in its first wait."""
        with self._cond:
            assert self._cond.wait_for(lambda: bool(self.waits), GUARD), "the renewal thread never waited"


def timed_server_tls(hsm: Hsm, label: str, tmp_path: Path, timeline: Timeline) -> ServerTls:
    cfg = service_section({"tls_key_label": label, "tls_lifetime": LIFETIME, "policy": []}, "test")
    server_tls = ServerTls(cfg, hsm, tmp_path / "tls", clock=timeline.clock, monotonic=timeline.monotonic,
                           wait=timeline.wait)
    assert server_tls.placement is Placement.ISSUED
    timeline.started()
    return server_tls


def new_label() -> str:
    return "api-timed-" + str(int(time.time() * 1000) % 100000)


def test_a_wall_clock_stepped_past_the_certificate_s_end_is_renewed_within_one_60_s_wake(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    label = new_label()
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True,
                          valid=(-dt.timedelta(days=2), dt.timedelta(days=30)))
    timeline = Timeline()
    server_tls = timed_server_tls(hsm, label, tmp_path, timeline)
    try:
        first, not_after = server_tls.current, server_tls.not_after
        assert not_after is not None and not_after >= timeline.now + LIFETIME - 1
        assert timeline.waits[-1] <= 60  # not half of 72 h on a clock that cannot see a step
        # A resume from suspend, or NTP correcting a stale date: the wall clock is past the end.
        timeline.step(not_after - timeline.now + 10)
        why = server_tls.not_serving() or ""
        assert "expired" in why and "could not be certified" not in why, why  # nothing has been tried yet
        timeline.elapse(60)
        assert server_tls.current is not first, "not renewed within one 60 s wake after the step"
        assert server_tls.not_after is not None and server_tls.not_after > timeline.now
        assert server_tls.not_serving() is None and server_tls.last_error is None
        assert timeline.waits[-1] <= 60
    finally:
        server_tls.close()


@pytest.mark.parametrize("service_life", [30 * HOUR, 60 * HOUR], ids=["under-a-day-left-when-due", "more-left"])
def test_a_service_certificate_near_its_end_is_not_asked_again_and_again_and_says_so_once(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, service_life: float) -> None:
    """The short-lived certificate ends with the service certificate (never past it), so when
    renewal is due a new one could live no longer; it used to be renewed at half of an ever
    shorter remaining life, back to back near the end."""
    label = new_label()
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True,
                          valid=(-dt.timedelta(days=2), dt.timedelta(seconds=service_life)))
    timeline = Timeline()
    server_tls = timed_server_tls(hsm, label, tmp_path, timeline)
    attempts: list[float] = []
    real_issue = service_ca.issue

    def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(timeline.now)
        return real_issue(*args, **kwargs)

    monkeypatch.setattr(service_ca, "issue", counted)
    caplog.set_level(logging.INFO, logger=server_tls_mod.__name__)
    try:
        not_after = server_tls.not_after
        assert not_after is not None and not_after <= timeline.now + service_life  # capped at the service's end
        while timeline.now < not_after - 120:  # every wake until two minutes before the end
            timeline.elapse(60)
        assert len(attempts) <= 1, attempts
        said = [r.getMessage() for r in caplog.records if "not renewing" in r.getMessage()]
        assert len(said) == 1, said
        assert f"beside HSM key '{label}'" in said[0] and "re-issue it" in said[0]
        assert server_tls.not_serving() is None  # the current certificate is still valid
        timeline.step(not_after - timeline.now + 1)
        why = server_tls.not_serving() or ""
        assert "expired" in why and "no new one is made" in why and "could not be certified" not in why, why
    finally:
        server_tls.close()


def test_a_service_certificate_replaced_in_the_token_is_used_by_the_next_renewal(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, monkeypatch: pytest.MonkeyPatch) -> None:
    label = new_label()
    old = store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True,
                                valid=(-dt.timedelta(days=2), dt.timedelta(days=10)))
    timeline = Timeline()
    server_tls = timed_server_tls(hsm, label, tmp_path, timeline)
    served: list[list[x509.Certificate]] = []
    real_context = server_tls_mod.memory_context

    def loaded(key: Any, chain: list[x509.Certificate]) -> Any:
        served.append(chain)
        return real_context(key, chain)

    monkeypatch.setattr(server_tls_mod, "memory_context", loaded)
    try:
        # The operator re-issues the service certificate (same key, a later end) without a restart.
        new = (x509.CertificateBuilder(extensions=list(old.extensions)).subject_name(old.subject)
               .issuer_name(old.issuer).public_key(hsm.public_key(label))  # type: ignore[arg-type]
               .serial_number(x509.random_serial_number())
               .not_valid_before(old.not_valid_before_utc)
               .not_valid_after(old.not_valid_after_utc + dt.timedelta(days=90))
               .sign(emulator_pki.intermediate.key, hashes.SHA256()))
        assert hsm.delete(Pkcs11Uri(object=label, type="cert")) >= 1
        hsm.import_certificates(label, [new, emulator_pki.intermediate.cert])
        assert server_tls.not_after is not None
        while not served:
            timeline.elapse(60)
            assert timeline.now < server_tls.not_after, "never renewed"
        assert served[-1][1] == new and served[-1][0].issuer == new.subject
        served[-1][0].verify_directly_issued_by(new)
        assert server_tls.not_serving() is None and server_tls.last_error is None
    finally:
        server_tls.close()


def test_a_replacement_the_api_would_refuse_is_logged_once_and_the_one_in_use_goes_on_certifying(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    label = new_label()
    old = store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True,
                                valid=(-dt.timedelta(days=2), dt.timedelta(days=10)))
    timeline = Timeline()
    server_tls = timed_server_tls(hsm, label, tmp_path, timeline)
    served: list[list[x509.Certificate]] = []
    real_context = server_tls_mod.memory_context

    def loaded(key: Any, chain: list[x509.Certificate]) -> Any:
        served.append(chain)
        return real_context(key, chain)

    monkeypatch.setattr(server_tls_mod, "memory_context", loaded)
    caplog.set_level(logging.INFO, logger=server_tls_mod.__name__)
    try:
        # Re-issued with clientAuth besides serverAuth: its key could then certify client keys.
        builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
                   .public_key(hsm.public_key(label))  # type: ignore[arg-type]
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(old.not_valid_before_utc)
                   .not_valid_after(old.not_valid_after_utc + dt.timedelta(days=90)))
        for ext in old.extensions:
            if not isinstance(ext.value, x509.ExtendedKeyUsage):
                builder = builder.add_extension(ext.value, ext.critical)
        bad = (builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
               .sign(emulator_pki.intermediate.key, hashes.SHA256()))
        assert hsm.delete(Pkcs11Uri(object=label, type="cert")) >= 1
        hsm.import_certificates(label, [bad, emulator_pki.intermediate.cert])
        assert server_tls.renew_now()
        assert server_tls.renew_now()
        assert len(served) == 2 and all(chain[1] == old for chain in served)
        said = [r.getMessage() for r in caplog.records if "cannot certify the API's keys" in r.getMessage()]
        assert len(said) == 1 and "allows clientAuth" in said[0] and "keeps the one it had" in said[0], said
        assert server_tls.last_error is None and server_tls.held is None
    finally:
        server_tls.close()
