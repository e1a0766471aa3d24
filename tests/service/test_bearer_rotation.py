"""A bearer token is rotated without downtime: `service.bearer_tokens` takes a list of digests per
principal, every one accepted as that principal, so the new token is added (restart), the leaf
moved to it, and the old one removed (restart). Over real HTTPS with the session's SoftHSM token;
the config is read from YAML as the config file's `service` section is."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_harness import ServiceHarness, new_leaf, problem_type, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.config import ConfigError, service_section
from spyrus_hsm.hsm import Hsm

POLICY = [{"principals": ["{cn}"], "operations": ["sas-token"], "devices": ["{cn}"]}]


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bearer_tokens(text: str) -> dict[str, tuple[str, ...]]:
    section = yaml.safe_load(text)["service"]
    return service_section({**section, "tls_cert_file": "x", "tls_key_file": "y"}, "config.yaml").bearer_tokens


def _ask(svc: ServiceHarness, device: str, token: str) -> tuple[int, Any]:
    """The status and body of a token request, the body's short problem type put in for a refusal."""
    status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=token)
    return status, (body if status == 200 else problem_type(headers, body))


def test_a_principal_with_two_digests_is_served_with_either_token_then_only_the_new_one(
        hsm: Hsm, tmp_path: Path) -> None:
    leaf = new_leaf(hsm, "rotating")
    old, new = leaf.bearer, secrets.token_urlsafe(32)
    pki = EmulatorPki(tmp_path / "pki")
    during = _bearer_tokens(f"service:\n  bearer_tokens:\n    {leaf.name}:\n"
                            f"      - {_sha(old)}\n      - {_sha(new)}\n")
    assert during == {leaf.name: (_sha(old), _sha(new))}
    (tmp_path / "during").mkdir()
    (tmp_path / "after").mkdir()
    with ServiceHarness(hsm, tmp_path / "during", pki, policy=POLICY, bearer_tokens=during) as svc:
        for token in (old, new):
            status, body = _ask(svc, leaf.name, token)
            assert status == 200, body
            verify_sas(body["token"], leaf.key)
        status, body = _ask(svc, leaf.name, secrets.token_urlsafe(32))
        assert (status, body) == (401, "invalid-token")

    after = _bearer_tokens(f"service:\n  bearer_tokens:\n    {leaf.name}: [{_sha(new)}]\n")
    with ServiceHarness(hsm, tmp_path / "after", pki, policy=POLICY, bearer_tokens=after) as svc:
        status, body = _ask(svc, leaf.name, new)
        assert status == 200, body
        verify_sas(body["token"], leaf.key)
        status, body = _ask(svc, leaf.name, old)
        assert (status, body) == (401, "invalid-token")


def test_a_single_digest_string_is_still_accepted() -> None:
    digest = _sha("t")
    assert _bearer_tokens(f"service:\n  bearer_tokens:\n    gw: {digest.upper()}\n") == {"gw": (digest,)}


@pytest.mark.parametrize(("value", "says"), [
    ("[]", "is an empty list"),
    ("[abc]", "64 hex digits, or a list of them"),
    ("not-a-digest", "never the token itself"),
    ("{a: b}", "64 hex digits"),
])
def test_a_bad_digest_list_names_the_principal(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _bearer_tokens(f"service:\n  bearer_tokens:\n    gw: {value}\n")
    assert "'service.bearer_tokens.gw'" in str(err.value) and says in str(err.value)
