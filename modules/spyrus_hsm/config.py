"""Configuration: one typed object, read from YAML, overridden by the environment, validated
once. Errors name the key and the file.

    hsm:
      module: /usr/lib/softhsm/libsofthsm2.so   # SPYRUS_HSM_PKCS11_MODULE
      token_label: edge                          # SPYRUS_HSM_TOKEN_LABEL
      token_serial: null
      pin_file: /run/secrets/spyrus-hsm-pin      # SPYRUS_HSM_PIN_FILE
      workers: 4
      call_timeout: 10
      queue_limit: 256
      sync_mode: worker      # or inline: sync calls on the caller's thread, no per-call timeout
    state_dir: /var/lib/spyrus-hsm
    sas:
      default_ttl: 3600
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .hsm import PoolSettings, TokenSelector

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
ENV_CONFIG = "SPYRUS_HSM_CONFIG"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and where it came from."""


@dataclass(frozen=True)
class HsmConfig:
    module: str = DEFAULT_MODULE
    token_label: str | None = None
    token_serial: str | None = None
    pin_file: str | None = None
    workers: int = 4
    call_timeout: float = 10.0
    queue_limit: int = 256
    sync_mode: str = "worker"

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(
            module_path=self.module,
            token=TokenSelector(self.token_label, self.token_serial),
            workers=self.workers,
            call_timeout=self.call_timeout,
            queue_limit=self.queue_limit,
            sync_mode="inline" if self.sync_mode == "inline" else "worker",
        )


@dataclass(frozen=True)
class SasConfig:
    default_ttl: int = 3600


@dataclass(frozen=True)
class CloudConfig:
    """The module's own Azure identity: through DPS (id_scope set) or straight to a hub."""
    server_ca_file: str | None = None   # trust anchor for the endpoints (default: system CAs)
    provisioning_host: str = "global.azure-devices-provisioning.net"
    id_scope: str | None = None
    registration_id: str | None = None
    attestation: str = "symmetricKey"   # or x509
    key: str | None = None              # HSM key label (SAS) or X.509 credential label
    group: bool = False
    hub: str | None = None              # without DPS: the IoT Hub host name ...
    device_id: str | None = None        # ... and the identity to connect as
    module_id: str | None = None
    sas_ttl: int = 3600
    registration_timeout: float = 120.0

    @property
    def enabled(self) -> bool:
        return bool(self.id_scope or self.hub)


@dataclass(frozen=True)
class Config:
    hsm: HsmConfig = field(default_factory=HsmConfig)
    sas: SasConfig = field(default_factory=SasConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    state_dir: str = "/var/lib/spyrus-hsm"
    source: str = "defaults"


_SECTIONS: dict[str, type[Any]] = {"hsm": HsmConfig, "sas": SasConfig, "cloud": CloudConfig}
_ENV = {
    "SPYRUS_HSM_PKCS11_MODULE": ("hsm", "module"),
    "SPYRUS_HSM_TOKEN_LABEL": ("hsm", "token_label"),
    "SPYRUS_HSM_PIN_FILE": ("hsm", "pin_file"),
}


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         require_token: bool = True) -> Config:
    """Config from `path` (or $SPYRUS_HSM_CONFIG, or defaults), then environment overrides.

    require_token=False allows no token selection (for `token init`, which names its own).
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = path
        data = _read_yaml(Path(path))
    cfg = _from_mapping(data, source)
    for var, (section, key) in _ENV.items():
        if env.get(var):
            cfg = _override(cfg, section, key, env[var], f"environment variable {var}")
    _validate(cfg, require_token)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _from_mapping(data: Mapping[str, Any], source: str) -> Config:
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, f"{key}", source)
        elif key == "state_dir":
            kwargs[key] = _typed(str, value, key, source)
        else:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(_SECTIONS)}, state_dir)")
    return Config(**kwargs)


def _section(cls: type[Any], value: Any, name: str, source: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}.{key}' (known: {', '.join(known)})")
        kwargs[key] = _typed(_field_type(cls, key), item, f"{name}.{key}", source)
    return cls(**kwargs)


def _field_type(cls: type[Any], key: str) -> type[Any]:
    default = getattr(cls(), key)
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return type(default)
    return str


def _typed(kind: type[Any], value: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _override(cfg: Config, section: str, key: str, value: str, source: str) -> Config:
    sec = getattr(cfg, section)
    return replace(cfg, **{section: replace(sec, **{key: _typed(str, value, key, source)})})


def _validate(cfg: Config, require_token: bool) -> None:
    h = cfg.hsm
    where = cfg.source
    if require_token and not h.token_label and not h.token_serial:
        raise ConfigError(
            f"{where}: no token selected; set hsm.token_label (or SPYRUS_HSM_TOKEN_LABEL) "
            "or hsm.token_serial"
        )
    if not 1 <= h.workers <= 64:
        raise ConfigError(f"{where}: 'hsm.workers' must be between 1 and 64, got {h.workers}")
    if not 0.1 <= h.call_timeout <= 300:
        raise ConfigError(f"{where}: 'hsm.call_timeout' must be 0.1 to 300 seconds")
    if h.sync_mode not in ("worker", "inline"):
        raise ConfigError(f"{where}: 'hsm.sync_mode' must be 'worker' or 'inline', got {h.sync_mode!r}")
    if not 1 <= h.queue_limit <= 100_000:
        raise ConfigError(f"{where}: 'hsm.queue_limit' must be 1 to 100000")
    if not 60 <= cfg.sas.default_ttl <= 365 * 24 * 3600:
        raise ConfigError(f"{where}: 'sas.default_ttl' must be 60 s to 1 year")
    c = cfg.cloud
    if c.attestation not in ("symmetricKey", "x509"):
        raise ConfigError(f"{where}: 'cloud.attestation' must be symmetricKey or x509, got {c.attestation!r}")
    if c.id_scope and not c.registration_id:
        raise ConfigError(f"{where}: 'cloud.id_scope' needs 'cloud.registration_id'")
    if c.hub and not c.device_id:
        raise ConfigError(f"{where}: 'cloud.hub' needs 'cloud.device_id'")
    if c.enabled and not c.key:
        raise ConfigError(f"{where}: 'cloud.key' must name the HSM key or X.509 credential to use")
