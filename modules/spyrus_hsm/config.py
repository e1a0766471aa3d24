"""Configuration: one typed object, read from YAML, overridden by the environment, validated
once. Errors name the key and the file (or the environment variable).

Each key's type is its field's annotation: a YAML number or boolean where a string is meant is
refused rather than converted (`token_serial: 01234567` is octal to YAML), a `Literal` lists the
values allowed, and null is accepted only where the annotation allows None.

    hsm:
      module: /usr/lib/softhsm/libsofthsm2.so   # SPYRUS_HSM_PKCS11_MODULE
      token_label: edge                          # SPYRUS_HSM_TOKEN_LABEL
      token_serial: null
      pin_file: /run/secrets/spyrus-hsm-pin      # SPYRUS_HSM_PIN_FILE
      workers: 4
      call_timeout: 10
      queue_limit: 256
      serial: false        # true for a token that executes one operation at a time (USB)
      pcscd: none          # SPYRUS_HSM_PCSCD: none | internal (serve runs pcscd) | host (/run/pcscd bound in)
    state_dir: /var/lib/spyrus-hsm
    sas:
      default_ttl: 3600
    edge:
      sas_ttl: 3600           # life of the module's own edgeHub SAS tokens (IoT Edge only)
    service:                  # the HTTP signing API for leaf devices (see ServiceConfig)
      port: 8443
      tls_cert_file: /etc/spyrus-hsm/server-chain.pem
      tls_key_label: server-tls
      client_ca_file: /etc/spyrus-hsm/leaf-ca.pem
      bearer_tokens: {gateway-3: <sha256 hex of the token>, leaf-9: [<old digest>, <new digest>]}
      policy:
        - {principals: ["*"], operations: [sas-token], devices: ["{cn}"]}
    metrics: {enabled: true, host: 0.0.0.0, port: 9600}   # Prometheus text (metrics.py)
    logging: {format: auto}      # SPYRUS_HSM_LOG_FORMAT: auto | iotedge | plain | json
    events: {enabled: true, output: events, summary_interval: 60, buffer: 1000, expiry_warning_days: 14}
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .config_fields import YEAR, as_list, check_bounds, hints, ranged, ranges_of, read_yaml, section, typed
from .config_fields import ConfigError as ConfigError  # raised by the checks in both modules
from .hsm import KeyAlgorithm, Need, PoolSettings, RefusedPins, TokenSelector

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
Which = Literal["first", "second"]  # one of two tokens (hsm.second_*), as the CLI's --token names it
ENV_CONFIG = "SPYRUS_HSM_CONFIG"
EDGE_SAS_TTL_MIN = 130
_PORT = "a TCP port (0-65535)"
_FRACTION = "above 0 and below 1 (a fraction of the certificate's lifetime)"
_EDGE_SAS_TTL = f"{EDGE_SAS_TTL_MIN} s (the SDK renews a token 120 s before it expires) to 1 year"


@dataclass(frozen=True)
class HsmConfig:
    # path of the token vendor's PKCS#11 library (SoftHSM2's by default)
    module: str = DEFAULT_MODULE
    # the token to use, by its label (this, token_serial or both must be set)
    token_label: str | None = None
    # the token to use, by its serial number (quote it in YAML: a string, not a number)
    token_serial: str | None = None
    # file holding the user PIN (its first line); must not be world-readable
    pin_file: str | None = None
    # HSM sessions, each with its own worker thread (one when `serial` is true)
    workers: int = ranged(4, 1, 64, says="between 1 and 64")
    # seconds any one HSM call may take before it is abandoned and answered as a timeout
    call_timeout: float = ranged(10.0, 0.1, 300, unit="seconds")
    # operations waiting for a worker; past it a request is refused at once (503 hsm-busy)
    queue_limit: int = ranged(256, 1, 100_000)
    serial: bool = False  # one operation at a time (a USB token): one worker, one session
    # PC/SC transport of the token (a CCID reader such as the Rosetta USB): none (SoftHSM2, or a
    # library that needs no pcscd), internal (serve supervises its own pcscd), host (the host's
    # pcscd socket, /run/pcscd, is bound in).
    pcscd: Literal["none", "internal", "host"] = "none"
    # a second token serving beside the first, by its label (docs/two-tokens.md); the
    # settings above apply to both, and each key label means that key on whichever token holds it
    second_token_label: str | None = None
    # the second token, by its serial number (quote it in YAML)
    second_token_serial: str | None = None
    # file holding the second token's user PIN (its first line); must not be world-readable
    second_pin_file: str | None = None

    @property
    def two_tokens(self) -> bool:
        return bool(self.second_token_label or self.second_token_serial)

    def token(self, which: Which) -> HsmConfig:
        """This section addressing one token only (the CLI's --token, serve's pools)."""
        only = replace(self, second_token_label=None, second_token_serial=None, second_pin_file=None)
        if which == "first":
            return only
        if not self.two_tokens:
            raise ConfigError("--token second: no second token is configured (hsm.second_token_label or "
                              "hsm.second_token_serial)")
        return replace(only, token_label=self.second_token_label, token_serial=self.second_token_serial,
                       pin_file=self.second_pin_file)

    def pool_settings(self, refused_pins: RefusedPins | None = None) -> PoolSettings:
        """`refused_pins`: where a PIN the token refused is remembered (see hsm.refusals)."""
        return PoolSettings(
            module_path=self.module,
            token=TokenSelector(self.token_label, self.token_serial),
            workers=self.workers,
            call_timeout=self.call_timeout,
            queue_limit=self.queue_limit,
            serial=self.serial,
            refused_pins=refused_pins,
        )


@dataclass(frozen=True)
class SasConfig:
    # seconds a SAS token lives when the request or command names no lifetime
    default_ttl: int = ranged(3600, 60, YEAR, says="60 s to 1 year")


@dataclass(frozen=True)
class CloudConfig:
    """The module's own Azure identity: through DPS (id_scope set) or straight to a hub."""
    server_ca_file: str | None = None   # trust anchor for the endpoints (default: system CAs)
    provisioning_host: str = "global.azure-devices-provisioning.net"  # the DPS endpoint's host name
    # through DPS: the ID scope of the provisioning service (with registration_id)
    id_scope: str | None = None
    # through DPS: the registration id of the module's own identity
    registration_id: str | None = None
    # how the module's identity proves itself: a symmetric key (SAS) or an X.509 certificate
    attestation: Literal["symmetricKey", "x509"] = "symmetricKey"
    key: str | None = None              # HSM key label (SAS) or X.509 credential label
    # `key` is a DPS group enrollment key: the device key is derived from it and registration_id
    group: bool = False
    hub: str | None = None              # without DPS: the IoT Hub host name ...
    device_id: str | None = None        # ... and the identity to connect as
    # without DPS: connect as this module of device_id (else as the device itself)
    module_id: str | None = None
    # seconds each SAS token the module signs for its own hub connection lives
    sas_ttl: int = 3600
    # seconds a DPS registration may take before it is given up
    registration_timeout: float = 120.0
    issue_cert: str | None = None       # through DPS: HSM key label of the operational certificate
    # fraction of a certificate's lifetime after which it is due for renewal
    renew_at: float = ranged(0.8, 0, 1, above=True, below=True, says=_FRACTION)
    renew_retry_initial: float = 30.0   # seconds before the first retry of a failed renewal (then doubled, jittered)
    renew_retry_max: float = 3600.0     # ... up to this

    @property
    def enabled(self) -> bool:
        return bool(self.id_scope or self.hub)


