"""The configuration of a serial token (hsm.serial) and of the token cache (refresh-ahead, bound)."""

from pathlib import Path

import pytest

from spyrus_hsm.config import ConfigError, load
from spyrus_hsm.hsm.pool import HsmPool

SERVICE = "service:\n  tls_key_label: srv\n"


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.yaml"
    p.write_text("hsm:\n  token_label: a\n" + text)
    return load(str(p), env={})


def test_a_serial_token_gets_one_worker_whatever_workers_says(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "  serial: true\n  workers: 8\n" + SERVICE + "  cache_min_remaining_fraction: 0.1\n"
                          "  cache_max_entries: 1000\n")
    settings = cfg.hsm.pool_settings()
    assert settings.serial and settings.workers == 8
    assert (cfg.service.cache_min_remaining_fraction, cfg.service.cache_max_entries) == (0.1, 1000)
    assert HsmPool(settings, lambda: None).workers == 1  # type: ignore[arg-type,return-value]
    assert not _load(tmp_path, "").hsm.pool_settings().serial


@pytest.mark.parametrize("text, fragment", [
    ("  serial: yes please\n", "'hsm.serial' must be bool"),
    (SERVICE + "  cache_min_remaining_fraction: 0\n", "'service.cache_min_remaining_fraction' must be above 0"),
    (SERVICE + "  cache_min_remaining_fraction: 1\n", "'service.cache_min_remaining_fraction' must be above 0"),
    (SERVICE + "  cache_max_entries: 0\n", "'service.cache_max_entries' must be 1 to"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _load(tmp_path, text)
