"""GET /v1/certificates/{label}: the PEM certificate chain stored in the HSM beside a key."""

from __future__ import annotations

import re

from aiohttp import web

from ...identity.x509 import chain_pem
from ..appkeys import SERVICE
from ..core import Service
from ..problems import bad_request, not_found
from ..validation import LABEL


async def get(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    label = request.match_info["label"]
    if not re.fullmatch(LABEL, label):
        raise bad_request(f"the label must match {LABEL}")
    svc.authorize(request, "certificate", key=label, key_named_by_caller=True)
    chain = await svc.hsm.acertificate_chain(label)
    if not chain:
        raise not_found(f"no certificate is stored for '{label}'")
    return web.Response(body=chain_pem(chain), content_type="application/pem-certificate-chain")


ROUTES = [web.get("/v1/certificates/{label}", get, name="certificates")]
