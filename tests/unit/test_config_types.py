"""Configuration types come from the dataclass annotations: YAML's guesses (a serial read as an
octal number, `yes` read as a boolean) are refused with the key and the file, never converted."""

from pathlib import Path

import pytest

from spyrus_hsm.config import Config, ConfigError, load


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load(str(path), env={})


def _refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path), env={})
    message = str(info.value)
    assert str(path) in message
    return message


def test_a_serial_that_yaml_reads_as_an_octal_number_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, "hsm:\n  token_serial: 01234567\n")
    assert "'hsm.token_serial' must be a string" in message and "quotes" in message


@pytest.mark.parametrize("value", ["12345678", "1.5", "yes", "false"])
def test_a_number_or_boolean_where_a_string_is_meant_is_refused(tmp_path: Path, value: str) -> None:
    assert "'hsm.token_label' must be a string" in _refused(tmp_path, f"hsm:\n  token_label: {value}\n")


def test_a_quoted_serial_is_kept_as_written(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'hsm:\n  token_serial: "01234567"\n')
    assert cfg.hsm.token_serial == "01234567"


def test_an_enum_accepts_only_its_values(tmp_path: Path) -> None:
    base = "hsm:\n  token_label: a\ncloud:\n  attestation: "
    assert _load(tmp_path, base + "x509\n").cloud.attestation == "x509"
    assert "'cloud.attestation' must be one of symmetricKey, x509, got 'X509'" in _refused(tmp_path, base + "X509\n")


def test_a_boolean_is_not_a_number_and_a_number_is_not_a_boolean(tmp_path: Path) -> None:
    assert "'hsm.workers' must be int, got True" in _refused(tmp_path, "hsm:\n  token_label: a\n  workers: true\n")
    assert "'cloud.group' must be bool, got 1" in _refused(tmp_path, "hsm:\n  token_label: a\ncloud:\n  group: 1\n")


def test_an_integer_is_taken_where_a_float_is_meant(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "hsm:\n  token_label: a\n  call_timeout: 3\n")
    assert cfg.hsm.call_timeout == 3.0 and isinstance(cfg.hsm.call_timeout, float)


def test_null_is_taken_only_where_the_field_may_be_none(tmp_path: Path) -> None:
    assert _load(tmp_path, "hsm:\n  token_label: a\n  pin_file: null\n").hsm.pin_file is None
    assert "'hsm.workers' must be int, not null" in _refused(tmp_path, "hsm:\n  token_label: a\n  workers:\n")


def test_top_level_state_dir_is_typed_too(tmp_path: Path) -> None:
    assert "'state_dir' must be a string" in _refused(tmp_path, "hsm:\n  token_label: a\nstate_dir: 5\n")


def test_service_keys_are_typed_from_their_annotations(tmp_path: Path) -> None:
    message = _refused(tmp_path, "hsm:\n  token_label: a\nservice:\n  tls_key_label: 42\n")
    assert "'service.tls_key_label' must be a string" in message


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_renew_at_outside_the_lifetime_is_refused(tmp_path: Path, value: str) -> None:
    text = f"hsm:\n  token_label: t\ncloud:\n  renew_at: {value}\n"
    assert "'cloud.renew_at' must be above 0 and below 1" in _refused(tmp_path, text)


def test_renew_at_is_a_fraction_of_the_lifetime(tmp_path: Path) -> None:
    assert _load(tmp_path, "hsm:\n  token_label: t\ncloud:\n  renew_at: 0.5\n").cloud.renew_at == 0.5
    assert _load(tmp_path, "hsm:\n  token_label: t\n").cloud.renew_at == 0.8
