"""aziot without a token: whatever the labels, paths and PIN hold, the rendered text is TOML that
reads back to the same values, and the PIN reads back from its URI unchanged; a provisioning
asked for with options that contradict or miss each other is refused, naming what to give."""

from __future__ import annotations

import tomllib
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spyrus_hsm.aziot import AziotOptionsError, Provisioning, pin_value, provisioning, render
from spyrus_hsm.errors import Kind

TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)


@given(token=TEXT, label=TEXT, lib=TEXT, hub=TEXT, pin=TEXT)
def test_any_names_and_pin_read_back_from_the_toml(token: str, label: str, lib: str, hub: str, pin: str) -> None:
    prov = Provisioning(source="manual", method="sas", key_label=label, hub=hub, device_id=label)
    doc = tomllib.loads(render(lib, token, prov, pin_value(pin)))
    assert doc["aziot_keys"]["pkcs11_lib_path"] == lib
    assert (doc["provisioning"]["iothub_hostname"], doc["provisioning"]["device_id"]) == (hub, label)
    for uri in (doc["aziot_keys"]["pkcs11_base_slot"], doc["provisioning"]["authentication"]["device_id_pk"]["uri"]):
        path, sep, query = uri.partition("?")
        assert sep and query.startswith("pin-value=") and "&" not in query
        assert unquote(query[len("pin-value="):]) == pin
        assert "?" not in path and "#" not in path
        attrs = dict(item.split("=", 1) for item in path[len("pkcs11:"):].split(";"))
        assert unquote(attrs["token"]) == token
        if "object" in attrs:
            assert unquote(attrs["object"]) == label


def test_the_printed_form_has_the_placeholder_and_says_why() -> None:
    prov = Provisioning(source="dps", method="x509", key_label="id", id_scope="0ne1", registration_id="r",
                        identity_cert="/etc/aziot/id.pem")
    text = render("/usr/lib/p11.so", "edge", prov)
    doc = tomllib.loads(text)
    attestation = doc["provisioning"]["attestation"]
    assert attestation == {"method": "x509", "registration_id": "r", "identity_cert": "file:///etc/aziot/id.pem",
                           "identity_pk": "pkcs11:token=edge;object=id;type=private?pin-value=<PIN>"}
    assert "write the real file with --out" in text


@pytest.mark.parametrize(("options", "says"), [
    ({"sas_key": "k"}, "give --id-scope and --registration-id (DPS) or --hub and --device-id (manual)"),
    ({"id_scope": "0ne1", "registration_id": "r", "hub": "h", "device_id": "d", "sas_key": "k"},
     "give --id-scope and --registration-id (DPS) or --hub and --device-id (manual)"),
    ({"id_scope": "0ne1", "sas_key": "k"}, "--id-scope needs --registration-id"),
    ({"hub": "h", "sas_key": "k"}, "--hub needs --device-id"),
    ({"hub": "h", "device_id": "d", "x509": "id"}, "--x509 needs --identity-cert"),
    ({"hub": "h", "device_id": "d"}, "give --x509 or --sas-key"),
], ids=["no target", "two targets", "scope alone", "hub alone", "x509 without its file", "no credential"])
def test_options_that_contradict_or_miss_each_other_are_a_usage_error(options: dict[str, str], says: str) -> None:
    with pytest.raises(AziotOptionsError) as raised:
        provisioning(**options)
    assert raised.value.kind is Kind.USAGE and str(raised.value).startswith(says)


def test_complete_options_give_the_provisioning_they_name() -> None:
    assert provisioning(id_scope="0ne1", registration_id="r", x509="id", identity_cert="/c.pem") == Provisioning(
        source="dps", method="x509", key_label="id", id_scope="0ne1", registration_id="r", identity_cert="/c.pem")
    assert provisioning(hub="h", device_id="d", sas_key="k") == Provisioning(
        source="manual", method="sas", key_label="k", hub="h", device_id="d")
