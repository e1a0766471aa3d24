"""The documentation site: `mkdocs build --strict` passes (a broken link, anchor or a page left
out of the navigation fails it), and the reference pages it generates from the code name every
configuration key, CLI command, HTTP route, problem type, metric and upstream event type, read
back from the built HTML. What the reference is generated from describes everything it lists
(configuration fields, OpenAPI schema properties, problem types), the API's examples fit its
schemas, and every alert rule has a runbook that exists."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")
README_MAX_LINES = 150


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_reference"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def text_of(site: Path, page: str) -> str:
    """The page's visible text (tags removed, entities decoded)."""
    raw = (site / page / "index.html").read_text(encoding="utf-8")
    body = raw.split('<article class="md-content__inner md-typeset">', 1)[1].split("</article>", 1)[0]
    return html.unescape(re.sub(r"<[^>]+>", "", body))


def test_every_configuration_key_is_in_the_reference_with_its_default(site: Path) -> None:
    text = text_of(site, "reference/configuration")
    keys = [key for key, _, _ in gen.config_keys()]
    assert len(keys) > 60
    missing = [key for key in keys if key not in text]
    assert not missing, missing
    raw = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    row = html.unescape(re.sub(r"<[^>]+>", " ", next(r for r in raw.split("<tr>") if ">hsm.queue_limit<" in r)))
    assert "256" in row and "1 to 100000" in row, row


def test_every_environment_variable_and_twin_key_is_in_the_configuration_reference(site: Path) -> None:
    from spyrus_hsm import config
    from spyrus_hsm.edge import twin

    text = text_of(site, "reference/configuration")
    names = [*config._ENV, *(f"service.{k}" for k in twin.LIVE), *(f"cloud.{k}" for k in twin.CLOUD_LIVE)]
    assert not [n for n in names if n not in text]


def test_every_cli_command_is_in_the_reference(site: Path) -> None:
    text = text_of(site, "reference/cli")
    commands = [path for path, _, _ in gen.cli_commands()]
    assert {"serve", "token init", "key generate", "aziot-config", "renew"} <= set(commands)
    assert not [c for c in commands if f"spyrus-hsm {c}" not in text]


def test_every_route_is_in_the_api_reference(site: Path) -> None:
    text = text_of(site, "reference/http-api")
    routes = [f"{method} {path}" for method, path, _ in gen.api_routes()]
    assert "POST /v1/sas-tokens" in routes and "GET /readyz" in routes
    assert not [r for r in routes if r not in text]


def test_every_metric_is_in_the_metrics_reference(site: Path) -> None:
    text = text_of(site, "reference/metrics")
    names = [i.prometheus for i in gen.instruments()]
    assert "spyrus_hsm_certificate_not_after_timestamp_seconds" in names
    assert "spyrus_hsm_hsm_ready" in names and "spyrus_hsm_audit_dropped_total" in names
    assert not [n for n in names if n not in text]


def test_every_upstream_event_type_is_in_the_events_reference(site: Path) -> None:
    text = text_of(site, "reference/events")
    types = list(gen.event_types())
    assert {"hsm.unavailable", "hsm.pinRefused", "hsm.recovered", "certificate.expiring"} <= set(types)
    assert not [t for t in types if t not in text]


def test_the_metric_names_in_docs_and_alerts_are_ones_the_code_makes() -> None:
    """A renamed metric must be renamed in the hand-written pages and the alert rules too."""
    made = {s for i in gen.instruments() for s in i.series}
    files = [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "deployments" / "prometheus" / "alerts.yml",
             ROOT / "deployments" / "prometheus" / "alerts.test.yml"]
    unknown = {(f.name, name) for f in files for name in re.findall(r"\bspyrus_hsm_(?!leaf\b)[a-z0-9_]+", f.read_text())
               if name not in made}
    assert not unknown, sorted(unknown)


def test_the_readme_is_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    for target in re.findall(r"\]\(((?:docs|deployments)/[^)#]+)", "\n".join(lines)):
        assert (ROOT / target).exists(), target


def test_every_configuration_field_has_a_meaning_in_the_code() -> None:
    """The reference's Meaning column comes from each field's comment in config.py."""
    missing = [key for key, cls, f in gen.config_keys() if not gen._field_comments(cls).get(f.name)]
    assert not missing, f"config.py fields without a comment: {missing}"


