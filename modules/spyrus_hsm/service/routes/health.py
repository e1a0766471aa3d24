"""GET /healthz (the process answers), GET /readyz (the HSM is present and logged in, and the API listens),
GET /openapi.json. No authentication. On the API's port, which leaves reach, /readyz says ready or
not and a short public reason; the full reason (token, reader, what to fix) is on the health
port, which stays on loopback, and in the twin."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..appkeys import API_NOT_SERVING, SERVICE
from ..openapi import spec
from ..problems import Problem, problem_response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a leaf would be served: the HSM is ready and the API serves. The health
    listener asks the API's listener (API_NOT_SERVING); on the API itself that part is evident."""
    svc = request.app[SERVICE]
    state = svc.hsm.state
    api = request.app.get(API_NOT_SERVING)
    if api is None:  # the API's own port: public answers only
        if state.ready:
            body: dict[str, Any] = {"ready": True, "status": state.status}
            if state.members:  # two tokens: whether one is missing (which one: on the health port)
                body["degraded"] = bool(state.degraded)
            return web.json_response(body)
        return _not_ready("The HSM is not ready", f"the HSM is {state.status}", state.status, svc.cfg.retry_after)
    not_serving = api() if state.ready else None
    if state.ready and not_serving is None:
        full: dict[str, Any] = {"ready": True, "status": state.status, "token": state.token_label,
                                "lastChange": state.last_change}
        if state.members:  # two tokens: which is missing, and each one's own state
            full["degraded"] = state.degraded
            full["tokens"] = [{"label": m.token_label, "serial": m.token_serial, "ready": m.ready,
                               "status": m.status, "reason": m.reason} for m in state.members]
        return web.json_response(full)
    title = "The HSM is not ready" if not state.ready else "The API is not serving yet"
    return _not_ready(title, not_serving or state.reason or state.status, state.status, svc.cfg.retry_after)


def _not_ready(title: str, detail: str, status: str, retry_after: int) -> web.Response:
    return problem_response(Problem(503, "not-ready", title, detail, retry_after=retry_after,
                                    extra={"ready": False, "status": status}))


async def openapi(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(spec(svc.cfg, default_hub=svc.default_hub() is not None,
                                  default_id_scope=bool(svc.deps.cloud.id_scope)))


ROUTES = [
    web.get("/healthz", healthz, name="healthz"),
    web.get("/readyz", readyz, name="readyz"),
    web.get("/openapi.json", openapi, name="openapi"),
]
