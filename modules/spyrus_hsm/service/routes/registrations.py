"""POST /v1/registrations runs a DPS registration on a leaf's behalf (leaves cannot reach DPS
through an edge gateway); GET /v1/registrations/{id} returns the stored result."""

from __future__ import annotations

import json
import re

from aiohttp import web

from ...cloud.dps import DpsRequest
from ..core import PRINCIPAL, Service, run_in_thread
from ..keys import SERVICE
from ..problems import bad_request, not_found
from ..validation import ID_SCOPE, REGISTRATION_ID, choice, only, read_json, text

MAX_PAYLOAD_CHARS = 4096


async def create(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = await read_json(request)
    only(body, "registrationId", "idScope", "attestation", "payload")
    reg = text(body, "registrationId", REGISTRATION_ID)
    scope = text(body, "idScope", ID_SCOPE, required=False) or svc.deps.cloud.id_scope
    attestation = choice(body, "attestation", ("x509", "symmetricKey"))
    payload = body.get("payload")
    if payload is not None and len(json.dumps(payload)) > MAX_PAYLOAD_CHARS:
        raise bad_request(f"'payload' may be at most {MAX_PAYLOAD_CHARS} characters of JSON")
    if not scope:
        raise bad_request("'idScope' is required: this service has no default (cloud.id_scope)")
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
    result = await svc.register(DpsRequest(
        scope, reg, svc.deps.cloud.provisioning_host, "x509" if attestation == "x509" else "symmetricKey",
        key, group=group, payload=payload, server_ca_pem=svc.dps_ca_pem))
    return web.json_response(result.to_api())


async def get(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    reg = request.match_info["id"]
    if not re.fullmatch(REGISTRATION_ID, reg):
        raise bad_request(f"the registration id must match {REGISTRATION_ID}")
    svc.authorize(request, "registration", device=reg)
    result = await run_in_thread(None, svc.stored_registration, reg)  # a file read, off the loop
    if result is None:
        raise not_found(f"no registration is stored for '{reg}'")
    return web.json_response(result.to_api())


ROUTES = [
    web.post("/v1/registrations", create, name="registrations"),
    web.get("/v1/registrations/{id}", get, name="registration"),
]