@dataclass(frozen=True)
class EdgeConfig:
    """The module's own connection to edgeHub under IoT Edge (identity from the environment)."""
    # Seconds each SAS token the SDK makes for edgeHub lives (signed by the workload API, or
    # with the connection string's key). The SDK renews 120 s before expiry, so more than that.
    sas_ttl: int = ranged(3600, EDGE_SAS_TTL_MIN, YEAR, says=_EDGE_SAS_TTL)


OPERATIONS = ("sas-token", "signature", "registration", "certificate", "certificate-issue")


@dataclass(frozen=True)
class PolicyRule:
    """Who (principal name patterns) may do what (operations) on which devices and keys.

    Patterns are shell-style globs; `{cn}` stands for the caller's own name. An operation
    that names a device (sas-token, registration) needs a matching `devices` pattern; one
    that names a key (signature, certificate, and the key behind a sas-token) a matching
    `keys` pattern. A rule without `keys` allows the key that the service itself chose for
    the device (sas_key / registration templates), never a key named by the caller.
    """
    # caller names the rule applies to (certificate CN or bearer-token principal); ["*"]: everyone
    principals: tuple[str, ...]
    # what they may do: sas-token, signature, registration, certificate, certificate-issue, or "*"
    operations: tuple[str, ...]
    # device or registration ids they may name ({cn}: their own name)
    devices: tuple[str, ...] = ()
    # HSM key labels they may name or have used for them (none: only the key the service chooses)
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceConfig:
    """The HTTPS API for leaf devices. Off unless the config has a `service` section."""
    # on when the configuration has a `service` section (set false to keep the section but turn it off)
    enabled: bool = False
    # address the API listens on;
    host: str = "0.0.0.0"  # noqa: S104 - leaf devices reach the module over the edge network
    port: int = ranged(8443, 0, 65535, says=_PORT)  # the HTTPS port of the API (0: any free port)
    # address of the plain-HTTP /healthz and /readyz for the container's HEALTHCHECK (keep it on loopback:
    # its /readyz tells the full reason, token and reader included)
    health_host: str = "127.0.0.1"
    health_port: int = ranged(8080, 0, 65535, says=_PORT)  # the port of health_host's listener; 0 turns it off
    tls_cert_file: str | None = None    # server certificate chain (PEM); else the one stored beside tls_key_label
    tls_key_file: str | None = None     # server private key (PEM file), instead of tls_key_label
    # HSM key of the API; with an issuing certificate beside it (or in tls_cert_file) it certifies
    # short-lived in-memory TLS keys, else it signs each handshake (see "The API's TLS key")
    tls_key_label: str | None = None
    # With tls_key_label and an issuing certificate: the life of each in-memory TLS key it
    # certifies (renewed at half), so handshakes cost no token signature
    # (default 72 h: renewed at half, so a served certificate has >= 36 h left; with the 24 h
    # backdate (identity.service_ca.BACKDATE) a leaf whose clock is off by up to 24 h either way verifies it)
    tls_lifetime: int = ranged(259200, 300, 30 * 24 * 3600, says="300 seconds to 30 days")
    tls_handshakes: int = ranged(16, 1, 1024)  # TLS handshakes in progress at once; more connections wait
    # seconds a client has to complete its handshake
    tls_handshake_timeout: float = ranged(10.0, 1, 120, unit="seconds")
    # accepted connections one source address may have waiting for or in their TLS handshake; past
    # it, its new connections are closed at once (a NAT in front of many leaves: raise it)
    tls_per_source: int = ranged(32, 1, 100_000)
    # requests that fail authentication, per source address (token bucket; 0 turns it off): past
    # it a source gets 429 without its credentials being looked at
    unauthenticated_per_second: float = ranged(5.0, 0, 10_000)
    # failed-authentication requests a source may make at once before unauthenticated_per_second applies
    unauthenticated_burst: int = ranged(20, 1, 100_000)
    client_ca_file: str | None = None   # trust anchors for leaf certificates (mutual TLS)
    # principal -> SHA-256 hex digest of its token, or a list of them (several while a token is rotated)
    bearer_tokens: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # who may do what: a list of rules (service.policy[] below); a request no rule allows is 403
    policy: tuple[PolicyRule, ...] = ()
    # HSM key labels (globs) a caller may name for POST /v1/signatures; nothing else, and never a
    # reserved key (service/keyroles.py: the service TLS key, cloud keys, DPS group and device keys)
    signing_keys: tuple[str, ...] = ()
    hub: str | None = None              # hub for device tokens when a request names none
    sas_key: str = "{deviceId}"         # HSM key label template for a device's SAS tokens
    dps_key: str = "{registrationId}"   # ... for DPS registration tokens and registrations
    group_key: str | None = None        # DPS group enrollment key: leaf keys derived from it
    x509_label: str = "{registrationId}"  # HSM credential label for X.509 registrations
    leaf_cert_label: str = "{registrationId}.operational"  # HSM key of a leaf's issued certificate
    min_ttl: int = 300                  # the shortest token lifetime (ttlSeconds) a request may ask for
    max_ttl: int = 86400                # the longest token lifetime a request may ask for
    # a cached token is reused until this much of its life
    cache_reuse_fraction: float = ranged(0.5, 0, 1, below=True, says="0 (no reuse) up to below 1")
    # ... and after that, while at least this much of its life is left (or the request's
    # minTtlSeconds), handed out at once while its successor is signed in the background
    cache_min_remaining_fraction: float = ranged(0.25, 0, 1, above=True, below=True, says="above 0 and below 1")
    cache_max_entries: int = ranged(50_000, 1, 10_000_000)  # least recently used tokens are forgotten beyond this
    # largest request body accepted; a larger one is refused with 413
    max_body_bytes: int = ranged(16384, 256, 1 << 20)
    # seconds a request may take from its headers to its answer (408 for a slow body, else 503)
    request_timeout: float = ranged(15.0, 0.1, 600, unit="seconds")
    # seconds a POST /v1/registrations may wait for DPS
    registration_timeout: float = ranged(60.0, 0.1, 600, unit="seconds")
    # requests per second per principal (token bucket; 0 turns the limit off); past it 429
    rate_limit_per_second: float = 20.0
    # requests a principal may make at once before rate_limit_per_second applies
    rate_limit_burst: int = 40
    retry_after: int = ranged(1, 1, 3600, unit="seconds")  # seconds, sent with 503 when the HSM is busy/not ready
    audit_file: str | None = None       # JSON lines; default <state_dir>/audit.log; "-" = stderr
    audit_fail_closed: bool = True      # refuse to hand out signatures the audit log missed
    audit_fsync: bool = False           # fsync each batch of records (power loss loses none)


