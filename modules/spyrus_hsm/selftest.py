"""`spyrus-hsm selftest`: check every link from config to a signature and say what to fix.

Each check prints `ok`, `WARN` or `FAIL` with the exact file, device or setting involved. Exit 0
when no check fails (warnings included), 1 otherwise. Used by operators and at container start-up.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from . import config as config_mod
from . import times
from .config import Which
from .hsm import Hsm, HsmError, Need, RefusedPins, Row, SignAlgorithm, list_tokens, read_secret_file
from .identity import service_ca
from .identity import x509 as x509_id
from .pcsc import scard
from .pcsc.watch import NO_READER

CERT_WARN_DAYS = 30        # certificates without a key in the token (CAs, peers)
CREDENTIAL_WARN_LEFT = 0.2  # X.509 credentials: warn below this fraction of the lifetime left


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # passed, but needs attention soon (does not change the exit status)


def _softhsm_checks(module: str) -> list[Check]:
    if "softhsm" not in Path(module).name:
        return []
    conf = os.environ.get("SOFTHSM2_CONF", "/etc/softhsm/softhsm2.conf")
    if not os.access(conf, os.R_OK):
        return [Check("softhsm config", False, f"{conf} is not readable; set SOFTHSM2_CONF")]
    text = Path(conf).read_text(errors="replace")
    m = re.search(r"^\s*directories\.tokendir\s*=\s*(\S+)", text, re.M)
    if not m:
        return [Check("softhsm config", False, f"{conf} has no directories.tokendir")]
    tokendir = m.group(1)
    if not os.path.isdir(tokendir):
        return [Check("softhsm tokens", False, f"token directory {tokendir} does not exist")]
    if not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK):
        return [Check("softhsm tokens", False,
                      f"token directory {tokendir} is not writable by uid {os.getuid()}")]
    return [Check("softhsm tokens", True, f"{conf} -> {tokendir}")]


def _usb_checks(module: str, pcscd: str) -> list[Check]:
    if "softhsm" in Path(module).name or pcscd == "host":  # host: the host's pcscd opens the USB device
        return []
    usb = Path("/dev/bus/usb")
    if not usb.is_dir():
        return [Check("usb", False, "/dev/bus/usb is missing; bind-mount it into the container")]
    denied = [str(d) for d in usb.glob("*/*") if not os.access(d, os.R_OK | os.W_OK)]
    if denied:
        return [Check("usb", False, f"uid {os.getuid()} cannot open {', '.join(denied[:5])}; "
                      "add the cgroup rule 'c 189:* rmw' and a group that can read them")]
    return [Check("usb", True, "/dev/bus/usb devices are accessible")]


def _pcsc_checks(pcscd: str) -> list[Check]:
    """hsm.pcscd internal/host: pcscd answers, which readers it sees, which holds the card."""
    if pcscd == "none":
        return []
    s = scard.survey()
    if s.problem:
        hint = ""
        if pcscd == "internal" and s.problem.startswith("pcscd not reachable"):
            hint = "; serve starts pcscd with hsm.pcscd: internal (is serve running?)"
        return [Check("pcsc", False, s.problem + hint)]
    if not s.readers:
        return [Check("pcsc readers", False, NO_READER)]
    names = ", ".join(f"'{r.name}'" for r in s.readers)
    out = [Check("pcsc readers", True, f"pcscd at {scard.socket_path()} ({pcscd}) sees {names}")]
    cards = s.with_card
    out.append(Check("pcsc card", bool(cards), "card in reader " + ", ".join(f"'{r}'" for r in cards) if cards
                     else f"no card in any reader ({names}): insert the token"))
    for reader in cards:
        denied = scard.card_access(reader)
        out.append(Check("pcsc access", denied is None, denied or f"uid {os.getuid()} may use the card in '{reader}'"))
    return out


ORIGIN_KEYS = ("hsm.module", "hsm.token_label", "hsm.token_serial", "hsm.pin_file", "hsm.pcscd", "hsm.serial",
               "state_dir")


def _origin_checks(cfg: config_mod.Config, pin_file: str | None) -> list[Check]:
    """One line per setting that decides which token is used and how: its value and where it came
    from (file, environment variable, default). WARN where an environment variable (the deployment
    manifest's) replaced a different value the file sets: the file's is silently not used."""
    out = []
    for key in ORIGIN_KEYS:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        origin = cfg.origin(key)
        where, shadowed = str(origin), origin.shadowed is not None
        if key == "hsm.pin_file" and pin_file:
            value, where, shadowed = pin_file, "command line --pin-file", False
        shown = "not set" if value is None else str(value).lower() if isinstance(value, bool) else value
        out.append(Check(key, True, f"{shown} ({where})", warning=shadowed))
    return out


def _service_checks(cfg: config_mod.Config) -> list[Check]:
    """The HTTP service's files: readable, parseable, and where it writes, writable."""
    svc = cfg.service
    if not svc.enabled:
        return []
    from cryptography import x509

    out = []
    for name, path in (("service.tls_cert_file", svc.tls_cert_file), ("service.client_ca_file", svc.client_ca_file)):
        if not path:
            continue
        try:
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
            out.append(Check(name, True, f"{path}: {len(certs)} certificate(s)"))
        except (OSError, ValueError) as exc:
            out.append(Check(name, False, f"{path} cannot be read as PEM certificates "
                             f"({getattr(exc, 'strerror', None) or exc}); uid {os.getuid()}"))
    if svc.tls_key_file and not os.access(svc.tls_key_file, os.R_OK):
        out.append(Check("service.tls_key_file", False, f"{svc.tls_key_file} is missing or not readable "
                         f"by uid {os.getuid()}"))
    audit = Path(svc.audit_file or Path(cfg.state_dir) / "audit.log")
    if str(audit) != "-":
        where = audit.parent if audit.parent.exists() else audit.parent.parent  # made at start-up
        writable = where.is_dir() and os.access(where, os.W_OK | os.X_OK)
        out.append(Check("audit log", writable, str(audit) if writable else
                         f"cannot write {audit} as uid {os.getuid()}; fix the state volume or service.audit_file"))
    return out


def collect(config_path: str | None, pin_file: str | None, token: Which | None = None) -> list[Check]:
    return _collect(config_path, pin_file, [], token)


def _collect(config_path: str | None, pin_file: str | None, table: list[Row],
             token: Which | None = None) -> list[Check]:
    """The checks of one token (`token`; None: the first); `table` receives the token's
    capability table once logged in."""
    checks: list[Check] = []
    try:
        cfg = config_mod.load(config_path)
        second = cfg.hsm.second_token_label or cfg.hsm.second_token_serial
        if cfg.hsm.two_tokens or token is not None:
            cfg = replace(cfg, hsm=cfg.hsm.token(token or "first"))
    except config_mod.ConfigError as exc:
        return [Check("config", False, str(exc))]
    checks.append(Check("config", True, cfg.source))
    if second and token in (None, "first"):
        checks.append(Check("second token", True, f"'{second}' is checked by 'spyrus-hsm --token second selftest'"))
    checks += _origin_checks(cfg, pin_file)
    checks += _service_checks(cfg)
    module = cfg.hsm.module
    ok = os.access(module, os.R_OK)
    checks.append(Check("module", ok, module if ok else
                        f"{module} is missing or unreadable; set hsm.module (or SPYRUS_HSM_PKCS11_MODULE)"))
    if not ok:
        return checks
    checks += _softhsm_checks(module) + _usb_checks(module, cfg.hsm.pcscd) + _pcsc_checks(cfg.hsm.pcscd)
    try:
        tokens = list_tokens(module)
        checks.append(Check("tokens", True, ", ".join(f"'{t.label}'" for t in tokens) or "none"))
    except HsmError as exc:
        return [*checks, Check("tokens", False, str(exc))]
    path = pin_file or cfg.hsm.pin_file
    if not path:
        return [*checks, Check("pin file", False, "no PIN file: set hsm.pin_file or SPYRUS_HSM_PIN_FILE")]
    try:
        pin = read_secret_file(path)
        checks.append(Check("pin file", True, path))
    except HsmError as exc:
        return [*checks, Check("pin file", False, str(exc))]
    try:
        refused = RefusedPins.for_file(cfg.state_dir, path)
        with Hsm(cfg.hsm.pool_settings(refused), pin).start(wait=True) as hsm:
            st = hsm.state
            checks.append(Check("login", True, f"token '{st.token_label}' serial {st.token_serial}"))
            checks += _capability_checks(cfg, hsm, table)
            checks += _object_checks(hsm)
            checks += _key_role_checks(cfg, hsm)
            label = cfg.service.tls_key_label if cfg.service.enabled else None
            if label:
                found = bool(hsm.find(label, "private"))
                checks.append(Check("service.tls_key_label", found, f"private key '{label}'" if found else
                                    f"no private key '{label}' on the token; generate it with "
                                    f"'spyrus-hsm key generate --label {label} --type ec-p256'"))
                if found:
                    checks.append(_api_tls_check(hsm, cfg.service))
    except HsmError as exc:
        checks.append(Check("login", False, str(exc)))
    return checks


def _capability_checks(cfg: config_mod.Config, hsm: Hsm, table: list[Row]) -> list[Check]:
    """The token's capability table (into `table`); FAIL for each key of the configuration that
    needs what the token lacks (serve refuses that configuration), WARN for fewer sessions than
    the pool opens."""
    hsm.ask_secret_import()
    caps = hsm.capabilities
    if caps is None:
        return []
    table += caps.table()
    needs = config_mod.token_needs(cfg)
    label = cfg.service.tls_key_label if cfg.service.enabled else None
    if label and hsm.find(label, "private"):
        needs.append((f"service.tls_key_label '{label}'", config_mod.tls_key_needs(hsm.key_algorithm(label))))
    unmet = [Check(f"needs {setting}", False, why) for setting, need in needs
             if (why := caps.missing(need)) is not None]
    out = unmet or [Check("capabilities", True, f"token '{caps.token_label}' offers what the configuration's "
                          f"keys need ({len(needs)} need(s)); see the table below")]
    if caps.max_sessions is not None and hsm.pool.workers + 1 > caps.max_sessions:
        out.append(Check("sessions", True, f"token '{caps.token_label}' allows {caps.max_sessions} sessions and "
                         f"the pool opens {hsm.pool.workers + 1} (hsm.workers + 1): lower hsm.workers",
                         warning=True))
    return out


def _api_tls_check(hsm: Hsm, svc: config_mod.ServiceConfig) -> Check:
    """Whether the API's handshakes cost token signatures (see service/server_tls)."""
    label = svc.tls_key_label
    if svc.tls_cert_file:
        chain = x509.load_pem_x509_certificates(Path(svc.tls_cert_file).read_bytes())
    else:
        chain = hsm.certificate_chain(label or "")
    if not chain:
        return Check("api tls", False, f"no certificate is stored beside '{label}'; import one with "
                     f"'spyrus-hsm cert import FILE --label {label}' or set service.tls_cert_file")
    return _issuing_check(label or "", chain[0], svc.tls_lifetime, datetime.now(UTC))


def _issuing_check(label: str, cert: x509.Certificate, lifetime: int, now: datetime) -> Check:
    """The service certificate as the certifier of the API's short-lived keys (identity/service_ca):
    FAIL when `serve` would refuse it, WARN when it cannot issue (every handshake costs a token
    signature) or when some leaves' TLS stacks cannot verify what it signs."""
    found = service_ca.review(cert, now)
    if found.refused:
        return Check("api tls", False, f"the certificate beside '{label}' is a CA certificate that serve refuses "
                     f"to certify the API's keys with: {'; '.join(found.refused)}. Re-issue it with basicConstraints "
                     "CA and path length 0, keyUsage keyCertSign, extendedKeyUsage serverAuth only and the "
                     "service's names in subjectAltName (see docs/security/api-tls.md)")
    if found.not_issuing is not None:
        return Check("api tls", True, f"the certificate beside '{label}' cannot issue ({found.not_issuing}): every "
                     "new TLS connection costs a token signature on the event loop and the API cannot handshake "
                     "while the token is away; re-issue it as a path-length-0 CA certificate for serverAuth with "
                     "the service's names (see docs/security/api-tls.md)", warning=True)
    detail = f"'{label}' certifies short-lived in-memory TLS keys ({lifetime} s each): no token signature per handshake"
    if found.warnings:
        return Check("api tls", True, f"{detail}; but {'; '.join(found.warnings)} (see docs/security/api-tls.md)",
                     warning=True)
    return Check("api tls", True, detail)


def _key_role_checks(cfg: config_mod.Config, hsm: Hsm) -> list[Check]:
    """A WARN line for each policy rule or signing pattern that would have reached a key reserved
    for another job (service/keyroles.py): it is refused whatever the rule says."""
    if not cfg.service.enabled:
        return []
    from .service.keyroles import KeyRoles

    warnings = KeyRoles.of(cfg.service, cfg.cloud).warnings(cfg.service.policy, hsm.list_objects())
    return [Check("policy", True, w, warning=True) for w in warnings]


def _object_checks(hsm: Hsm) -> list[Check]:
    objects = hsm.list_objects()
    out = [Check("objects", True, f"{sum(o.type == 'secret-key' for o in objects)} secret key(s), "
                 f"{sum(o.type == 'private' for o in objects)} private key(s), "
                 f"{sum(o.type == 'cert' for o in objects)} certificate(s)")]
    credentials = x509_id.credentials(hsm)
    out += [_lifetime_check(c) for c in credentials]
    credential_labels = {c.label for c in credentials}
    for o in objects:
        if o.type in ("private", "secret-key") and (o.extractable or not o.sensitive):
            out.append(Check(f"key {o.label}", False,
                             "key is extractable or not sensitive; re-import it with spyrus-hsm"))
        if o.type == "cert" and o.not_after and o.label not in credential_labels:
            left = datetime.fromisoformat(o.not_after) - datetime.now(UTC)
            if left < timedelta(days=CERT_WARN_DAYS):
                out.append(Check(f"cert {o.label}", False,
                                 f"certificate {o.subject} expires {o.not_after}; renew it"))
    secret = next((o for o in objects if o.type == "secret-key"), None)
    caps = hsm.capabilities
    if secret is not None and (caps is None or caps.has(Need.HMAC_SHA256)):
        hsm.sign(secret.label, SignAlgorithm.HMAC_SHA256, b"selftest")
        out.append(Check("sign", True, f"HMAC-SHA256 with '{secret.label}'"))
    return out


def _lifetime_check(cred: x509_id.X509Credential) -> Check:
    """Expired: fail. Under CREDENTIAL_WARN_LEFT of its lifetime left: warn — a relative margin,
    because operational certificates live 7 to 90 days and a fixed one would always trip."""
    start, end = cred.leaf.not_valid_before_utc, cred.leaf.not_valid_after_utc
    until = times.iso(end)
    name = f"credential {cred.label}"
    now = datetime.now(UTC)
    if now >= end:
        return Check(name, False, f"certificate of '{cred.label}' expired {until}; renew it: spyrus-hsm register "
                     f"… --issue-cert {cred.label} --force, or import a new certificate for the key with "
                     f"'spyrus-hsm cert import --label {cred.label} CHAIN.pem'")
    left = (end - now) / (end - start) if end > start else 0.0
    if left < CREDENTIAL_WARN_LEFT:
        return Check(name, True, f"certificate of '{cred.label}' expires {until}, {left:.0%} of its lifetime "
                     "left; renew it soon", warning=True)
    return Check(name, True, f"certificate valid until {until} ({left:.0%} of its lifetime left)")


def run_selftest(config_path: str | None, pin_file: str | None, json_out: bool = False,
                 token: Which | None = None) -> int:
    table: list[Row] = []
    checks = _collect(config_path, pin_file, table, token)
    passed = all(c.ok for c in checks)
    if json_out:
        print(json.dumps({"ok": passed, "checks": [asdict(c) for c in checks],
                          "capabilities": [asdict(r) for r in table]}, indent=2))
    else:
        for c in checks:
            print(f"{'FAIL' if not c.ok else 'WARN' if c.warning else 'ok  '} {c.name}: {c.detail}")
        if table:
            print("token capabilities:")
            width = max(len(r.capability) for r in table)
            for r in table:
                print(f"  {r.capability:<{width}}  {r.status:<8}  {r.detail}")
    if not passed:
        print("selftest failed; fix the FAIL lines above", file=sys.stderr)
    return 0 if passed else 1
