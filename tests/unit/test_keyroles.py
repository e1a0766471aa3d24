"""Which keys a caller may name (service/keyroles.py) and the twin's policy under the file's
ceiling (service/policy.py): pure functions of the configuration and the token's inventory."""

from __future__ import annotations

import pytest

from spyrus_hsm.config import CloudConfig, ServiceConfig, service_section
from spyrus_hsm.hsm import ObjectInfo
from spyrus_hsm.service.keyroles import KeyRoles, template_pattern
from spyrus_hsm.service.policy import Policy, Request


def _service(**raw: object) -> ServiceConfig:
    return service_section({"tls_cert_file": "x", "tls_key_file": "y", **raw}, "test")


def _obj(label: str, type_: str) -> ObjectInfo:
    return ObjectInfo(label, "01", type_, None, True, False)


@pytest.mark.parametrize("template, label, produced", [
    ("{deviceId}", "anything at all", True),
    ("sas-{deviceId}", "sas-line3-press", True),
    ("sas-{deviceId}", "sign-line3-press", False),
    ("{registrationId}.operational", "r1.operational", True),
    ("{registrationId}.operational", "r1Xoperational", False),  # the dot is literal
    ("dev[1]-{deviceId}", "dev[1]-x", True),                     # so are glob characters
])
def test_a_template_names_the_labels_it_can_produce(template: str, label: str, produced: bool) -> None:
    assert bool(template_pattern(template).fullmatch(label)) is produced


ROLES = KeyRoles.of(_service(tls_key_label="api-tls", group_key="grp", sas_key="sas-{deviceId}",
                             dps_key="dps-{registrationId}", signing_keys=["*"]),
                    CloudConfig(key="me", issue_cert="me-op"))


@pytest.mark.parametrize("label, hmac, why", [
    ("api-tls", False, "it is the API's TLS key (service.tls_key_label)"),
    ("me", True, "it is the module's cloud identity (cloud.key)"),
    ("me-op", False, "it is the module's operational certificate key (cloud.issue_cert)"),
    ("grp", True, "it is a DPS group enrollment key (service.group_key)"),
    ("sas-d1", True, "service.sas_key can name it as a device's key"),
    ("dps-r1", True, "service.dps_key can name it as a device's key"),
    ("r1.operational", False, "service.leaf_cert_label can name it as a device's key"),
    ("sas-d1", False, None),  # a template for HMAC keys claims no private key
    ("jws-1", True, None),
])
def test_reserved_keys_are_never_signable_whatever_the_signing_patterns(label: str, hmac: bool,
                                                                          why: str | None) -> None:
    assert ROLES.why_not_signable(label, hmac) == why


def test_with_the_default_templates_no_hmac_key_is_signable() -> None:
    roles = KeyRoles.of(_service(signing_keys=["*"]), CloudConfig())
    assert roles.why_not_signable("anything", hmac=True) == "service.sas_key can name it as a device's key"
    assert roles.why_not_signable("anything", hmac=False) is None


def test_a_device_template_may_not_yield_a_reserved_or_signing_key() -> None:
    roles = KeyRoles.of(_service(tls_key_label="api-tls", group_key="grp", signing_keys=["jws-*"]), CloudConfig())
    assert roles.why_not_for_device("api-tls") == "it is the API's TLS key (service.tls_key_label)"
    assert roles.why_not_for_device("grp") == "it is a DPS group enrollment key (service.group_key)"
    assert roles.why_not_for_device("grp", own=roles.group_job) is None  # the group route's own key
    assert roles.why_not_for_device("jws-1") == "it is in the signing namespace (service.signing_keys)"
    assert roles.why_not_for_device("leaf-1") is None


def test_rules_and_patterns_that_would_reach_reserved_keys_are_warned_about() -> None:
    svc = _service(tls_key_label="api-tls", signing_keys=["line3-*"], policy=[
        {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]},          # names no key
        {"principals": ["gw"], "operations": ["signature"], "keys": ["line3-*"]},       # the docs' old example
        {"principals": ["gw"], "operations": ["*"], "keys": ["api-*"]},
        {"principals": ["*"], "operations": ["signature"], "keys": ["{cn}"]},           # the caller's own
    ])
    roles = KeyRoles.of(svc, CloudConfig())
    objects = [_obj("line3-press", "secret-key"), _obj("line3-cam", "private"), _obj("line3-cam", "cert"),
               _obj("line3-jws", "private"), _obj("api-tls", "private")]
    warnings = roles.warnings(svc.policy, objects)
    assert warnings == [
        "service.policy[1] keys pattern 'line3-*' matches reserved key(s) 'line3-cam' (an identity (a key with "
        "a certificate beside it)), 'line3-press' (a device's SAS/DPS key): they are never used for "
        "caller-named signing",
        "service.policy[2] keys pattern 'api-*' matches reserved key(s) 'api-tls' (the API's TLS key "
        "(service.tls_key_label)): they are never used for caller-named signing",
        "service.signing_keys pattern 'line3-*' matches reserved key(s) 'line3-cam' (an identity (a key with "
        "a certificate beside it)), 'line3-press' (a device's SAS/DPS key): they are never used for "
        "caller-named signing",
    ]
    assert KeyRoles.of(_service(), CloudConfig()).warnings((), objects) == []


FILE = service_section({"tls_cert_file": "x", "tls_key_file": "y", "policy": [
    {"principals": ["gw"], "operations": ["sas-token"], "devices": ["line3-*"]}]}, "file").policy
WIDE = service_section({"tls_cert_file": "x", "tls_key_file": "y", "policy": [
    {"principals": ["*"], "operations": ["*"], "devices": ["*"], "keys": ["*"]}]}, "twin").policy


@pytest.mark.parametrize("request_, allowed", [
    (Request("gw", "sas-token", "line3-a", "line3-a"), True),       # both allow
    (Request("gw", "sas-token", "line4-a", "line4-a"), False),      # only the twin
    (Request("other", "sas-token", "line3-a", "line3-a"), False),
    (Request("gw", "signature", None, "api-tls", True), False),
])
def test_the_twins_policy_cannot_widen_the_files(request_: Request, allowed: bool) -> None:
    assert Policy(WIDE, ceiling=FILE).decide(request_).allowed is allowed
    assert Policy(FILE, ceiling=FILE).decide(request_).allowed is allowed  # the file's own: unchanged
    assert Policy((), ceiling=FILE).decide(request_).allowed is False      # the twin can deny all
