"""GET /healthz (the process answers), GET /readyz (the HSM is present and logged in),
GET /openapi.json. No authentication: they reveal no names beyond the token's label."""

from __future__ import annotations

from aiohttp import web

from ..keys import SERVICE
from ..openapi import spec
from ..problems import Problem, problem_response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    state = svc.hsm.state
    if state.ready:
        return web.json_response({"ready": True, "status": state.status, "token": state.token_label,
                                  "lastChange": state.last_change})
    return problem_response(Problem(503, "not-ready", "The HSM is not ready", state.reason or state.status,
                                    retry_after=svc.cfg.retry_after,
                                    extra={"ready": False, "status": state.status}))


async def openapi(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(spec(svc.cfg, default_hub=svc.default_hub() is not None,
                                  default_id_scope=bool(svc.deps.cloud.id_scope)))


ROUTES = [
    web.get("/healthz", healthz, name="healthz"),
    web.get("/readyz", readyz, name="readyz"),
    web.get("/openapi.json", openapi, name="openapi"),
]
