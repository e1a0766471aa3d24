"""POST /v1/signatures: sign caller-supplied bytes with an HSM key the policy lets the caller
name and the configuration declares for it (service.signing_keys; never a reserved key: see
keyroles). ES256/ES384 answer the raw r||s (JWS form), the others the PKCS#11 output as is."""

from __future__ import annotations

import base64

from aiohttp import web

from ...hsm import SignAlgorithm
from ..appkeys import SERVICE
from ..core import Service
from ..validation import LABEL, base64_data, choice, only, read_json, text

ALGORITHMS = {
    "HMAC-SHA256": SignAlgorithm.HMAC_SHA256,
    "ES256": SignAlgorithm.ECDSA_SHA256,
    "ES384": SignAlgorithm.ECDSA_SHA384,
    "PS256": SignAlgorithm.RSA_PSS_SHA256,
    "RS256": SignAlgorithm.RSA_PKCS1_SHA256,
}


async def create(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = await read_json(request)
    only(body, "key", "algorithm", "data")
    key = text(body, "key", LABEL)
    algorithm = ALGORITHMS[choice(body, "algorithm", tuple(ALGORITHMS))]
    data = base64_data(body, "data")
    assert key
    svc.authorize(request, "signature", key=key, key_named_by_caller=True)
    signature = await svc.sign_for_caller(request, key, algorithm, data)
    return web.json_response({"signature": base64.b64encode(signature).decode("ascii")})


ROUTES = [web.post("/v1/signatures", create, name="signatures")]
