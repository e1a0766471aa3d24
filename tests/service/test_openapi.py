"""/openapi.json describes the service as it is: exactly its routes, and — checked by schemathesis
against the live service — answers that use only documented status codes, content types and
schemas, and never a 5xx."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from service_harness import ServiceHarness, new_leaf

from emulator.pki import EmulatorPki
from spyrus_hsm.config import ServiceConfig
from spyrus_hsm.hsm import Hsm, Secret
from spyrus_hsm.service.app import build_app
from spyrus_hsm.service.openapi import spec

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@dataclass
class Live:
    svc: ServiceHarness
    bearer: str
    key: str


@pytest.fixture(scope="module")
def live(hsm: Hsm, emulator_pki: EmulatorPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A service on which generated requests can succeed: whatever device or registration id a
    request names, its SAS token is signed by one test key; the caller may name another, declared
    for signatures; registrations are not allowed (they would go to the real DPS)."""
    device_key = new_leaf(hsm, "openapi").name
    key = f"sign-{device_key}"
    hsm.import_secret_key(key, Secret(secrets.token_bytes(32)))
    bearer = secrets.token_urlsafe(24)
    policy = [{"principals": ["tester"], "operations": ["sas-token"], "devices": ["*"]},
              {"principals": ["tester"], "operations": ["signature", "certificate"], "keys": [key]}]
    with ServiceHarness(hsm, tmp_path_factory.mktemp("openapi"), emulator_pki, policy=policy,
                        bearer={"tester": bearer}, sas_key=device_key, dps_key=device_key, signing_keys=(key,),
                        rate_limit_per_second=0) as svc:
        yield Live(svc, bearer, key)


def test_openapi_is_3_1_and_lists_exactly_the_routes_of_the_app(live: Live) -> None:
    status, _, document = live.svc.call("GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1.")
    documented = {(method, path) for path, item in document["paths"].items() for method in item
                  if method in HTTP_METHODS}
    assert live.svc.service is not None
    app = build_app(live.svc.service)
    routed = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"}  # aiohttp adds HEAD beside GET
    assert documented == routed


def test_openapi_describes_the_service_as_configured() -> None:
    cfg = ServiceConfig(min_ttl=600, max_ttl=7200)
    schemas = spec(cfg, default_hub=False, default_id_scope=False)["components"]["schemas"]
    for variant in schemas["SasTokenRequest"]["oneOf"]:  # device and DPS registration tokens
        ttl = variant["properties"]["ttlSeconds"]
        assert (ttl["minimum"], ttl["maximum"]) == (600, 7200)
    assert schemas["SasTokenRequest"]["oneOf"][0]["required"] == ["deviceId", "hub"]  # no default hub
    assert "idScope" in schemas["RegistrationRequest"]["required"]  # no default scope either


def test_openapi_leaves_optional_what_the_service_has_defaults_for() -> None:
    schemas = spec(ServiceConfig(), default_hub=True, default_id_scope=True)["components"]["schemas"]
    assert schemas["SasTokenRequest"]["oneOf"][0]["required"] == ["deviceId"]
    assert schemas["RegistrationRequest"]["required"] == ["registrationId", "attestation"]


def test_schemathesis_finds_no_defects_in_the_live_service(live: Live) -> None:
    """Every schemathesis phase and check (no 5xx; status codes, content types, headers and bodies as
    documented; invalid data refused, valid data not refused with 400), run by its engine as the
    CLI does: `schemathesis.pytest.from_fixture` cannot be used, it reads `Node._nodeid`, which
    pytest 9 nodes no longer have."""
    ca = str(live.svc.server_ca)
    config = SchemathesisConfig.from_dict({  # what schemathesis.toml would say
        "seed": 20240611, "max-failures": 20, "cache": {"enabled": False},
        "base-url": live.svc.url, "tls-verify": ca, "workers": 1, "request-timeout": 30,
        "headers": {"Authorization": f"Bearer {live.bearer}"},
        "generation": {"max-examples": 30, "deterministic": True, "database": "none"},
        # Half the signature and certificate requests name the test key (an HMAC key), so some get
        # past the policy and the HSM.
        "dictionaries": {"test-key": {"values": [live.key]}, "hmac": {"values": ["HMAC-SHA256"]}},
        "parameters": {"body.key": {"dictionary": "test-key", "probability": 0.5},
                       "body.algorithm": {"dictionary": "hmac", "probability": 0.5},
                       "path.label": {"dictionary": "test-key", "probability": 0.5}},
    })
    schema = schemathesis.openapi.from_url(f"{live.svc.url}/openapi.json", config=config, verify=ca)
    failures = [_describe(event) for event in engine.from_schema(schema).execute() if _failed(event)]
    assert not failures, "\n\n".join(failures)
    allowed = {r["operation"] for r in live.svc.audit_records() if r["outcome"] == "allowed"}
    assert allowed >= {"sas-token", "signature"}, "schemathesis never got past the policy: a vacuous run"


def _failed(event: events.EngineEvent) -> bool:
    if isinstance(event, events.ScenarioFinished):
        return any(c.failure_info is not None for checks in event.recorder.checks.values() for c in checks)
    return isinstance(event, events.NonFatalError | events.FatalError)


def _describe(event: events.EngineEvent) -> str:
    if isinstance(event, events.ScenarioFinished):
        return "\n".join(f"{event.label}: {c.name}: {c.failure_info.failure.title}\n"
                         f"{c.failure_info.failure.message}\n{c.failure_info.code_sample}"
                         for checks in event.recorder.checks.values() for c in checks if c.failure_info is not None)
    assert isinstance(event, events.NonFatalError | events.FatalError)
    return f"{getattr(event, 'label', 'the run')}: {event.info.format()}"
