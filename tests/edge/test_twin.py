"""Desired properties -> configuration: the twin overlays the file's service section, is
validated as a whole, and its errors name the twin key."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from spyrus_hsm.config import PolicyRule, ServiceConfig, load, service_section
from spyrus_hsm.edge.twin import (
    TwinConfigError,
    evaluate,
    live_changes,
    merge_patch,
    restart_required,
    settings,
)

FILE_POLICY = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
MANIFEST_DEFAULTS: dict[str, Any] = {
    "logLevel": "info",
    "service": {"rateLimitPerSecond": 20, "rateLimitBurst": 40, "cacheReuseFraction": 0.5,
                "minTtlSeconds": 300, "maxTtlSeconds": 86400, "auditFailClosed": True,
                "policy": [{"principals": ["gw-*"], "operations": ["sas-token", "signature"],
                            "devices": ["leaf-*"], "keys": ["leaf-*"]}]},
}


@pytest.fixture
def base() -> ServiceConfig:
    return service_section({"tls_cert_file": "/etc/s.pem", "tls_key_file": "/etc/s.key", "port": 8443,
                            "rate_limit_per_second": 5, "policy": FILE_POLICY}, "/etc/spyrus-hsm.yaml")


def rejected(desired: dict[str, Any], base: ServiceConfig) -> str:
    with pytest.raises(TwinConfigError) as info:
        evaluate(desired, base, version=7)
    return str(info.value)


def test_an_empty_twin_leaves_the_file_configuration_unchanged(base: ServiceConfig) -> None:
    result = evaluate({"$version": 1}, base, 1)
    assert result.service == base and result.log_level is None


def test_the_manifest_defaults_map_onto_service_config_fields(base: ServiceConfig) -> None:
    result = evaluate(MANIFEST_DEFAULTS, base, 2)
    s = result.service
    assert (s.rate_limit_per_second, s.rate_limit_burst, s.cache_reuse_fraction) == (20.0, 40, 0.5)
    assert (s.min_ttl, s.max_ttl, s.audit_fail_closed) == (300, 86400, True)
    assert s.policy == (PolicyRule(("gw-*",), ("sas-token", "signature"), ("leaf-*",), ("leaf-*",)),)
    assert result.log_level == "info"


def test_keys_absent_from_the_twin_keep_the_file_values(base: ServiceConfig) -> None:
    s = evaluate({"service": {"rateLimitBurst": 3}}, base).service
    assert s == replace(base, rate_limit_burst=3)
    assert s.port == 8443 and s.policy == base.policy


def test_an_empty_policy_list_denies_everything(base: ServiceConfig) -> None:
    assert evaluate({"service": {"policy": []}}, base).service.policy == ()


@pytest.mark.parametrize("service, fragment", [
    ({"rateLimitPerSecond": "fast"}, "'service.rateLimitPerSecond' must be float, got 'fast'"),
    ({"rateLimitBurst": 0}, "'service.rateLimitBurst' >= 1"),
    ({"rateLimitBurst": True}, "'service.rateLimitBurst' must be int"),
    ({"minTtlSeconds": 30}, "'service.minTtlSeconds' <= 'service.maxTtlSeconds'"),
    ({"cacheReuseFraction": 1.5}, "'service.cacheReuseFraction' must be 0"),
    ({"auditFailClosed": "yes"}, "'service.auditFailClosed' must be bool"),
    ({"policy": [{"principals": ["*"], "operations": ["launch"]}]}, "'service.policy[0].operations'"),
    ({"policy": [{"operations": ["sas-token"]}]}, "'service.policy[0].principals' is required"),
    ({"policy": [{"principals": ["*"], "operations": ["*"], "colour": "red"}]},
     "unknown key 'service.policy[0].colour'"),
])
def test_invalid_values_are_rejected_naming_the_twin_key(base: ServiceConfig, service: dict[str, Any],
                                                         fragment: str) -> None:
    message = rejected({"service": service}, base)
    assert fragment in message and "module twin desired properties (version 7)" in message


def test_unknown_keys_are_rejected_listing_the_known_ones(base: ServiceConfig) -> None:
    assert "unknown key 'colour' (known: logLevel, service, cloud)" in rejected({"colour": "red"}, base)
    message = rejected({"service": {"rateLimit": 5}}, base)
    assert "unknown key 'service.rateLimit'" in message and "rateLimitPerSecond" in message
    message = rejected({"cloud": {"idScope": "0ne0001"}}, base)
    assert "unknown key 'cloud.idScope' (known: renewAt" in message and "config file" in message


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, True, "0.5", [0.5]])
def test_renew_at_must_be_a_fraction_of_the_lifetime(base: ServiceConfig, value: object) -> None:
    assert "'cloud.renewAt' must be a number above 0 and below 1" in rejected({"cloud": {"renewAt": value}}, base)


def test_renew_at_from_the_twin_and_back_to_the_file(base: ServiceConfig) -> None:
    assert evaluate({"cloud": {"renewAt": 0.25}}, base).renew_at == 0.25
    assert evaluate({"cloud": {"renewAt": None}}, base).renew_at is None
    assert evaluate({}, base).renew_at is None


@pytest.mark.parametrize("key, file_key", [("port", "port"), ("tlsCertFile", "tls_cert_file"),
                                           ("bearerTokens", "bearer_tokens"), ("clientCaFile", "client_ca_file"),
                                           # which keys sign: the twin cannot point them at a reserved key
                                           ("sasKey", "sas_key"), ("groupKey", "group_key"),
                                           ("signingKeys", "signing_keys"), ("leafCertLabel", "leaf_cert_label")])
def test_settings_fixed_at_start_are_refused_with_where_to_set_them(base: ServiceConfig, key: str,
                                                                    file_key: str) -> None:
    message = rejected({"service": {key: "x"}}, base)
    assert f"'service.{key}' cannot be set from the module twin" in message
    assert f"set 'service.{file_key}' in the config file and restart" in message


def test_one_bad_key_rejects_the_whole_document(base: ServiceConfig) -> None:
    before = deepcopy(base)
    message = rejected({"logLevel": "debug", "service": {"rateLimitBurst": 2, "maxTtlSeconds": "long"}}, base)
    # The message names the bad key, what it accepts and what it got, and only that key ...
    assert message == "module twin desired properties (version 7): 'service.maxTtlSeconds' must be int, got 'long'"
    # ... and nothing of the valid keys beside it was taken (the agent keeps its running
    # configuration: test_edge_agent's rejected-whole test).
    assert base == before and base.rate_limit_burst != 2


@pytest.mark.parametrize("level", ["debug", "INFO", "warning", "error", "critical"])
def test_log_levels(base: ServiceConfig, level: str) -> None:
    assert evaluate({"logLevel": level}, base).log_level == level.lower()


def test_an_unknown_log_level_is_rejected(base: ServiceConfig) -> None:
    assert "'logLevel' must be one of debug, info, warning, error, critical, got 'loud'" in rejected(
        {"logLevel": "loud"}, base)


def test_service_settings_are_type_checked_even_with_the_service_off() -> None:
    off = ServiceConfig()
    assert evaluate({"service": {"rateLimitBurst": 3}}, off).service == replace(off, rate_limit_burst=3)
    assert "must be int" in rejected({"service": {"rateLimitBurst": "3"}}, off)


def test_merge_patch_merges_objects_replaces_arrays_and_null_deletes() -> None:
    doc = {"logLevel": "info", "service": {"rateLimitBurst": 4, "policy": [{"principals": ["a"]}]}}
    patch = {"$version": 3, "logLevel": None, "service": {"rateLimitPerSecond": 1, "policy": []}}
    assert merge_patch(doc, patch) == {"service": {"rateLimitBurst": 4, "rateLimitPerSecond": 1, "policy": []}}
    assert doc["logLevel"] == "info"  # the original is not modified


def test_twin_metadata_is_not_configuration() -> None:
    assert settings({"$version": 4, "$metadata": {}, "logLevel": "info"}) == {"logLevel": "info"}


def test_live_changes_are_named_as_in_the_twin(base: ServiceConfig) -> None:
    new = replace(base, min_ttl=600, policy=())
    assert live_changes(base, new) == ["minTtlSeconds", "policy"]


@pytest.mark.parametrize(("before", "after", "expected"), [
    ("hsm: {token_label: a}\nservice: {tls_cert_file: c, tls_key_file: k, port: 8443}\n",
     "hsm: {token_label: b, workers: 2}\n"
     "service: {tls_cert_file: c, tls_key_file: k, port: 9443, rate_limit_burst: 9}\n",
     ["hsm.token_label", "hsm.workers", "service.port"]),
    ("hsm: {token_label: a}\n",
     "hsm: {token_label: a}\nmetrics: {port: 9700}\nlogging: {format: json}\nevents: {summary_interval: 30}\n",
     ["metrics.port", "logging.format", "events.summary_interval"]),
])
def test_a_reload_lists_what_only_a_restart_applies(tmp_path: Path, before: str, after: str,
                                                     expected: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(before)
    running = load(str(path), env={})
    path.write_text(after)
    assert restart_required(running, load(str(path), env={})) == expected
