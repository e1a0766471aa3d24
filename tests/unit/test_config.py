"""Configuration: YAML plus environment overrides, validated once, errors naming key and file."""

from pathlib import Path

import pytest

from spyrus_hsm.config import ConfigError, load


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_file_values_and_environment_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "hsm:\n  token_label: a\n  workers: 2\n  call_timeout: 3\nsas:\n  default_ttl: 600\n")
    cfg = load(path, env={"SPYRUS_HSM_TOKEN_LABEL": "b", "SPYRUS_HSM_PIN_FILE": "/run/pin",
                          "SPYRUS_HSM_PKCS11_MODULE": "/opt/vendor.so"})
    assert (cfg.hsm.token_label, cfg.hsm.pin_file, cfg.hsm.module) == ("b", "/run/pin", "/opt/vendor.so")
    assert (cfg.hsm.workers, cfg.hsm.call_timeout, cfg.sas.default_ttl) == (2, 3.0, 600)


def test_config_path_comes_from_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "hsm:\n  token_label: from-env-file\n")
    assert load(None, env={"SPYRUS_HSM_CONFIG": path}).hsm.token_label == "from-env-file"


@pytest.mark.parametrize("text, fragment", [
    ("hsm:\n  token_label: a\n  wrokers: 2\n", "unknown key 'hsm.wrokers'"),
    ("hsm:\n  token_label: a\n  workers: many\n", "'hsm.workers' must be int"),
    ("hsm:\n  token_label: a\n  workers: 0\n", "'hsm.workers' must be between"),
    ("hsm:\n  token_label: a\n  sync_mode: fast\n", "'hsm.sync_mode'"),
    ("hsm: [1, 2]\n", "'hsm' must be a mapping"),
    ("hsm:\n  token_label: a\n: bad: yaml\n", "not valid YAML"),
    ("other: 1\n", "unknown key 'other'"),
    ("hsm:\n  module: /x.so\n", "no token selected"),
    ("hsm:\n  token_label: a\nedge:\n  sas_ttl: 120\n", "'edge.sas_ttl' must be 130 s"),
])
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert fragment in str(info.value) and path in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "nope.yaml"), env={})


def test_token_init_needs_no_token_selection(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "hsm:\n  module: /x.so\n"), env={}, require_token=False).hsm.module == "/x.so"


def test_the_edgehub_token_lifetime_is_read_from_the_edge_section(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "hsm:\n  token_label: a\n"), env={}).edge.sas_ttl == 3600
    assert load(_write(tmp_path, "hsm:\n  token_label: a\nedge:\n  sas_ttl: 900\n"), env={}).edge.sas_ttl == 900


def _bounded_keys() -> list[tuple[str, str, object, object]]:
    """(section, key, a value just below, one just above) for every key declared with bounds."""
    import dataclasses

    from spyrus_hsm import config

    out = []
    for name, cls in config._SECTIONS.items():
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("bounds")
            if rule is not None:
                step = 1 if isinstance(f.default, int) else 0.01
                low = None if rule.low is None else rule.low - (0 if rule.above else step)
                high = None if rule.high is None else rule.high + (0 if rule.below else step)
                out.append((name, f.name, low, high))
    return out


@pytest.mark.parametrize("section, key, low, high", _bounded_keys(), ids=lambda v: str(v))
def test_a_bounded_key_refuses_values_just_outside_its_range(tmp_path: Path, section: str, key: str,
                                                              low: object, high: object) -> None:
    import yaml

    needed = {"hsm": {"token_label": "a"}, "service": {"tls_cert_file": "c.pem", "tls_key_label": "k"}}
    for value in (v for v in (low, high) if v is not None):
        document = {"hsm": needed["hsm"], section: {**needed.get(section, {}), key: value}}
        with pytest.raises(ConfigError, match=f"'{section}.{key}' must be .*, got {value}"):
            load(_write(tmp_path, yaml.safe_dump(document)))



def test_each_value_records_where_it_came_from(tmp_path: Path) -> None:
    path = _write(tmp_path, "hsm:\n  module: /opt/file.so\n  token_label: a\n  pin_file: /run/pin\nstate_dir: /s\n")
    cfg = load(path, env={"SPYRUS_HSM_PKCS11_MODULE": "/opt/env.so", "SPYRUS_HSM_PCSCD": "internal",
                          "SPYRUS_HSM_PIN_FILE": "/run/pin"})
    assert str(cfg.origin("hsm.module")) == ("environment SPYRUS_HSM_PKCS11_MODULE; "
                                            "the file's '/opt/file.so' is not used")
    assert str(cfg.origin("hsm.pcscd")) == "environment SPYRUS_HSM_PCSCD"  # the file does not set it
    assert str(cfg.origin("hsm.pin_file")) == "environment SPYRUS_HSM_PIN_FILE"  # the same value: nothing lost
    assert str(cfg.origin("hsm.token_label")) == f"file {path}" and str(cfg.origin("state_dir")) == f"file {path}"
    assert str(cfg.origin("hsm.token_serial")) == "default"
    assert cfg == load(path, env={"SPYRUS_HSM_PKCS11_MODULE": "/opt/env.so", "SPYRUS_HSM_PCSCD": "internal"})
