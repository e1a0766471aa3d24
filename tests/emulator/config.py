"""The standalone emulator's YAML configuration, validated once with errors naming key and file.

Example (paths are relative to the YAML file)::

    hub_hostname: 127.0.0.1        # default: --host
    id_scope: 0ne00000001
    port: 8883
    tls: {cert: server.pem, key: server.key}   # default: generate a test PKI in pki_dir
    pki_dir: ../.state/emulator-pki            # root-ca.pem there is the clients' CA
    dps: {polls_before_assigned: 1}
    devices:
      - id: demo-device
        symmetric_key_file: demo-device.key    # or symmetric_key: <base64> / x509_ca: ca.pem
        secondary_key: <base64>                # optional
        modules:
          - {id: spyrus_hsm, symmetric_key: <base64>}
    enrollments:
      - registration_id: reg1                  # an individual enrollment ...
        symmetric_key: <base64>
        device_id: edge-reg1                   # optional; also assigned_hub, payload
      - group: fleet                           # ... or an enrollment group
        x509_ca: fleet-ca.pem
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core import Emulator
from .dps import ECHO
from .pki import EmulatorPki


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


_TOP_KEYS = {"hub_hostname", "id_scope", "port", "tls", "pki_dir", "dps", "devices", "enrollments"}
_CREDENTIAL_KEYS = {"symmetric_key", "symmetric_key_file", "secondary_key", "x509_ca"}


@dataclass
class EmulatorConfig:
    source: Path
    hub_hostname: str | None = None
    id_scope: str = "0ne00000001"
    port: int = 8883
    tls_cert: Path | None = None
    tls_key: Path | None = None
    pki_dir: Path | None = None
    polls_before_assigned: int = 1
    devices: list[dict[str, Any]] = field(default_factory=list)
    enrollments: list[dict[str, Any]] = field(default_factory=list)


def load_config(path: Path) -> EmulatorConfig:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    check = _Checker(path)
    check.mapping(data, "", _TOP_KEYS)
    tls = data.get("tls") or {}
    check.mapping(tls, "tls", {"cert", "key"})
    if bool(tls.get("cert")) != bool(tls.get("key")):
        raise check.error("tls", "give both cert and key, or neither (a test PKI is generated)")
    dps = data.get("dps") or {}
    check.mapping(dps, "dps", {"polls_before_assigned"})
    config = EmulatorConfig(
        source=path,
        hub_hostname=check.optional_str(data, "hub_hostname"),
        id_scope=check.optional_str(data, "id_scope") or "0ne00000001",
        port=check.integer(data, "port", 8883),
        tls_cert=check.path(tls, "tls.cert"),
        tls_key=check.path(tls, "tls.key"),
        pki_dir=check.path(data, "pki_dir"),
        polls_before_assigned=check.integer(dps, "dps.polls_before_assigned", 1),
    )
    for i, device in enumerate(check.sequence(data, "devices")):
        config.devices.append(check.device(device, f"devices[{i}]"))
    for i, enrollment in enumerate(check.sequence(data, "enrollments")):
        config.enrollments.append(check.enrollment(enrollment, f"enrollments[{i}]"))
    return config


def build_emulator(config: EmulatorConfig, host: str, port: int | None = None) -> Emulator:
    """An Emulator (not started) with every device, module and enrollment of ``config``."""
    try:
        return _build(config, host, port)
    except ValueError as e:  # a bad key or certificate, named by the Emulator
        raise ConfigError(f"{config.source}: {e}") from None


def _build(config: EmulatorConfig, host: str, port: int | None) -> Emulator:
    cert, key = config.tls_cert, config.tls_key
    if cert is None or key is None:
        pki_dir = config.pki_dir or config.source.parent / "emulator-pki"
        files = EmulatorPki(pki_dir).server([host, config.hub_hostname or host])
        cert, key = files.cert_file, files.key_file
    emulator = Emulator(host, server_cert=cert, server_key=key, hub_hostname=config.hub_hostname,
                        id_scope=config.id_scope, port=port or config.port)  # fmt: skip
    emulator.polls_before_assigned = config.polls_before_assigned
    for device in config.devices:
        emulator.add_device(device["id"], **_without(device, "id", "modules"))
        for module in device["modules"]:
            emulator.add_module(device["id"], module["id"], **_without(module, "id", "device_id"))
    for enrollment in config.enrollments:
        if "group" in enrollment:
            emulator.add_group_enrollment(enrollment["group"], **_without(enrollment, "group"))
        else:
            name = enrollment["registration_id"]
            emulator.add_individual_enrollment(name, **_without(enrollment, "registration_id"))
    return emulator


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


class _Checker:
    """Validation helpers that turn every problem into ``ConfigError('file: key: ...')``."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key or 'top level'}: {message}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> None:
        if not isinstance(value, dict):
            raise self.error(key, "must be a mapping")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.error(key, f"unknown keys {unknown}; allowed: {sorted(allowed)}")

    def sequence(self, data: dict[str, Any], key: str) -> list[Any]:
        value = data.get(key) or []
        if not isinstance(value, list):
            raise self.error(key, "must be a list")
        return value

    def optional_str(self, data: dict[str, Any], key: str, label: str | None = None) -> str | None:
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise self.error(label or key, "must be a non-empty string")
        return value

    def required_str(self, data: dict[str, Any], key: str, where: str) -> str:
        value = self.optional_str(data, key, f"{where}.{key}")
        if value is None:
            raise self.error(f"{where}.{key}", "is required")
        return value

    def integer(self, data: dict[str, Any], key: str, default: int) -> int:
        value = data.get(key.rsplit(".", 1)[-1], default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.error(key, "must be a non-negative integer")
        return value

    def path(self, data: dict[str, Any], key: str) -> Path | None:
        value = self.optional_str(data, key.rsplit(".", 1)[-1], key)
        return None if value is None else (self.source.parent / value)

    def readable(self, data: dict[str, Any], key: str, where: str) -> str | None:
        if key not in data:
            return None
        path = self.source.parent / str(self.optional_str(data, key, f"{where}.{key}"))
        try:
            return path.read_text().strip()
        except OSError as e:
            raise self.error(f"{where}.{key}", f"cannot read {path}: {e}") from None

    def credential(self, data: dict[str, Any], where: str) -> dict[str, Any]:
        key = self.optional_str(data, "symmetric_key", f"{where}.symmetric_key")
        key_file = self.readable(data, "symmetric_key_file", where)
        ca = self.readable(data, "x509_ca", where)
        given = [k for k in ("symmetric_key", "symmetric_key_file", "x509_ca") if k in data]
        if len(given) != 1:
            raise self.error(where, "give exactly one of symmetric_key, symmetric_key_file, "
                             f"x509_ca (found {given or 'none'})")  # fmt: skip
        secondary = self.optional_str(data, "secondary_key", f"{where}.secondary_key")
        credential = {"symmetric_key": key or key_file, "x509_ca_pem": ca}
        if secondary:
            credential["secondary_key"] = secondary
        return {k: v for k, v in credential.items() if v is not None}

    def device(self, data: Any, where: str) -> dict[str, Any]:
        self.mapping(data, where, {"id", "modules"} | _CREDENTIAL_KEYS)
        device_id = self.required_str(data, "id", where)
        modules = []
        for i, module in enumerate(self.sequence(data, "modules")):
            module_where = f"{where}.modules[{i}]"
            self.mapping(module, module_where, {"id"} | _CREDENTIAL_KEYS - {"x509_ca"})
            modules.append({"id": self.required_str(module, "id", module_where),
                            "device_id": device_id,
                            **self.credential(module, module_where)})  # fmt: skip
        return {"id": device_id, "modules": modules, **self.credential(data, where)}

    def enrollment(self, data: Any, where: str) -> dict[str, Any]:
        common = {"assigned_hub", "payload"} | _CREDENTIAL_KEYS
        is_group = isinstance(data, dict) and "group" in data
        name_key = "group" if is_group else "registration_id"
        allowed = common | ({"group"} if is_group else {"registration_id", "device_id"})
        self.mapping(data, where, allowed)
        entry: dict[str, Any] = {name_key: self.required_str(data, name_key, where)}
        entry["assigned_hub"] = self.optional_str(data, "assigned_hub", f"{where}.assigned_hub")
        if not is_group:
            entry["device_id"] = self.optional_str(data, "device_id", f"{where}.device_id")
        entry["payload"] = data.get("payload", ECHO)
        return {**entry, **self.credential(data, where)}
