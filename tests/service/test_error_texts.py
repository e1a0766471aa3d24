"""What a caller is told when its request fails: only what it asked for. The token's inventory
(the other credentials, the token's label), file paths, DPS's address and the operator's advice
("import one with 'spyrus-hsm …'", "check …") stay in the module's log, which has the full text
of each such error in one line.

Each error path of each /v1 route (and /readyz on the API's port) is provoked over a real HTTPS
socket against the session's token, with a credential in it that the caller did not ask about;
a walk over the routes checks that none was left out.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import addresses
import pytest
from service_harness import ServiceHarness, free_port, problem_type, store_hsm_certificate
from waiting import wait_for

from emulator.core import Emulator
from emulator.pki import EmulatorPki
from spyrus_hsm.config import CloudConfig
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, PoolSettings, Secret, TokenSelector
from spyrus_hsm.service.routes import ROUTES

pytestmark = pytest.mark.timeout(120)

DPS_HOST = addresses.host()     # the emulator: it checks credentials
NO_DPS_HOST = addresses.host()  # nothing listens there
SCOPE = "0ne000A54E"
POLICY = [
    {"principals": ["*"], "operations": ["registration"], "devices": ["{cn}"]},
    {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]},
    {"principals": ["*"], "operations": ["signature", "certificate"], "keys": ["{cn}", "{cn}-*"]},
]
# Words of the operator's advice and of inventories: never in a caller's answer.
ADVICE = ("spyrus-hsm", "present", "import", "check", "see '", "SPYRUS_", "token init", "the extra ones")


@dataclass
class Provoked:
    route: tuple[str, str]       # method and route template
    status: int
    detail: str
    log: str                     # what the module logged while answering


class Caller:
    """A leaf with a bearer token, and everything it was told."""

    def __init__(self, svc: ServiceHarness, name: str, bearer: str, caplog: pytest.LogCaptureFixture) -> None:
        self.svc, self.name, self.bearer, self.caplog = svc, name, bearer, caplog
        self.told: list[Provoked] = []

    def ask(self, method: str, path: str, template: str, body: Any = None, *, status: int,
            kind: str) -> Provoked:
        self.caplog.clear()
        got, headers, answer = self.svc.call(method, path, body, bearer=self.bearer)
        assert got == status and problem_type(headers, answer) == kind, answer
        provoked = Provoked((method, template), got, str(answer.get("detail", "")), self.caplog.text)
        self.told.append(provoked)
        return provoked


def assert_private(provoked: Provoked, *private: str) -> None:
    """The answer names none of `private` and none of the advice words."""
    found = [p for p in (*private, *ADVICE) if p and p.lower() in provoked.detail.lower()]
    assert found == [], f"{provoked.route} told the caller {found}: {provoked.detail!r}"


@pytest.fixture
def emu(make_emulator: Callable[..., Emulator]) -> Emulator:
    return make_emulator(DPS_HOST, id_scope=SCOPE)


@pytest.fixture
def inventory(hsm: Hsm, emulator_pki: EmulatorPki) -> str:
    """A credential in the token that no caller asks about (as the module's own TLS key is)."""
    label = "inventory-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, emulator_pki)
    return label


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="spyrus_hsm")
    yield caplog