# --- operations: Prometheus endpoint, log format, upstream events ---------------------------


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus text on http://<host>:<port>/metrics for IoT Edge's metrics-collector."""
    enabled: bool = True  # serve /metrics (false: no listener)
    # address /metrics listens on;
    host: str = "0.0.0.0"  # noqa: S104 - the collector scrapes over the module network
    # the port of /metrics; 9600 as edgeHub's and edgeAgent's (each container has its own address)
    port: int = ranged(9600, 0, 65535, says=_PORT)


@dataclass(frozen=True)
class LoggingConfig:
    """How log lines look: `auto` is `iotedge` under IoT Edge (IOTEDGE_* set), else `plain`."""
    # iotedge (each line prefixed with its syslog severity, as `iotedge logs` filters), plain, json (one
    # object per line), or auto: iotedge under IoT Edge, else plain
    format: Literal["auto", "iotedge", "plain", "json"] = "auto"


@dataclass(frozen=True)
class EventsConfig:
    """Messages on a module output (IoT Edge only) for what an operator should hear about."""
    enabled: bool = True  # send events (ignored outside IoT Edge)
    output: str = "events"  # the module output they are sent on (route it in the deployment)
    summary_interval: float = ranged(60.0, 1, 86400, unit="seconds")  # seconds between summaries of refused requests
    buffer: int = ranged(1000, 1, 100_000)  # events kept while edgeHub is unreachable (oldest dropped)
    expiry_warning_days: int = ranged(14, 1, 365)  # a certificate this close to expiry is announced


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: the config file, an environment variable, or its default.
    `shadowed` is the file's value that an environment variable replaced with another (else None)."""
    kind: Literal["default", "file", "environment"]
    where: str = ""           # the file's path, or the variable's name
    shadowed: Any = None

    def __str__(self) -> str:
        if self.kind == "default":
            return "default"
        text = f"{self.kind} {self.where}"
        if self.shadowed is not None:
            text += f"; the file's {self.shadowed!r} is not used"
        return text


