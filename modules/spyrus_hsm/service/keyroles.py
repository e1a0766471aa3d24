"""Keys have one job: which HSM keys a caller may name, and which no request may reach.

A key the module uses for itself, or one that mints credentials, is *reserved*:

- `service.tls_key_label`: it certifies the API's TLS keys, so its signature over a
  TBSCertificate is a server certificate every leaf trusts;
- `cloud.key` and `cloud.issue_cert`: the module's own identity (SAS key or X.509 credential)
  and the key of its DPS-issued operational certificate;
- `service.group_key`: a DPS group enrollment key (its HMAC of a registration id *is* that
  device's key);
- the keys the device templates name: `service.sas_key` and `service.dps_key` (a device's SAS or
  DPS key, HMAC) and `service.leaf_cert_label` (a leaf's DPS-issued certificate key);
- in the token, any private key with a certificate stored beside it (an identity: an X.509
  credential, a DPS-issued certificate, the service certificate). The HSM checks this in the
  same operation as the signature (`Hsm.asign_unbound`).

`POST /v1/signatures` signs only with a key that matches `service.signing_keys` (config file
only; the twin cannot set it) and is none of the above, whatever a policy rule's `keys`
pattern matches; anything else is answered exactly as a key that does not exist. The other way
round, a device template's key that is reserved for another job, or in the signing namespace,
is refused to the SAS-token and registration routes the same way. A template placeholder
stands for any text, so the default `{deviceId}` claims every label for HMAC keys: caller-named
HMAC signing needs the device keys in a namespace of their own (`sas_key: "sas-{deviceId}"`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import CloudConfig, PolicyRule, ServiceConfig
from ..hsm import ObjectInfo, ObjectNotFound, as_uri, not_named

_PLACEHOLDER = re.compile(r"\{(deviceId|moduleId|registrationId|cn)\}")


def template_pattern(template: str) -> re.Pattern[str]:
    """The labels `template` can produce: each placeholder stands for any text."""
    parts = _PLACEHOLDER.split(template)
    # split() alternates literal text and placeholder names
    return re.compile("".join(re.escape(p) if i % 2 == 0 else ".*" for i, p in enumerate(parts)), re.S)


@dataclass(frozen=True)
class KeyRoles:
    reserved: dict[str, str]              # label -> its job, as the log and selftest say it
    signing: tuple[str, ...]              # service.signing_keys
    hmac_templates: tuple[tuple[str, re.Pattern[str]], ...]    # (setting, labels it can name)
    private_templates: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def of(cls, svc: ServiceConfig, cloud: CloudConfig) -> KeyRoles:
        reserved: dict[str, str] = {}
        for label, job in ((svc.tls_key_label, "the API's TLS key (service.tls_key_label)"),
                           (cloud.key, "the module's cloud identity (cloud.key)"),
                           (cloud.issue_cert, "the module's operational certificate key (cloud.issue_cert)"),
                           (svc.group_key, "a DPS group enrollment key (service.group_key)")):
            if label and "{" not in label:
                reserved.setdefault(label, job)
        hmac = tuple((f"service.{name}", template_pattern(getattr(svc, name)))
                     for name in ("sas_key", "dps_key", "group_key") if getattr(svc, name))
        private = (("service.leaf_cert_label", template_pattern(svc.leaf_cert_label)),)
        return cls(reserved, svc.signing_keys, hmac, private)

    # --- what a caller may name --------------------------------------------------------------

    def why_not_signable(self, label: str, hmac: bool) -> str | None:
        """Why `label` may not sign caller-supplied bytes (None: it may, as far as the
        configuration tells; the HSM still refuses a key with a certificate beside it)."""
        if label in self.reserved:
            return f"it is {self.reserved[label]}"
        for setting, pattern in self.hmac_templates if hmac else self.private_templates:
            if pattern.fullmatch(label):
                return f"{setting} can name it as a device's key"
        if not any(fnmatchcase(label, p) for p in self.signing):
            return "it matches no service.signing_keys pattern"
        return None

    # --- what a device template may yield -------------------------------------------------------

    def why_not_for_device(self, label: str, *, own: str | None = None) -> str | None:
        """Why a template's key `label` may not serve a device: reserved for another job than
        `own` (the job this route uses it for), or in the signing namespace."""
        job = self.reserved.get(label)
        if job is not None and job != own:
            return f"it is {job}"
        if any(fnmatchcase(label, p) for p in self.signing):
            return "it is in the signing namespace (service.signing_keys)"
        return None

    @property
    def group_job(self) -> str:
        return "a DPS group enrollment key (service.group_key)"

    # --- what the operator is told at start --------------------------------------------------

    def warnings(self, rules: Sequence[PolicyRule], objects: Iterable[ObjectInfo] = ()) -> list[str]:
        """One line for each policy rule or signing pattern that would have reached a reserved
        key (none does: this says the configuration means something it cannot get)."""
        objects = list(objects)
        certified = {o.label for o in objects if o.type == "cert"}
        reserved = dict(self.reserved)
        for o in objects:
            if o.type == "private" and o.label in certified:
                reserved.setdefault(o.label, "an identity (a key with a certificate beside it)")
            elif o.type == "secret-key" and any(p.fullmatch(o.label) for _, p in self.hmac_templates):
                reserved.setdefault(o.label, "a device's SAS/DPS key")
        out = []
        for index, rule in enumerate(rules):
            if not ({"signature", "*"} & set(rule.operations)):
                continue
            for pattern in rule.keys:
                hits = sorted(label for label in reserved if "{cn}" not in pattern and fnmatchcase(label, pattern))
                if hits:
                    out.append(f"service.policy[{index}] keys pattern '{pattern}' matches reserved "
                               + _listing(hits, reserved) + ": they are never used for caller-named signing")
        for pattern in self.signing:
            hits = sorted(label for label in reserved if fnmatchcase(label, pattern))
            if hits:
                out.append(f"service.signing_keys pattern '{pattern}' matches reserved "
                           + _listing(hits, reserved) + ": they are never used for caller-named signing")
        return out


def _listing(labels: list[str], jobs: dict[str, str]) -> str:
    shown = ", ".join(f"'{label}' ({jobs[label]})" for label in labels[:5])
    return f"key(s) {shown}" + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")


def unknown_key(label: str, hmac: bool, why: str) -> ObjectNotFound:
    """The answer for a key a caller may not name: to the caller, word for word the HSM's for a
    missing key; `why` goes to the log only."""
    return not_named(as_uri(label), "secret-key" if hmac else "private", why)
