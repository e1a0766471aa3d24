"""The `metrics`, `logging` and `events` sections of the config file: defaults, and refusals
that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spyrus_hsm import config


def load(tmp_path: Path, document: dict[str, Any], env: dict[str, str] | None = None) -> config.Config:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"hsm": {"token_label": "t"}, **document}))
    return config.load(str(path), env=env or {})


def test_defaults_serve_metrics_on_9600_on_every_interface_and_send_events(tmp_path: Path) -> None:
    cfg = load(tmp_path, {})
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "0.0.0.0", 9600)
    assert cfg.logging.format == "auto"
    assert (cfg.events.enabled, cfg.events.output, cfg.events.summary_interval) == (True, "events", 60.0)


def test_the_sections_are_read_and_the_log_format_can_come_from_the_environment(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"metrics": {"host": "127.0.0.1", "port": 9601}, "logging": {"format": "json"},
                          "events": {"summary_interval": 5, "buffer": 10}},
               env={"SPYRUS_HSM_LOG_FORMAT": "iotedge"})
    assert (cfg.metrics.host, cfg.metrics.port, cfg.logging.format) == ("127.0.0.1", 9601, "iotedge")
    assert (cfg.events.summary_interval, cfg.events.buffer) == (5.0, 10)


@pytest.mark.parametrize(("document", "named"), [
    ({"metrics": {"port": 70000}}, "metrics.port"),
    ({"logging": {"format": "xml"}}, "logging.format"),
    ({"events": {"summary_interval": 0}}, "events.summary_interval"),
    ({"events": {"buffer": 0}}, "events.buffer"),
    ({"events": {"output": "a/b"}}, "events.output"),
    ({"events": {"expiry_warning_days": 0}}, "events.expiry_warning_days"),
    ({"events": {"colour": "red"}}, "events.colour"),
])
def test_invalid_settings_are_refused_naming_the_key(tmp_path: Path, document: dict[str, Any], named: str) -> None:
    with pytest.raises(config.ConfigError, match=named.replace(".", r"\.")):
        load(tmp_path, document)
