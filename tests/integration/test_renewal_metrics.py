"""The renewal of an operational certificate as the metrics endpoint shows it: the consecutive
failures counted up while DPS refuses and back to 0 after a success (what
SpyrusHsmCertificateRenewalFailing watches), and the expiry series following the credential to
its new generation at once, not at the next ten-minute read. `serve` against tests/emulator, as
in test_renewal.py."""

from __future__ import annotations

import http.client
from pathlib import Path

import addresses
import pytest
from cloud_harness import Serve, sas_enrollment, serve_config
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for

from spyrus_hsm.cloud import renewal
from spyrus_hsm.hsm import Hsm

pytestmark = pytest.mark.timeout(240)
HOST = addresses.host()
SCOPE = "0ne000RM7C"
FAILURES = "spyrus_hsm_certificate_renewal_consecutive_failures"
NOT_AFTER = "spyrus_hsm_certificate_not_after_timestamp_seconds"


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """(metric, its `label` label) -> value, for the per-credential series (none while the
    endpoint is not listening yet)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except ConnectionRefusedError:
        return {}
    finally:
        conn.close()
    return {(s.name, s.labels["label"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if "label" in s.labels}


def test_renewal_failures_and_the_new_generations_expiry_show_in_the_metrics(
        hsm: Hsm, provider, token_env, emu, emulator_pki, label: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "rm-" + label, label + "-op"
    sas_enrollment(hsm, emu, reg, label, HOST)
    emu.issued_validity = 40
    port = addresses.port(HOST)
    config = serve_config(tmp_path / "serve.yaml", token_env, tmp_path / "state", emulator_pki.ca_file,
                          id_scope=SCOPE, registration_id=reg, provisioning_host=HOST, attestation="symmetricKey",
                          key=label, issue_cert=base, renew_at=0.3, renew_retry_initial=1, renew_retry_max=2,
                          registration_timeout=5)
    config.write_text(config.read_text() + f"metrics:\n  host: {HOST}\n  port: {port}\n")
    serve = Serve(token_env, config, OTEL_SDK_DISABLED="false")
    seen: list[float] = []
    try:
        wait_for(lambda: (NOT_AFTER, base) in _scrape(port), 60, "the first generation's expiry", every=0.1)
        first_not_after = _scrape(port)[(NOT_AFTER, base)]
        assert _scrape(port)[(FAILURES, base)] == 0
        emu.throttle_dps(times=3, status=401)  # the three renewal attempts due from 12 s are refused

        def failures_reach_three() -> bool:
            seen.append(_scrape(port)[(FAILURES, base)])
            return seen[-1] >= 3

        wait_for(failures_reach_three, 90, "three failures in a row", every=0.1)
        wait_for(lambda: _scrape(port)[(FAILURES, base)] == 0, 60, "a successful renewal", every=0.1)
        generation = [g.label for g in renewal.generations(hsm, base)]
        assert len(generation) == 1 and generation[0] != base
        wait_for(lambda: (NOT_AFTER, generation[0]) in _scrape(port), 15, "the new generation's expiry", every=0.1)
        after = _scrape(port)
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
    assert sorted(set(seen)) == [0, 1, 2, 3]
    assert after[(NOT_AFTER, generation[0])] > first_not_after
    assert (NOT_AFTER, base) not in after, "the deleted generation's series is gone"
