"""The aiohttp application: middlewares (tracing and metrics, audit, problem+json, authentication,
request timeout) around the routes in routes/. `build_app` is all a server or a test needs.

Middleware order, outermost first: telemetry sees the final status of everything; audit writes
one record per /v1 decision before the response leaves (and withholds a signature it could not
record when fail_closed); problems turns every failure into RFC 9457 JSON; auth authenticates
and rate-limits /v1 requests; the handler runs under the request timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from .audit import AuditError
from .core import AUDIT, PRINCIPAL, REQUEST_ID, Service
from .keys import SERVICE
from .problems import Problem, from_exception, problem_response, unavailable
from .routes import ROUTES

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SECRET_BEARING = {"sas-tokens", "signatures", "registrations"}
# The policy's operation behind each /v1 route: records written before a route named its operation
# (unauthenticated, rate-limited, invalid requests) carry the same name as the ones after.
ROUTE_OPERATIONS = {"sas-tokens": "sas-token", "signatures": "signature", "registrations": "registration",
                    "registration": "registration", "certificates": "certificate"}


def build_app(service: Service, routes: list[web.RouteDef] | None = None) -> web.Application:
    app = web.Application(
        client_max_size=service.cfg.max_body_bytes,
        middlewares=[_telemetry, _audit, _problems, _authenticate],
    )
    app[SERVICE] = service
    app.add_routes(ROUTES if routes is None else routes)
    return app


def route_name(request: web.Request) -> str | None:
    route = request.match_info.route
    return route.name if route.resource is not None else None


def route_template(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def _telemetry(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICE]
    template = route_template(request)
    name = f"{request.method} {template}" if template else request.method
    attributes = {"http.request.method": request.method, "url.scheme": request.scheme,
                  "http.route": template or ""}
    started = time.perf_counter()
    status = 500
    parent = propagate.extract(request.headers) if "traceparent" in request.headers else None
    with svc.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                          attributes=attributes, record_exception=False,
                                          set_status_on_exception=False) as span:
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            span.set_attribute("http.response.status_code", status)
            principal = request.get(PRINCIPAL)
            if principal is not None:
                span.set_attribute("enduser.id", principal.name)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            svc.telemetry.metrics.http_request_duration.record(
                time.perf_counter() - started,
                {"http.request.method": request.method, "http.route": template or "",
                 "http.response.status_code": status})


@web.middleware
async def _audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    svc = request.app[SERVICE]
    request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    response = await handler(request)
    fields = request.get(AUDIT, {})
    peer = request.transport.get_extra_info("peername") if request.transport else None
    try:
        svc.audit.record(
            principal=fields.get("principal"), operation=fields.get("operation") or _operation(request),
            key=fields.get("key"), device=fields.get("device"), status=response.status,
            outcome=_outcome(response.status), reason=fields.get("reason") or _reason(response),
            request_id=request[REQUEST_ID], remote=peer[0] if peer else None)
    except AuditError as exc:
        if response.status < 300 and route_name(request) in SECRET_BEARING:
            return problem_response(unavailable(str(exc) + "; nothing was handed out", svc.cfg.retry_after,
                                                "audit-unavailable"), request[REQUEST_ID])
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response


def _operation(request: web.Request) -> str:
    name = route_name(request)
    return ROUTE_OPERATIONS.get(name, name) if name else "unknown"


def _outcome(status: int) -> str:
    if status < 300:
        return "allowed"
    return {401: "unauthenticated", 403: "denied", 429: "rate-limited"}.get(
        status, "error" if status >= 500 else "rejected")


def _reason(response: web.StreamResponse) -> str:
    return response.headers.get("X-Problem-Type", "") or str(response.status)


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICE]
    instance = request.get(REQUEST_ID)
    allow = None
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: 404/405 routing, 413 body too large
        if exc.status < 400:
            raise
        problem = Problem(exc.status, _http_type(exc.status), exc.reason, _http_detail(exc, svc))
        allow = exc.headers.get("Allow")  # a 405 must list the methods the resource has (RFC 9110)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        found = from_exception(exc, svc.cfg.retry_after)
        if found is None:
            log.exception("internal error in %s %s (request %s)", request.method, route_template(request), instance)
            found = Problem(500, "internal-error", "Internal error",
                            f"the error is logged under request id {instance}" if instance else None)
        problem = found
    response = problem_response(problem, instance)
    response.headers["X-Problem-Type"] = problem.type
    if allow is not None:
        response.headers["Allow"] = allow
    return response


def _http_type(status: int) -> str:
    return {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(status, "invalid-request")


def _http_detail(exc: web.HTTPException, svc: Service) -> str:
    if exc.status == 413:
        return f"the request body is larger than {svc.cfg.max_body_bytes} bytes"
    if exc.status == 404:
        return "no such resource; see /openapi.json"
    return exc.reason


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICE]
    if request.path.startswith("/v1/") and route_template(request) is not None:
        svc.authenticate(request)
    try:
        async with asyncio.timeout(svc.cfg.request_timeout):
            return await handler(request)
    except TimeoutError:
        raise unavailable(f"the request did not complete within {svc.cfg.request_timeout:g} s",
                          svc.cfg.retry_after, "request-timeout") from None