DEFAULT_ORIGIN = Origin("default")


@dataclass(frozen=True)
class Config:
    hsm: HsmConfig = field(default_factory=HsmConfig)
    sas: SasConfig = field(default_factory=SasConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    # where the module keeps its state: stored DPS assignments, the audit log by default
    state_dir: str = "/var/lib/spyrus-hsm"
    source: str = "defaults"
    # where each key's value came from ("hsm.module" -> Origin); a key absent here is its default
    origins: dict[str, Origin] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, key: str) -> Origin:
        """Where the effective value of `key` ("hsm.module", "state_dir") came from."""
        return self.origins.get(key, DEFAULT_ORIGIN)


_SECTIONS: dict[str, type[Any]] = {"hsm": HsmConfig, "sas": SasConfig, "cloud": CloudConfig,
                                   "service": ServiceConfig, "edge": EdgeConfig, "metrics": MetricsConfig,
                                   "logging": LoggingConfig, "events": EventsConfig}
_ENV = {
    "SPYRUS_HSM_PKCS11_MODULE": ("hsm", "module"),
    "SPYRUS_HSM_TOKEN_LABEL": ("hsm", "token_label"),
    "SPYRUS_HSM_PIN_FILE": ("hsm", "pin_file"),
    "SPYRUS_HSM_LOG_FORMAT": ("logging", "format"),
    "SPYRUS_HSM_PCSCD": ("hsm", "pcscd"),
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
        data = read_yaml(Path(path))
    cfg = replace(_from_mapping(data, source), origins=_file_origins(data, source))
    for var, (name, key) in _ENV.items():
        if env.get(var):
            cfg = _override(cfg, name, key, env[var], var)
    _validate(cfg, require_token)
    return cfg


def _file_origins(data: Mapping[str, Any], path: str) -> dict[str, Origin]:
    """Every key the file sets, as "section.key" (or "state_dir")."""
    out = {}
    for name, value in data.items():
        for key in (value if name in _SECTIONS and isinstance(value, dict) else {name: None}):
            out[f"{name}.{key}" if name in _SECTIONS else name] = Origin("file", path)
    return out


def _from_mapping(data: Mapping[str, Any], source: str) -> Config:
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key == "service":
            kwargs[key] = service_section(value, source)
        elif key in _SECTIONS:
            kwargs[key] = section(_SECTIONS[key], value, f"{key}", source)
        elif key == "state_dir":
            kwargs[key] = typed(hints(Config)[key], value, key, source)
        else:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(_SECTIONS)}, state_dir)")
    return Config(**kwargs)


