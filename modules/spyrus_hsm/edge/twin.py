"""Desired properties -> configuration (pure functions).

The desired document overlays the config file's `service` section, key by key:

    {"logLevel": "info",
     "service": {"rateLimitPerSecond": 20, "rateLimitBurst": 40, "cacheReuseFraction": 0.5,
                 "minTtlSeconds": 300, "maxTtlSeconds": 86400, "auditFailClosed": true, "auditFsync": false,
                 "policy": [{"principals": [...], "operations": [...], "devices": [...], "keys": [...]}]}}

A key absent from the twin (or deleted with null) keeps the file's value. The whole document is
validated at once, with the checks the config file gets (`config.service_section` and
`config.validate_service`); errors name the twin key. Only what `Service.reconfigure` applies
live can be set here: listeners, TLS files, bearer-token digests, the audit file and which keys
sign for devices and callers (the key templates, `signing_keys`) are read at start, so those keys
are refused with a message saying to set them in the config file. A `policy` from the twin can
only narrow the file's: a request must be allowed by both (`Service.reconfigure`'s ceiling), so
whoever can write the twin cannot grant more than the file does.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import Config, ConfigError, ServiceConfig, service_section, validate_service
from ..errors import Kind, SpyrusError

# twin key under `service` -> ServiceConfig field; all of them applied by Service.reconfigure
LIVE: dict[str, str] = {
    "rateLimitPerSecond": "rate_limit_per_second",
    "rateLimitBurst": "rate_limit_burst",
    "cacheReuseFraction": "cache_reuse_fraction",
    "minTtlSeconds": "min_ttl",
    "maxTtlSeconds": "max_ttl",
    "auditFailClosed": "audit_fail_closed",
    "auditFsync": "audit_fsync",
    "policy": "policy",
    "hub": "hub",
    "requestTimeoutSeconds": "request_timeout",
    "registrationTimeoutSeconds": "registration_timeout",
    "retryAfterSeconds": "retry_after",
}
TWIN_NAME = {field: key for key, field in LIVE.items()}
# ServiceConfig fields read once at start (listeners, TLS, HTTP limits, credentials, audit file)
# ... and which keys sign for devices and callers: the twin must not point a template or the
# signing namespace at a key with another job (service/keyroles.py)
FIXED_FIELDS = ("enabled", "host", "port", "health_host", "health_port", "tls_cert_file", "tls_key_file",
                "tls_key_label", "client_ca_file", "bearer_tokens", "max_body_bytes", "audit_file",
                "sas_key", "dps_key", "group_key", "x509_label", "leaf_cert_label", "signing_keys")
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL}
TOP_LEVEL = ("logLevel", "service", "cloud")
CLOUD_LIVE = {"renewAt": "renew_at"}  # twin key under `cloud` -> CloudConfig field


class TwinConfigError(SpyrusError, ValueError, kind=Kind.CONFIG):
    """The desired properties are not a valid configuration; the message names the twin key."""


@dataclass(frozen=True)
class TwinSettings:
    service: ServiceConfig
    log_level: str | None  # None: not set in the twin (the process keeps its own level)
    renew_at: float | None = None  # cloud.renewAt; None: the config file's cloud.renew_at


def evaluate(desired: Mapping[str, Any], base: ServiceConfig, version: int | None = None) -> TwinSettings:
    """The configuration `desired` asks for on top of `base` (the file's service section).
    Raises TwinConfigError for anything invalid: nothing is taken from a document that fails."""
    where = "module twin desired properties" + (f" (version {version})" if version is not None else "")
    doc = settings(desired)
    unknown = [k for k in doc if k not in TOP_LEVEL]
    if unknown:
        raise TwinConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(TOP_LEVEL)})")
    return TwinSettings(_service(doc.get("service"), base, where), _log_level(doc.get("logLevel"), where),
                        _renew_at(doc.get("cloud"), where))


def settings(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The desired document without twin metadata (`$version`, `$metadata`) and without nulls."""
    return {k: v for k, v in desired.items() if not k.startswith("$") and v is not None}


def _log_level(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise TwinConfigError(f"{where}: 'logLevel' must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def _renew_at(value: Any, where: str) -> float | None:
    """`cloud.renewAt`: the fraction of an operational certificate's lifetime after which it is
    renewed (the only live key of the module's cloud identity)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TwinConfigError(f"{where}: 'cloud' must be an object")
    unknown = [k for k, v in value.items() if k not in CLOUD_LIVE and v is not None]
    if unknown:
        raise TwinConfigError(f"{where}: unknown key 'cloud.{unknown[0]}' (known: {', '.join(CLOUD_LIVE)}; "
                              "the cloud identity is set in the config file)")
    renew_at = value.get("renewAt")
    if renew_at is None:
        return None
    if isinstance(renew_at, bool) or not isinstance(renew_at, int | float) or not 0 < renew_at < 1:
        raise TwinConfigError(f"{where}: 'cloud.renewAt' must be a number above 0 and below 1 (a fraction "
                              f"of the certificate's lifetime), got {renew_at!r}")
    return float(renew_at)


def _service(value: Any, base: ServiceConfig, where: str) -> ServiceConfig:
    if value is None:
        return base
    if not isinstance(value, dict):
        raise TwinConfigError(f"{where}: 'service' must be an object")
    mapping = service_mapping(base)
    for key, item in value.items():
        if item is None:
            continue
        if key in LIVE:
            mapping[LIVE[key]] = item
        elif _snake(key) in FIXED_FIELDS:
            raise TwinConfigError(
                f"{where}: 'service.{key}' cannot be set from the module twin: listeners, TLS files, "
                f"bearer-token digests, the body limit, the audit file and which keys sign for devices "
                f"and callers are read at start; set 'service.{_snake(key)}' in the config file and "
                f"restart the module")
        else:
            raise TwinConfigError(f"{where}: unknown key 'service.{key}' (known: {', '.join(LIVE)})")
    try:
        cfg = replace(service_section(mapping, where), enabled=base.enabled)
        validate_service(cfg, where)
    except ConfigError as exc:
        raise TwinConfigError(twin_names(str(exc))) from None
    return cfg


def service_mapping(cfg: ServiceConfig) -> dict[str, Any]:
    """`cfg` as the config file's `service` mapping (what `config.service_section` reads)."""
    out: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    out["policy"] = [{"principals": list(r.principals), "operations": list(r.operations),
                      "devices": list(r.devices), "keys": list(r.keys)} for r in cfg.policy]
    out["bearer_tokens"] = dict(cfg.bearer_tokens)
    out["signing_keys"] = list(cfg.signing_keys)
    return out


def twin_names(message: str) -> str:
    """A config error message with file keys ('service.min_ttl') renamed to twin keys."""
    return re.sub(r"'service\.([a-z0-9_]+)",
                  lambda m: f"'service.{TWIN_NAME.get(m.group(1), m.group(1))}", message)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def merge_patch(doc: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A new document: `patch` merged into `doc` as twins merge (objects merge, null deletes,
    anything else — arrays included — replaces)."""
    out = copy.deepcopy(dict(doc))
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- what a config-file reload can change without a restart ---------------------------------


def restart_required(running: Config, reloaded: Config) -> list[str]:
    """Keys whose new file value only takes effect after a restart (everything outside the live
    service settings), named as in the config file."""
    keys = []
    for section in ("hsm", "sas", "cloud", "edge", "metrics", "logging", "events"):
        old, new = getattr(running, section), getattr(reloaded, section)
        keys += [f"{section}.{f.name}" for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    if running.state_dir != reloaded.state_dir:
        keys.append("state_dir")
    keys += [f"service.{name}" for name in FIXED_FIELDS
             if getattr(running.service, name) != getattr(reloaded.service, name)]
    return keys


def live_changes(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    """Twin names of the live service settings that differ."""
    return [key for key, name in LIVE.items() if getattr(old, name) != getattr(new, name)]