@pytest.mark.parametrize("defaults", [False, True])
def test_every_openapi_schema_property_has_a_description(defaults: bool) -> None:
    from spyrus_hsm.config import ServiceConfig
    from spyrus_hsm.service.openapi import spec

    schemas = spec(ServiceConfig(), default_hub=defaults, default_id_scope=defaults)["components"]["schemas"]
    missing = [f"{name}.{prop}" for name, schema in schemas.items() for variant in schema.get("oneOf", [schema])
               for prop, value in variant.get("properties", {}).items() if not value.get("description")]
    assert not missing, missing


def test_the_openapi_document_says_when_hub_and_id_scope_are_required() -> None:
    from spyrus_hsm.config import ServiceConfig
    from spyrus_hsm.service.openapi import spec

    def described(defaults: bool) -> tuple[str, str]:
        schemas = spec(ServiceConfig(), default_hub=defaults, default_id_scope=defaults)["components"]["schemas"]
        return (schemas["SasTokenRequest"]["oneOf"][0]["properties"]["hub"]["description"],
                schemas["RegistrationRequest"]["properties"]["idScope"]["description"])

    assert all("required here" in d for d in described(False))
    assert all("optional here" in d for d in described(True))


def test_every_problem_type_the_code_raises_is_described() -> None:
    from spyrus_hsm.service import problems

    raised = gen.problem_titles()
    assert {"invalid-request", "hsm-busy", "audit-unavailable", "not-ready", "method-not-allowed"} <= set(raised)
    undescribed = sorted(set(raised) - set(problems.TYPES))
    assert not undescribed, f"problem types without an entry in problems.TYPES: {undescribed}"
    stale = sorted(set(problems.TYPES) - set(raised))
    assert not stale, f"problems.TYPES entries the code never raises: {stale}"
    empty = [name for name, kind in problems.TYPES.items() if not (kind.when and kind.action and kind.status)]
    assert not empty, empty


def test_a_problem_types_retry_after_is_what_the_code_sends() -> None:
    """Retry-After with 429 always, and with exactly the 503s told to wait."""
    from spyrus_hsm.service import problems

    retried = {a.type for a in problems.HTTP.values() if a.retry} | {"rate-limited", "request-timeout",
                                                                        "audit-unavailable", "not-ready"}
    assert {name for name, kind in problems.TYPES.items() if kind.retry_after} == retried


def test_every_problem_type_is_in_the_reference(site: Path) -> None:
    from spyrus_hsm.service import problems

    text = text_of(site, "reference/problems")
    assert not [name for name in problems.TYPES if name not in text]
    raw = (site / "reference" / "problems" / "index.html").read_text(encoding="utf-8")
    assert not [name for name in problems.TYPES if f'id="{name}"' not in raw]


def _spec_validator(schema: dict[str, Any], spec: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for `schema` that resolves the spec's #/components/... references."""
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    return cls({**schema, "components": spec["components"]})


def test_the_api_examples_fit_the_openapi_schemas() -> None:
    spec = gen.api_spec()
    routes = {f"{method} {path}": op for method, path, op in gen.api_routes()}
    assert set(gen.API_EXAMPLES) == set(routes)
    for route, (body, status, answer) in gen.API_EXAMPLES.items():
        op = routes[route]
        if body is not None:
            _spec_validator(op["requestBody"]["content"]["application/json"]["schema"], spec).validate(body)
        response = op["responses"][str(status)]
        media, content = next(iter(response["content"].items()))
        if media == "application/json" and "$ref" in content["schema"]:
            _spec_validator(content["schema"], spec).validate(answer)
    route, body, status, problem, headers = gen.API_ERROR_EXAMPLE
    assert str(status) in routes[route]["responses"]
    _spec_validator({"$ref": "#/components/schemas/Problem"}, spec).validate(problem)
    assert problem["instance"] == headers["X-Request-Id"]


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((ROOT / "deployments" / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_rule_has_a_runbook_that_exists(site: Path) -> None:
    rules = _alert_rules()
    assert {"SpyrusHsmPinRefused", "SpyrusHsmTokenSerialChanged", "SpyrusHsmRestartRequired",
            "SpyrusHsmAuthenticationFailures"} <= {r["alert"] for r in rules}
    raw = (site / "operations" / "alerts" / "index.html").read_text(encoding="utf-8")
    for rule in rules:
        url = urlsplit(rule["annotations"].get("runbook_url", ""))
        assert url.path == "/operations/alerts/" and url.fragment, (rule["alert"], url)
        assert f'id="{url.fragment}"' in raw, (rule["alert"], url.fragment)
        assert url.fragment == rule["alert"].lower(), "one section per alert, named after it"