def service_section(value: Any, source: str) -> ServiceConfig:
    """The `service` mapping (also what the module twin's desired properties are applied as)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: 'service' must be a mapping")
    scalars = {k: v for k, v in value.items() if k not in ("bearer_tokens", "policy", "signing_keys")}
    svc: ServiceConfig = section(ServiceConfig, scalars, "service", source)
    tokens = _bearer_tokens(value.get("bearer_tokens"), source)
    policy = tuple(_rule(r, i, source) for i, r in enumerate(as_list(value.get("policy"), "service.policy", source)))
    signing = as_list(value.get("signing_keys"), "service.signing_keys", source)
    if not all(isinstance(p, str) and p for p in signing):
        raise ConfigError(f"{source}: 'service.signing_keys' must be a list of non-empty label patterns")
    return replace(svc, enabled=value.get("enabled", True) is not False, bearer_tokens=tokens, policy=policy,
                   signing_keys=tuple(signing))


def _bearer_tokens(value: Any, source: str) -> dict[str, tuple[str, ...]]:
    """principal -> the digests of its tokens: one (a string) or several (a list: a token being
    rotated, old and new accepted alike until the old one is removed)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: 'service.bearer_tokens' must map principal names to SHA-256 hex digests")
    out = {}
    for name, digests in value.items():
        where = f"service.bearer_tokens.{name}"
        items = list(digests) if isinstance(digests, (list, tuple)) else [digests]
        if not items:
            raise ConfigError(f"{source}: '{where}' is an empty list: give at least one digest, or remove the name")
        for digest in items:
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in string.hexdigits for c in digest):
                raise ConfigError(f"{source}: '{where}' must be the SHA-256 of the token as 64 hex digits, or a list "
                                  "of them (e.g. printf %s TOKEN | sha256sum), never the token itself")
        out[str(name)] = tuple(dict.fromkeys(d.lower() for d in items))
    return out


