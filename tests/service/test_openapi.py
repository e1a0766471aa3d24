"""/openapi.json describes the service as it is: exactly its routes, and — checked by schemathesis
against the live service — answers that use only documented status codes, content types and
schemas, and never a 5xx; and the reference's example per route and its headers are what the
live service answers."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

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
from spyrus_hsm.service.problems import TYPE_BASE, TYPES

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec_ = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    sys.modules["gen_reference"] = module
    spec_.loader.exec_module(module)
    return module


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


def _shape(value: Any) -> Any:
    """The keys of an answer (its values differ from the example's)."""
    return sorted(value) if isinstance(value, dict) else type(value).__name__


def test_the_reference_examples_are_what_the_live_service_answers(live: Live) -> None:
    """The routes that need neither DPS nor a stored certificate, sent as the reference shows them
    (with this service's key and an algorithm its key does); the answer has the example's fields."""
    examples = _generator().API_EXAMPLES
    sent = {"POST /v1/sas-tokens": {**examples["POST /v1/sas-tokens"][0], "deviceId": "example-leaf"},
            "POST /v1/signatures": {**examples["POST /v1/signatures"][0], "key": live.key,
                                    "algorithm": "HMAC-SHA256"},
            "GET /healthz": None, "GET /readyz": None, "GET /openapi.json": None}
    for route, body in sent.items():
        method, path = route.split(" ", 1)
        _, status, answer = examples[route]
        got_status, headers, got = live.svc.call(method, path, body, bearer=live.bearer,
                                                 headers={"X-Request-Id": "example-0001"})
        assert got_status == status, (route, got)
        if route == "GET /openapi.json":
            assert set(answer) <= set(got)
        else:
            assert _shape(got) == _shape(answer), route
        if path.startswith("/v1/"):
            assert headers["x-request-id"] == "example-0001", route


def test_the_documented_headers_are_what_the_live_service_sends(live: Live) -> None:
    status, headers, problem = live.svc.call("POST", "/v1/signatures", {"key": live.key})
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="spyrus-hsm"'
    assert problem["type"].removeprefix(TYPE_BASE) in TYPES and problem["instance"] == headers["x-request-id"]
    assert len(headers["x-request-id"]) == 32  # none sent: a new one

    # A caller's id that is not plain visible ASCII is replaced; a traceparent changes nothing in the answer.
    status, headers, _ = live.svc.call(
        "POST", "/v1/sas-tokens", {"deviceId": "example-leaf", "hub": "contoso.azure-devices.net"},
        bearer=live.bearer, headers={"X-Request-Id": "has space",
                                     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert status == 200 and headers["x-request-id"] != "has space"

    status, headers, problem = live.svc.call("GET", "/v1/certificates/no-such-label", bearer=live.bearer)
    assert status in (403, 404) and problem["type"].removeprefix(TYPE_BASE) in TYPES
