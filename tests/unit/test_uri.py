"""RFC 7512 pkcs11: URIs: parsing, formatting and the refusal to carry secrets."""

import pytest

from spyrus_hsm.hsm.uri import Pkcs11Uri, UriError, as_uri


def test_round_trip_keeps_every_attribute() -> None:
    text = ("pkcs11:token=Edge%20Token;serial=0123;object=dev%3B1;type=private;id=%01%FF"
            "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin")
    uri = Pkcs11Uri.parse(text)
    assert (uri.token, uri.serial, uri.object) == ("Edge Token", "0123", "dev;1")
    assert (uri.type, uri.id) == ("private", b"\x01\xff")
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so" and uri.pin_source == "file:/run/pin"
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_id_is_always_percent_encoded() -> None:
    assert str(Pkcs11Uri(id=b"AB")) == "pkcs11:id=%41%42"


@pytest.mark.parametrize("text, message", [
    ("pkcs11:object=a?pin-value=1234", "pin-value is refused"),
    ("pkcs11:object=a?pin-source=/run/pin", "file: reference"),
    ("pkcs11:object=a;object=b", "appears twice"),
    ("pkcs11:type=secret", "type="),
    ("pkcs11:object", "has no value"),
    ("pkcs12:object=a", "starts with 'pkcs11:'"),
])
def test_bad_uris_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        Pkcs11Uri.parse(text)


def test_unused_standard_attributes_are_ignored_and_vendor_ones_kept() -> None:
    uri = Pkcs11Uri.parse("pkcs11:slot-id=3;object=k;x-vendor=v%20w")
    assert uri.object == "k" and uri.vendor == (("x-vendor", "v w"),)
    assert "x-vendor=v%20w" in str(uri)


def test_a_bare_label_is_an_object_reference() -> None:
    assert as_uri("edge-key", "private") == Pkcs11Uri(object="edge-key", type="private")


def test_a_reference_must_name_an_object() -> None:
    with pytest.raises(UriError, match="names no object"):
        as_uri("pkcs11:token=t")
    with pytest.raises(UriError):
        as_uri("")