def _rule(value: Any, index: int, source: str) -> PolicyRule:
    where = f"service.policy[{index}]"
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping with principals, operations, devices, keys")
    known = {f.name for f in fields(PolicyRule)}
    for key in value:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: {', '.join(sorted(known))})")
    parts: dict[str, tuple[str, ...]] = {}
    for key in known:
        items = as_list(value.get(key), f"{where}.{key}", source)
        if not all(isinstance(i, str) and i for i in items):
            raise ConfigError(f"{source}: '{where}.{key}' must be a list of non-empty strings")
        parts[key] = tuple(items)
    if not parts["principals"]:
        raise ConfigError(f"{source}: '{where}.principals' is required (use [\"*\"] for every caller)")
    bad = [o for o in parts["operations"] if o not in OPERATIONS and o != "*"]
    if not parts["operations"] or bad:
        raise ConfigError(f"{source}: '{where}.operations' must list some of {', '.join(OPERATIONS)} (or \"*\")"
                          + (f"; unknown: {', '.join(bad)}" if bad else ""))
    return PolicyRule(**parts)


def _override(cfg: Config, section: str, key: str, value: str, var: str) -> Config:
    """`section.key` set from the environment variable `var`: it wins over the file."""
    sec = getattr(cfg, section)
    name = f"{section}.{key}"
    value_typed = typed(hints(type(sec))[key], value, name, f"environment variable {var}")
    before = getattr(sec, key)
    shadowed = before if cfg.origin(name).kind == "file" and before != value_typed else None
    origins = {**cfg.origins, name: Origin("environment", var, shadowed)}
    return replace(cfg, origins=origins, **{section: replace(sec, **{key: value_typed})})


def _validate(cfg: Config, require_token: bool) -> None:
    h = cfg.hsm
    where = cfg.source
    if require_token and not h.token_label and not h.token_serial:
        raise ConfigError(
            f"{where}: no token selected; set hsm.token_label (or SPYRUS_HSM_TOKEN_LABEL) "
            "or hsm.token_serial"
        )
    check_bounds(h, "hsm", where)
    if h.two_tokens:
        _validate_second(cfg, where)
    check_bounds(cfg.sas, "sas", where)
    c = cfg.cloud
    if c.id_scope and not c.registration_id:
        raise ConfigError(f"{where}: 'cloud.id_scope' needs 'cloud.registration_id'")
    if c.hub and not c.device_id:
        raise ConfigError(f"{where}: 'cloud.hub' needs 'cloud.device_id'")
    if c.enabled and not c.key:
        raise ConfigError(f"{where}: 'cloud.key' must name the HSM key or X.509 credential to use")
    check_bounds(c, "cloud", where)
    if not 0 < c.renew_retry_initial <= c.renew_retry_max:
        raise ConfigError(f"{where}: 'cloud.renew_retry_initial' must be above 0 and at most "
                          f"'cloud.renew_retry_max' (seconds), got {c.renew_retry_initial} and {c.renew_retry_max}")
    check_bounds(cfg.edge, "edge", where)
    validate_service(cfg.service, where)
    _validate_operations(cfg, where)


def _validate_second(cfg: Config, where: str) -> None:
    h = cfg.hsm
    first, second = TokenSelector(h.token_label, h.token_serial), TokenSelector(h.second_token_label,
                                                                               h.second_token_serial)
    if first == second or (h.token_serial and h.token_serial == h.second_token_serial):
        raise ConfigError(f"{where}: 'hsm.second_token_label'/'hsm.second_token_serial' select the same token "
                          f"as the first ({first.describe()}): give the second token its own label or serial")


def _validate_operations(cfg: Config, where: str) -> None:
    check_bounds(cfg.metrics, "metrics", where)
    e = cfg.events
    if not e.output or any(c in e.output for c in "/#+ "):
        raise ConfigError(f"{where}: 'events.output' must be an output name without '/', '#', '+' or spaces")
    check_bounds(e, "events", where)


