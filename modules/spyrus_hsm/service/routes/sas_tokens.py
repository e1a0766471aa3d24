"""POST /v1/sas-tokens: a SAS token for a device (or module) on a hub, or for a DPS
registration, signed in the HSM by the key the config names for it (service.sas_key /
service.dps_key) and reused from the cache while most of its life is left. `minRemainingSeconds`
(optional; more than the TTL asks for a new token) is the least life the caller accepts in a token; by default
service.cache_min_remaining_fraction of the TTL."""

from __future__ import annotations

import time

from aiohttp import web

from ...identity.sas import device_uri, dps_uri
from ..appkeys import SERVICE
from ..core import PRINCIPAL, Service, chosen_key
from ..validation import DEVICE_ID, HOST_NAME, ID_SCOPE, REGISTRATION_ID, integer, only, read_json, text

FIELDS = ("deviceId", "moduleId", "hub", "idScope", "registrationId", "ttlSeconds", "minRemainingSeconds")


async def create(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = await read_json(request)
    only(body, *FIELDS)
    principal = request[PRINCIPAL].name
    ttl = integer(body, "ttlSeconds", svc.cfg.min_ttl, svc.cfg.max_ttl) or min(
        max(svc.deps.default_ttl, svc.cfg.min_ttl), svc.cfg.max_ttl)
    min_life = integer(body, "minRemainingSeconds", 1, svc.cfg.max_ttl)  # above the TTL: a new token
    if "idScope" in body or "registrationId" in body:
        only(body, "idScope", "registrationId", "ttlSeconds", "minRemainingSeconds")
        scope = text(body, "idScope", ID_SCOPE)
        reg = text(body, "registrationId", REGISTRATION_ID)
        assert scope and reg
        key = svc.key_for(svc.cfg.dps_key, principal, registrationId=reg)
        svc.authorize(request, "sas-token", device=reg, key=key)
        subject = f"registration '{reg}'"
        svc.device_key(request, key, subject, reg, hmac=True)
        named = reg
        uri, key_name = dps_uri(scope, reg), "registration"
    else:
        device = text(body, "deviceId", DEVICE_ID)
        module = text(body, "moduleId", DEVICE_ID, required=False)
        assert device
        key = svc.key_for(svc.cfg.sas_key, principal, deviceId=device, moduleId=module)
        svc.authorize(request, "sas-token", device=device if module is None else f"{device}/{module}", key=key)
        subject = f"device '{device}'" if module is None else f"module '{device}/{module}'"
        svc.device_key(request, key, subject, device, hmac=True)
        named = device
        uri, key_name = device_uri(svc.hub_for(text(body, "hub", HOST_NAME, required=False)), device, module), None
    with chosen_key(subject, named, key):  # the caller named the device, not the key
        token, _ = await svc.sas_token(key, uri, ttl, key_name, min_life)
    # expiresInSeconds: the life left by this clock, so a leaf whose clock is wrong renews on time.
    return web.json_response({"token": token.token, "resourceUri": token.resource_uri, "expiresOn": token.expires_on,
                              "expiresInSeconds": max(0, token.expires_on - int(time.time()))})


ROUTES = [web.post("/v1/sas-tokens", create, name="sas-tokens")]
