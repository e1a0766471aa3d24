"""The aiohttp application: middlewares (tracing and metrics, audit, problem+json, authentication,
request timeout) around the routes in routes/. `build_app` is all a server or a test needs.

Middleware order, outermost first: pacing lets a bounded number of requests start per event-loop
iteration (a burst of arrivals never holds the loop for long); telemetry sees the final status of
everything; audit queues one record per /v1 decision (and, when fail_closed, holds a signature
until its record is written and withholds it if that failed); problems turns every failure into
RFC 9457 JSON; auth authenticates and rate-limits /v1 requests; the handler runs under the
request timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import events
from .appkeys import PACER, SERVICE
from .audit import AuditError
from .core import AUDIT, PRINCIPAL, REQUEST_ID, Service
from .pacing import Pacer
from .problems import Problem, from_exception, problem_response, unavailable
from .protocol import http_problem, http_problem_response
from .routes import ROUTES
from .validation import READING_BODY, ClientDisconnected

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SECRET_BEARING = {"sas-tokens", "signatures", "registrations"}
# The policy's operation behind each /v1 route: records written before a route named its operation
# (unauthenticated, rate-limited, invalid requests) carry the same name as the ones after.
ROUTE_OPERATIONS = {"sas-tokens": "sas-token", "signatures": "signature", "registrations": "registration",
                    "registration": "registration", "certificates": "certificate"}
# The status a request the client abandoned ends with (nginx's "client closed request"): no
# answer is sent, and it is no 5xx in metrics; its audit record has status null.
CLIENT_CLOSED = 499
REQUESTS_PER_ITERATION = 8  # a request's first step is ~0.4 ms: about 3-4 ms of new work per loop iteration
_VISIBLE_ASCII = re.compile(r"[!-~]+")


def build_app(service: Service, routes: list[web.RouteDef] | None = None) -> web.Application:
    app = web.Application(
        client_max_size=service.cfg.max_body_bytes,
        # telemetry outermost: a request's span and duration include its wait for a turn (in a
        # storm, that wait is most of what a leaf sees)
        middlewares=[_telemetry, _pace, _audit, _problems, _authenticate],
    )
    app[SERVICE] = service
    app[PACER] = Pacer(REQUESTS_PER_ITERATION)
    app.add_routes(with_expect_handler(ROUTES if routes is None else routes))
    return app


def with_expect_handler(routes: list[web.RouteDef]) -> list[web.RouteDef]:
    return [web.RouteDef(r.method, r.path, r.handler, {"expect_handler": _expect, **r.kwargs}) for r in routes]


async def _expect(request: web.Request) -> None:
    """`Expect: 100-continue`: the body is invited only when it fits; otherwise the handler
    refuses it (413, read_json) without waiting for it. Any other expectation is 417."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed()  # its text would quote the header: see protocol.py
    if request.version < HttpVersion11:
        return
    if request.content_length is not None and request.content_length > request.app[SERVICE].cfg.max_body_bytes:
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not the response: errors can still be sent


def route_name(request: web.Request) -> str | None:
    route = request.match_info.route
    return route.name if route.resource is not None else None


def route_template(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def _pace(request: web.Request, handler: Handler) -> web.StreamResponse:
    await request.app[PACER].turn()
    return await handler(request)


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
            events.request_refused(principal.name if principal is not None else None, status)
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
    given = request.headers.get("X-Request-Id", "")[:64]
    # Echoed in a header, the audit and logs: a caller's own id only when it is plain visible ASCII.
    request[REQUEST_ID] = given if _VISIBLE_ASCII.fullmatch(given) else uuid.uuid4().hex
    peer = request.transport.get_extra_info("peername") if request.transport else None  # gone once it disconnects
    response = await handler(request)
    fields = request.get(AUDIT, {})
    # Only an answer that hands out a secret waits for its record (written off the loop, in a
    # batch); every other record is queued and the answer goes at once.
    withheld_unless_recorded = (svc.audit.fail_closed and response.status < 300
                                and route_name(request) in SECRET_BEARING)
    try:
        await svc.audit.submit(
            wait=withheld_unless_recorded, timeout=svc.cfg.request_timeout,
            principal=fields.get("principal"), operation=fields.get("operation") or _operation(request),
            key=fields.get("key"), device=fields.get("device"),
            status=None if response.status == CLIENT_CLOSED else response.status,
            outcome=_outcome(response.status), reason=fields.get("reason") or _reason(response),
            request_id=request[REQUEST_ID], remote=peer[0] if peer else None)
    except AuditError as exc:
        log.error("%s %s (request %s): %s; nothing was handed out", request.method, route_template(request),
                  request[REQUEST_ID], exc)
        response = problem_response(unavailable("the audit record could not be written; nothing was handed out",
                                                svc.cfg.retry_after, "audit-unavailable"), request[REQUEST_ID])
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response


def _operation(request: web.Request) -> str:
    name = route_name(request)
    return ROUTE_OPERATIONS.get(name, name) if name else "unknown"


def _outcome(status: int) -> str:
    if status < 300:
        return "allowed"
    return {401: "unauthenticated", 403: "denied", 429: "rate-limited", CLIENT_CLOSED: "aborted"}.get(
        status, "error" if status >= 500 else "rejected")


def _reason(response: web.StreamResponse) -> str:
    return response.headers.get("X-Problem-Type", "") or str(response.status)


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICE]
    instance = request.get(REQUEST_ID)
    http_exc = None
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: 404/405 routing, 413 body too large
        if exc.status < 400:
            raise
        problem = http_problem(exc, _http_detail(exc, svc))
        http_exc = exc
    except asyncio.CancelledError:
        raise
    except ClientDisconnected:  # not an error of ours, and there is nobody left to answer
        log.info("the client disconnected before sending all of %s %s (request %s)", request.method,
                 route_template(request), instance)
        response = web.Response(status=CLIENT_CLOSED)
        response.headers["X-Problem-Type"] = "client-disconnected"
        return response
    except Exception as exc:
        found = from_exception(exc, svc.cfg.retry_after,
                               f"{request.method} {route_template(request)} (request {instance})")
        if found is None:
            log.exception("internal error in %s %s (request %s)", request.method, route_template(request), instance)
            found = Problem(500, "internal-error", "Internal error",
                            f"the error is logged under request id {instance}" if instance else None)
        problem = found
        # Answered: its traceback (frames that hold the request, the task that raised it, the
        # exception itself) is a reference cycle only the collector would free. A storm of
        # refused requests made thousands a second, and their collection stalled the loop.
        exc.__traceback__ = None
    response = http_problem_response(problem, http_exc, instance)
    if problem.status in (408, 413):
        response.force_close()  # the rest of the body is not worth waiting for
    return response


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
        if request.get(READING_BODY):  # the client is too slow: its fault, not ours
            raise Problem(408, "body-timeout", "Request timeout",
                          f"the request body did not arrive within {svc.cfg.request_timeout:g} s") from None
        raise unavailable(f"the request did not complete within {svc.cfg.request_timeout:g} s",
                          svc.cfg.retry_after, "request-timeout") from None