def validate_service(s: ServiceConfig, where: str) -> None:
    if not s.enabled:
        return
    check_bounds(s, "service", where)
    if not s.tls_cert_file and not s.tls_key_label:
        raise ConfigError(f"{where}: the service needs a server certificate: set 'service.tls_cert_file' "
                          "(PEM chain) and 'service.tls_key_file' or 'service.tls_key_label' (key in the HSM)")
    if s.tls_key_file and s.tls_key_label:
        raise ConfigError(f"{where}: set one of 'service.tls_key_file' and 'service.tls_key_label', not both")
    if s.tls_cert_file and not (s.tls_key_file or s.tls_key_label):
        raise ConfigError(f"{where}: 'service.tls_cert_file' needs 'service.tls_key_file' or 'service.tls_key_label'")
    if s.rate_limit_per_second < 0 or s.rate_limit_burst < 1:  # one message for both (twin tests quote it)
        raise ConfigError(f"{where}: 'service.rate_limit_per_second' must be >= 0 and 'service.rate_limit_burst' >= 1")
    if not 60 <= s.min_ttl <= s.max_ttl <= YEAR:
        raise ConfigError(f"{where}: need 60 <= 'service.min_ttl' <= 'service.max_ttl' <= 1 year")
    for name in ("sas_key", "dps_key", "x509_label", "leaf_cert_label"):
        template = getattr(s, name)
        try:
            template.format(deviceId="d", moduleId="m", registrationId="r", cn="c")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"{where}: 'service.{name}' may use only {{deviceId}}, {{moduleId}}, "
                              f"{{registrationId}} and {{cn}}, got {template!r}") from None


def allowed_ranges() -> dict[str, str]:
    """'section.key' -> the range its check allows, as its error message words it ("must be ...")."""
    return ranges_of(_SECTIONS)


def registration_needs(*, symmetric: bool, issue_cert: bool) -> tuple[Need, ...]:
    """What a DPS registration asks of the token: HMAC-SHA256 for a symmetric key; an EC P-384
    key pair generated and signing (identity.issued.OPERATIONAL_KEY) for an issued certificate."""
    needs: tuple[Need, ...] = (Need.HMAC_SHA256, Need.SECRET_IMPORT) if symmetric else ()
    return needs + (Need.to_generate(KeyAlgorithm.EC_P384) if issue_cert else ())


def token_needs(cfg: Config) -> list[tuple[str, Need]]:
    """What this configuration's keys ask of the token, each with the setting that asks it
    (`serve` and `selftest` compare it with the token's capabilities). The API's TLS key is not
    here: its algorithm is the key's, read from the token."""
    out: list[tuple[str, Need]] = []
    c = cfg.cloud
    if c.enabled and c.key and c.attestation == "symmetricKey":
        out += [("cloud.key (symmetricKey attestation)", n)
                for n in registration_needs(symmetric=True, issue_cert=False)]
    if c.enabled and c.issue_cert:
        out += [("cloud.issue_cert", n) for n in registration_needs(symmetric=False, issue_cert=True)]
    s = cfg.service
    if s.enabled and any(op in ("sas-token", "*") for rule in s.policy for op in rule.operations):
        # device keys are imported (key import-sas): a token must store secret keys given to it
        out += [("service.sas_key (policy allows sas-token)", n) for n in (Need.HMAC_SHA256, Need.SECRET_IMPORT)]
    if s.enabled and s.group_key:  # and derived device keys are stored the same way
        out += [("service.group_key", n) for n in (Need.HMAC_SHA256, Need.SECRET_IMPORT)]
    return out


def tls_key_needs(algorithm: KeyAlgorithm) -> Need:
    """What the API's TLS key (service.tls_key_label) of `algorithm` asks of the token: its
    signature in a TLS 1.3 handshake or on the short-lived keys it certifies."""
    if algorithm is KeyAlgorithm.RSA_2048:
        return Need.RSA_PSS_SHA256  # TLS 1.3 signs with RSA only as RSA-PSS
    return Need.to_generate(algorithm)[1]
