"""The authorisation policy: default deny, globs, `{cn}` as the caller's own name, and which keys a
rule lets a caller use."""

from __future__ import annotations

import pytest
from service_harness import rules

from spyrus_hsm.service.policy import Policy, Request

OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}


def test_nothing_is_allowed_without_a_rule() -> None:
    decision = Policy(()).decide(Request("leaf-1", "sas-token", device="leaf-1", key="leaf-1"))
    assert not decision.allowed
    assert "no policy rule allows 'leaf-1' the operation 'sas-token' on device 'leaf-1'" in decision.reason


def test_a_refusal_names_a_key_only_when_the_caller_named_it() -> None:
    """The key the configuration chose for a device (a group key, say) is not the caller's to learn."""
    chosen = Policy(()).decide(Request("leaf-1", "registration", device="leaf-1", key="group-key"))
    named = Policy(()).decide(Request("leaf-1", "signature", key="leaf-1-sig", key_named_by_caller=True))
    assert "group-key" not in chosen.reason and "device 'leaf-1'" in chosen.reason
    assert "key 'leaf-1-sig'" in named.reason


def test_cn_lets_a_caller_act_as_itself() -> None:
    policy = Policy(rules(OWN_DEVICE))
    assert policy.decide(Request("leaf-1", "sas-token", device="leaf-1", key="leaf-1")).allowed
    assert not policy.decide(Request("leaf-1", "sas-token", device="leaf-2", key="leaf-2")).allowed


@pytest.mark.parametrize("cn, device", [
    ("*", "leaf-1"),
    ("leaf-?", "leaf-1"),
    ("leaf-[0-9]", "leaf-1"),
    ("leaf-[!x]", "leaf-1"),
    ("leaf*", "leaf-1"),
])
def test_glob_characters_in_a_cn_do_not_widen_access(cn: str, device: str) -> None:
    policy = Policy(rules(OWN_DEVICE))
    assert not policy.decide(Request(cn, "sas-token", device=device, key=device)).allowed
    assert policy.decide(Request(cn, "sas-token", device=cn, key=cn)).allowed  # only its literal self


def test_cn_inside_a_longer_pattern_is_still_literal() -> None:
    policy = Policy(rules({"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}/*"]}))
    assert policy.decide(Request("gw-*", "sas-token", device="gw-*/module-a")).allowed
    assert not policy.decide(Request("gw-*", "sas-token", device="gw-7/module-a")).allowed


def test_wildcard_principals_and_devices_match_as_globs() -> None:
    policy = Policy(rules({"principals": ["gateway-*"], "operations": ["sas-token"], "devices": ["line3-*"]}))
    assert policy.decide(Request("gateway-7", "sas-token", device="line3-press")).allowed
    assert not policy.decide(Request("gateway-7", "sas-token", device="line4-press")).allowed
    assert not policy.decide(Request("sensor-7", "sas-token", device="line3-press")).allowed


def test_a_rule_covers_only_the_operations_it_lists() -> None:
    policy = Policy(rules(OWN_DEVICE))
    assert not policy.decide(Request("leaf-1", "registration", device="leaf-1", key="leaf-1")).allowed


def test_a_rule_without_keys_allows_only_the_key_the_service_chose() -> None:
    policy = Policy(rules({"principals": ["*"], "operations": ["sas-token", "signature"], "devices": ["{cn}"]}))
    assert policy.decide(Request("leaf-1", "sas-token", device="leaf-1", key="leaf-1")).allowed
    assert not policy.decide(Request("leaf-1", "signature", key="leaf-1", key_named_by_caller=True)).allowed


def test_a_keys_rule_lets_a_caller_name_matching_keys() -> None:
    policy = Policy(rules({"principals": ["*"], "operations": ["signature"], "keys": ["{cn}", "shared-*"]}))
    assert policy.decide(Request("leaf-1", "signature", key="leaf-1", key_named_by_caller=True)).allowed
    assert policy.decide(Request("leaf-1", "signature", key="shared-jwt", key_named_by_caller=True)).allowed
    assert not policy.decide(Request("leaf-1", "signature", key="leaf-2", key_named_by_caller=True)).allowed


def test_a_keys_rule_also_bounds_the_key_the_service_chose() -> None:
    policy = Policy(rules({"principals": ["*"], "operations": ["sas-token"], "devices": ["*"], "keys": ["pool-*"]}))
    assert policy.decide(Request("gw", "sas-token", device="leaf-1", key="pool-leaf-1")).allowed
    assert not policy.decide(Request("gw", "sas-token", device="leaf-1", key="leaf-1")).allowed


def test_an_operation_on_a_device_needs_a_devices_pattern() -> None:
    policy = Policy(rules({"principals": ["*"], "operations": ["sas-token"], "keys": ["*"]}))
    assert not policy.decide(Request("leaf-1", "sas-token", device="leaf-1", key="leaf-1")).allowed


def test_the_first_matching_rule_is_named_in_the_decision() -> None:
    policy = Policy(rules({"principals": ["other"], "operations": ["*"], "devices": ["*"]}, OWN_DEVICE))
    assert policy.decide(Request("leaf-1", "sas-token", device="leaf-1", key="leaf-1")).reason == "policy rule 1"