def test_every_error_answer_of_every_route_names_only_what_the_caller_asked_for_and_the_log_has_the_rest(
        hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, inventory: str,
        caplog_info: pytest.LogCaptureFixture) -> None:
    leaf, bearer = "leaf-" + secrets.token_hex(3), secrets.token_urlsafe(24)
    cloud = CloudConfig(provisioning_host=DPS_HOST, server_ca_file=str(emulator_pki.ca_file), id_scope=SCOPE)
    private = (token_env.label, inventory, str(tmp_path), DPS_HOST, NO_DPS_HOST, "CN=")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, bearer={leaf: bearer}, cloud=cloud,
                        signing_keys=("*-gone", "*-ec"), rate_limit_per_second=0) as svc:
        c = Caller(svc, leaf, bearer, caplog_info)
        registrations = ("POST", "/v1/registrations")

        # The report of issue 18: an X.509 registration for a credential that is not there.
        x509 = c.ask(*registrations, "/v1/registrations", {"registrationId": leaf, "attestation": "x509"},
                     status=404, kind="not-found")
        assert x509.detail == f"no X.509 credential for the registration of '{leaf}'"
        assert "credentials present" in x509.log and f"'{inventory}'" in x509.log

        no_key = c.ask(*registrations, "/v1/registrations", {"registrationId": leaf, "attestation": "symmetricKey"},
                       status=404, kind="not-found")
        assert no_key.detail == f"no key for the registration of '{leaf}'"
        assert "import it with 'spyrus-hsm key import-sas'" in no_key.log

        no_device_key = c.ask("POST", "/v1/sas-tokens", "/v1/sas-tokens", {"deviceId": leaf},
                              status=404, kind="not-found")
        assert leaf in no_device_key.detail
        assert f"token '{token_env.label}'" in no_device_key.log and "spyrus-hsm list" in no_device_key.log

        no_signing_key = c.ask("POST", "/v1/signatures", "/v1/signatures",
                               {"key": f"{leaf}-gone", "algorithm": "ES256", "data": "AAAA"},
                               status=404, kind="not-found")
        assert f"{leaf}-gone" in no_signing_key.detail and "spyrus-hsm list" in no_signing_key.log

        no_cert = c.ask("GET", f"/v1/certificates/{leaf}-gone", "/v1/certificates/{label}",
                        status=404, kind="not-found")
        assert f"{leaf}-gone" in no_cert.detail

        no_stored = c.ask("GET", f"/v1/registrations/{leaf}", "/v1/registrations/{id}",
                          status=404, kind="not-found")
        assert leaf in no_stored.detail

        hsm.generate_keypair(f"{leaf}-ec", KeyAlgorithm.EC_P256)
        refused_by_token = c.ask("POST", "/v1/signatures", "/v1/signatures",
                                 {"key": f"{leaf}-ec", "algorithm": "RS256", "data": "AAAA"},
                                 status=422, kind="operation-failed")  # SoftHSM: CKR_GENERAL_ERROR
        assert f"signing '{leaf}-ec' failed" in refused_by_token.log

        hsm.import_secret_key(leaf, Secret(secrets.token_bytes(32)))

        # DPS knows no enrollment for it: the operator is told what to check, the caller only that.
        refused = c.ask(*registrations, "/v1/registrations", {"registrationId": leaf, "attestation": "symmetricKey"},
                        status=502, kind="registration-failed")
        assert refused.detail.startswith("DPS re") and leaf in refused.detail
        assert "enrollment" in refused.log

    unreachable_cloud = CloudConfig(provisioning_host=NO_DPS_HOST, server_ca_file=str(emulator_pki.ca_file),
                                    id_scope=SCOPE)
    other, other_bearer = "leaf-" + secrets.token_hex(3), secrets.token_urlsafe(24)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, bearer={leaf: bearer, other: other_bearer},
                        cloud=unreachable_cloud, rate_limit_per_second=0) as svc:
        c2 = Caller(svc, leaf, bearer, caplog_info)
        unreachable = c2.ask(*registrations, "/v1/registrations",
                             {"registrationId": leaf, "attestation": "symmetricKey"},
                             status=502, kind="registration-failed")
        assert unreachable.detail == f"DPS could not be reached for the registration of '{leaf}'"
        assert f"cannot connect to DPS at {NO_DPS_HOST}" in unreachable.log

        # Its credential is there, but its certificate has expired: the subject stays in the log.
        store_expired_certificate(hsm, other, emulator_pki)
        c2.name, c2.bearer = other, other_bearer
        expired = c2.ask(*registrations, "/v1/registrations", {"registrationId": other, "attestation": "x509"},
                         status=422, kind="credential-invalid")
        assert f"'CN={other}' is not valid now" in expired.log

    # The audit log cannot be written (its directory is missing): nothing is handed out.
    audit_file = tmp_path / "missing" / "audit.log"
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, bearer={leaf: bearer}, audit_file=audit_file,
                        rate_limit_per_second=0) as svc:
        c3 = Caller(svc, leaf, bearer, caplog_info)
        audit = c3.ask("POST", "/v1/sas-tokens", "/v1/sas-tokens", {"deviceId": leaf},
                       status=503, kind="audit-unavailable")
        assert audit.detail == "the audit record could not be written; nothing was handed out"
        assert "ENOENT" in audit.log and str(audit_file) in audit.log

    told = [*c.told, *c2.told, *c3.told]
    for provoked in told:
        assert_private(provoked, *private)
    walked = {p.route for p in told}
    routes = {(r.method, r.path) for r in ROUTES if r.path.startswith("/v1/")}
    assert routes <= walked, f"routes whose errors were not provoked: {routes - walked}"


def test_readyz_on_the_api_port_gives_a_short_public_reason_and_the_health_port_the_full_one(
        token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    missing = "absent-" + secrets.token_hex(3)
    settings = PoolSettings(token_env.module, TokenSelector(missing), workers=1, retry_min=0.1, retry_max=0.5)
    unready = Hsm(settings, Secret(token_env.pin)).start(wait=False)
    try:
        wait_for(lambda: unready.state.reason, 30, "the pool saying why it is not ready", every=0.05)
        with ServiceHarness(unready, tmp_path, emulator_pki, health_port=free_port()) as svc:
            status, headers, api = svc.call("GET", "/readyz")
            assert status == 503 and problem_type(headers, api) == "not-ready"
            health = _health_readyz(svc)
    finally:
        unready.close()
    assert api["ready"] is False and api["detail"] == f"the HSM is {api['status']}"
    assert_private(Provoked(("GET", "/readyz"), status, api["detail"], ""), token_env.label, missing)
    # The health port (loopback, for the runtime and the operator) keeps the whole reason.
    assert missing in health["detail"] and "tokens present" in health["detail"]


def store_expired_certificate(hsm: Hsm, label: str, pki: EmulatorPki) -> None:
    """A key pair in the HSM under `label` with a certificate (CN=label) that expired yesterday."""
    store_hsm_certificate(hsm, label, pki, valid=(-dt.timedelta(days=2), -dt.timedelta(days=1)))


def _health_readyz(svc: ServiceHarness) -> dict[str, Any]:
    assert svc.health_port is not None
    conn = http.client.HTTPConnection(svc.cfg.health_host, svc.health_port, timeout=10)
    try:
        conn.request("GET", "/readyz")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()
