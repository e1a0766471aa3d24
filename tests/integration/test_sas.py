"""SAS tokens minted in the HSM, checked by independent HMAC and by the SDK's own parser."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from urllib.parse import parse_qs, quote

import pytest
from azure.iot.device.common.auth.sastoken import RenewableSasToken, get_sastoken_info_from_string
from token_matrix import HMAC_IMPORT, needs

from spyrus_hsm.hsm import Hsm, Secret
from spyrus_hsm.identity import sas

# SAS tokens are HMACs made in the token with an imported key: on every token of the matrix.
pytestmark = [pytest.mark.token_matrix, needs(HMAC_IMPORT)]


def _verify(token: str, key: bytes) -> dict[str, str]:
    """Check a SAS token the way IoT Hub does; returns its fields."""
    assert token.startswith("SharedAccessSignature ")
    fields = {k: v[0] for k, v in parse_qs(token[len("SharedAccessSignature "):]).items()}
    expected = base64.b64encode(hmac.new(
        key, f"{quote(fields['sr'], safe='')}\n{fields['se']}".encode(), hashlib.sha256).digest()).decode()
    assert hmac.compare_digest(fields["sig"], expected)
    return fields


@pytest.fixture
def device_key(hsm: Hsm, label: str) -> bytes:
    key = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(key))
    return key


def test_device_token_verifies_and_parses_with_the_sdk(hsm: Hsm, label: str, device_key: bytes) -> None:
    before = int(time.time())
    tok = sas.SasMinter(hsm).mint(label, sas.device_uri("hub.example", "dev-1"), 3600)
    fields = _verify(tok.token, device_key)
    assert fields["sr"] == "hub.example/devices/dev-1"
    assert before + 3600 <= int(fields["se"]) <= int(time.time()) + 3600
    info = get_sastoken_info_from_string(tok.token)
    assert info["sr"] == quote("hub.example/devices/dev-1", safe="") and info["se"] == str(tok.expires_on)


def test_module_token_names_the_module(hsm: Hsm, label: str, device_key: bytes) -> None:
    tok = sas.SasMinter(hsm).mint(label, sas.device_uri("hub.example", "dev-1", "mod-a"), 600)
    assert _verify(tok.token, device_key)["sr"] == "hub.example/devices/dev-1/modules/mod-a"


@pytest.mark.parametrize("key_name", [None, "registration"])
def test_dps_token_with_and_without_skn(hsm: Hsm, label: str, device_key: bytes, key_name: str | None) -> None:
    tok = sas.SasMinter(hsm).mint(label, sas.dps_uri("0ne0001", "reg-1"), 600, key_name)
    fields = _verify(tok.token, device_key)
    assert fields["sr"] == "0ne0001/registrations/reg-1"
    assert fields.get("skn") == key_name


def test_any_resource_uri_is_signed_as_given(hsm: Hsm, label: str, device_key: bytes) -> None:
    uri = "hub.example/devices/odd id/with?chars&more"
    assert _verify(sas.SasMinter(hsm).mint(label, uri, 600).token, device_key)["sr"] == uri


def test_async_minting_matches(hsm: Hsm, label: str, device_key: bytes) -> None:
    import asyncio

    tok = asyncio.run(sas.SasMinter(hsm).amint(label, "h/devices/d", 600))
    _verify(tok.token, device_key)


@pytest.mark.parametrize("ttl", [0, 59, 366 * 24 * 3600])
def test_ttl_out_of_bounds_is_refused(hsm: Hsm, label: str, device_key: bytes, ttl: int) -> None:
    with pytest.raises(sas.SasError, match="ttl"):
        sas.SasMinter(hsm).mint(label, "h/devices/d", ttl)


def test_sdk_renewable_token_renews_through_the_hsm(hsm: Hsm, label: str, device_key: bytes) -> None:
    mech = sas.HsmSigningMechanism(hsm, label)
    token = RenewableSasToken("hub.example/devices/dev-2", mech, ttl=120)
    first, first_expiry = str(token), token.expiry_time
    _verify(first, device_key)
    token.ttl = 3600  # a later expiry at once, instead of waiting for the clock to tick
    token.refresh()
    assert token.expiry_time > first_expiry and str(token) != first
    _verify(str(token), device_key)


def test_group_enrollment_key_is_derived_inside_the_hsm(hsm: Hsm, label: str) -> None:
    group_key = secrets.token_bytes(64)
    hsm.import_secret_key(label, Secret(group_key))
    derived_label = label + "-reg-7"
    hsm.derive_hmac_key(label, b"reg-7", derived_label)
    expected_device_key = hmac.new(group_key, b"reg-7", hashlib.sha256).digest()
    tok = sas.SasMinter(hsm).mint(derived_label, sas.dps_uri("0ne0001", "reg-7"), 600)
    _verify(tok.token, expected_device_key)
    info = next(o for o in hsm.list_objects() if o.label == derived_label)
    assert (info.sensitive, info.extractable) == (True, False)
    assert hsm.secret_key_value_readable(derived_label) is False


def test_token_repr_hides_the_signature(hsm: Hsm, label: str, device_key: bytes) -> None:
    tok = sas.SasMinter(hsm).mint(label, "h/devices/d", 600)
    sig = parse_qs(tok.token.split(" ", 1)[1])["sig"][0]
    assert sig not in repr(tok) and sig not in str(tok)
