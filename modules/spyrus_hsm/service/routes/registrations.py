"""POST /v1/registrations runs a DPS registration on a leaf's behalf (leaves cannot reach DPS
through an edge gateway); GET /v1/registrations/{id} returns the stored result.

With `csr` (the leaf's own DER PKCS#10, base64; its key stays on the leaf) DPS is asked to issue
an operational certificate: the caller needs the policy operation `certificate-issue` as well,
the CSR's CN must be the registration id and its signature must verify, and the answer carries
`issuedCertificateChain` (base64 DER, leaf first), checked against the CSR's key.

With `issueCertificate: true` instead, the leaf's operational key lives in this HSM: a P-384 key
pair is generated under `service.leaf_cert_label` (unless there) and the issued chain is stored
beside it (same operation needed)."""

from __future__ import annotations

import json
import re

from aiohttp import web

from ...cloud.dps import DpsRequest
from ...identity.issued import check_csr
from ..appkeys import SERVICE
from ..core import PRINCIPAL, Service, chosen_key
from ..problems import bad_request, not_found
from ..validation import ID_SCOPE, REGISTRATION_ID, base64_csr, choice, flag, only, read_json, text

MAX_PAYLOAD_CHARS = 4096


async def create(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = await read_json(request)
    only(body, "registrationId", "idScope", "attestation", "payload", "csr", "issueCertificate")
    reg = text(body, "registrationId", REGISTRATION_ID)
    scope = text(body, "idScope", ID_SCOPE, required=False) or svc.deps.cloud.id_scope
    attestation = choice(body, "attestation", ("x509", "symmetricKey"))
    payload = body.get("payload")
    csr = base64_csr(body, "csr")
    in_hsm = flag(body, "issueCertificate")
    if payload is not None and len(json.dumps(payload)) > MAX_PAYLOAD_CHARS:
        raise bad_request(f"'payload' may be at most {MAX_PAYLOAD_CHARS} characters of JSON")
    if not scope:
        raise bad_request("'idScope' is required: this service has no default")
    assert reg
    principal = request[PRINCIPAL].name
    group = attestation == "symmetricKey" and svc.cfg.group_key is not None
    if attestation == "x509":
        key = svc.key_for(svc.cfg.x509_label, principal, registrationId=reg)
    elif group:
        key = svc.key_for(svc.cfg.group_key or "", principal, registrationId=reg)
    else:
        key = svc.key_for(svc.cfg.dps_key, principal, registrationId=reg)
    svc.authorize(request, "registration", device=reg, key=key)
    subject = f"the registration of '{reg}'"
    svc.device_key(request, key, subject, reg, hmac=attestation != "x509", own=svc.roles.group_job if group else None)
    if in_hsm and csr is not None:  # after the policy, as the CSR checks: others learn nothing more
        raise bad_request("give 'csr' (the leaf's own key) or 'issueCertificate' (a key in this HSM), not both")
    issue_cert = svc.key_for(svc.cfg.leaf_cert_label, principal, registrationId=reg) if in_hsm else None
    if csr is not None or issue_cert is not None:
        svc.authorize(request, "certificate-issue", device=reg, key=issue_cert or key)
    if issue_cert is not None:
        svc.device_key(request, issue_cert, subject, reg, hmac=False)
    if csr is not None:
        check_csr(csr, reg)
    with chosen_key(subject, reg, key, issue_cert):  # the caller named the registration, not its keys
        result = await svc.register(DpsRequest(
            scope, reg, svc.deps.cloud.provisioning_host, "x509" if attestation == "x509" else "symmetricKey",
            key, group=group, payload=payload, server_ca_pem=svc.dps_ca_pem, csr=csr, issue_cert=issue_cert))
    return web.json_response(result.to_api())


async def get(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    reg = request.match_info["id"]
    if not re.fullmatch(REGISTRATION_ID, reg):
        raise bad_request(f"the registration id must match {REGISTRATION_ID}")
    svc.authorize(request, "registration", device=reg)
    result = await svc.stored_registration(reg)
    if result is None:
        raise not_found(f"no registration is stored for '{reg}'")
    return web.json_response(result.to_api())


ROUTES = [
    web.post("/v1/registrations", create, name="registrations"),
    web.get("/v1/registrations/{id}", get, name="registration"),
]
