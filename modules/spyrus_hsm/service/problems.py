"""RFC 9457 problem details: the one place where failures become HTTP answers.

Handlers raise `Problem` (or let package errors through); `problem_response` renders it, and
`from_exception` looks a package error's kind up in `HTTP` — so the HTTP layer never guesses at
PKCS#11, and a new error class needs no change here. Details never quote request data, tokens,
keys or PINs. A package error's message is written for the operator (what the token holds,
paths, readers, what to do); a caller is told only its `public` text, which names what the
caller asked for, or else the fixed detail of its kind, and the message goes to the log, one
line per answer.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..errors import Kind, SpyrusError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/problem+json"
# The `type` of every problem is TYPE_BASE + one of the names in TYPES: an identifier (compare it,
# do not fetch it); the reference's problem types page is generated from TYPES.
TYPE_BASE = "https://spyrus-hsm.dev/problems/"


@dataclass
class Problem(Exception):
    status: int
    type: str          # the short name; rendered as TYPE_BASE + type
    title: str
    detail: str | None = None
    retry_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.detail or self.title}"


@dataclass(frozen=True)
class ProblemType:
    """What a caller (and the operator behind it) should know about one problem type."""
    status: tuple[int, ...]     # the HTTP statuses it comes with
    when: str                   # what makes the service answer it
    action: str                 # what the caller, or the operator, can do about it
    retry_after: bool = False   # always with Retry-After: trying again after it may work


_LOG = "the module's log has the reason, under the request id (the problem's `instance`)"

# Every problem type the service answers. tests/unit/test_docs.py checks that each type the code
# raises is here and described.
TYPES: dict[str, ProblemType] = {
    "invalid-request": ProblemType(
        (400,), "a field is missing, unknown, of the wrong type or outside its pattern or range (the "
        "detail names it), or the HSM cannot use what the request names (a key of the wrong kind)",
        "fix the request as the detail says; do not retry it unchanged"),
    "malformed-request": ProblemType(
        (400,), "the request is not well-formed HTTP/1.1 (its request line, header section or body "
        "framing); refused before it reaches a handler", "fix the client's HTTP; do not retry unchanged"),
    "unsupported-media-type": ProblemType(
        (415,), "a request body that is not `application/json`", "send `Content-Type: application/json`"),
    "payload-too-large": ProblemType(
        (413,), "the body is larger than `service.max_body_bytes`; the connection is closed",
        "send a smaller body"),
    "header-too-large": ProblemType(
        (431,), "the request line or a header field is too long", "send shorter headers"),
    "expectation-failed": ProblemType(
        (417,), "an `Expect` header other than `100-continue`", "leave the header out"),
    "method-not-allowed": ProblemType(
        (405,), "the route exists but not with this method (the `Allow` header lists its methods)",
        "use a method the `Allow` header lists"),
    "not-found": ProblemType(
        (404,), "no such route, no stored registration or certificate under that name, or a key that "
        "is not declared for callers (a reserved key looks the same as a missing one)",
        "check the name; `GET /openapi.json` lists the routes"),
    "body-timeout": ProblemType(
        (408,), "the request body did not arrive within `service.request_timeout`; the connection is "
        "closed", "send the body promptly after the headers"),
    "unauthenticated": ProblemType(
        (401,), "no client certificate from the configured CA and no bearer token, an `Authorization` "
        "header that is not `Bearer <token>`, or a certificate and a token naming different principals",
        "present a leaf certificate (mutual TLS) or `Authorization: Bearer <token>`; "
        "`WWW-Authenticate` names the scheme"),
    "invalid-token": ProblemType(
        (401,), "the bearer token is not one of `service.bearer_tokens`",
        "use the token the operator issued; after a rotation, the new one"),
    "certificate-rejected": ProblemType(
        (401,), "the client certificate does not qualify (e.g. not usable for client authentication, "
        "or without a usable name); the detail says why", "present a leaf certificate issued for "
        "client authentication by the configured CA"),
    "forbidden": ProblemType(
        (403,), "authenticated, but no `service.policy` rule lets this principal do this operation on "
        "this device or key", "ask the operator for a policy rule; retrying does not help"),
    "rate-limited": ProblemType(
        (429,), "the principal went past `service.rate_limit_per_second`, or its source address past "
        "`service.unauthenticated_per_second` of failed authentications",
        "wait the seconds in `Retry-After`, then retry", retry_after=True),
    "conflict": ProblemType(
        (409,), "the request conflicts with what the HSM holds (a label taken, or a name matching "
        "several objects)", "the operator resolves the labels in the token; retrying does not help"),
    "operation-failed": ProblemType(
        (422,), "the HSM refused the operation (e.g. the key does not allow it)",
        f"retrying does not help; {_LOG}"),
    "credential-invalid": ProblemType(
        (422,), "the stored credential the request needs is not usable (e.g. an incomplete or expired "
        "certificate chain)", f"the operator replaces the credential; {_LOG}"),
    "registration-failed": ProblemType(
        (502,), "DPS did not complete the registration (refused, unreachable, or timed out after "
        "`service.registration_timeout`)", f"retry later; if it persists, {_LOG}"),
    "hsm-unavailable": ProblemType(
        (503,), "the HSM is not ready (token missing, PIN refused, library failing)",
        "wait the seconds in `Retry-After`, then retry; the operator sees `SpyrusHsmNotReady`",
        retry_after=True),
    "hsm-busy": ProblemType(
        (503,), "the HSM's queue is full (`hsm.queue_limit`)",
        "wait the seconds in `Retry-After` (spread over the queue's drain time), then retry",
        retry_after=True),
    "hsm-timeout": ProblemType(
        (503,), "the HSM did not answer within `hsm.call_timeout`",
        "wait the seconds in `Retry-After`, then retry", retry_after=True),
    "request-timeout": ProblemType(
        (503,), "the request did not complete within `service.request_timeout` (the HSM or DPS slow)",
        "wait the seconds in `Retry-After`, then retry", retry_after=True),
    "audit-unavailable": ProblemType(
        (503,), "the audit record of an answer that hands out a secret could not be written "
        "(`service.audit_fail_closed`); nothing was handed out",
        "wait the seconds in `Retry-After`, then retry; the operator sees `SpyrusHsmAuditRecordsDropped` "
        "or the log", retry_after=True),
    "not-configured": ProblemType(
        (503,), "the module is not set up for this request (e.g. no default hub or ID scope, a "
        "missing template or certificate)", f"the operator fixes the configuration; {_LOG}"),
    "not-ready": ProblemType(
        (503,), "`GET /readyz`: the HSM is not ready, or the API is not serving yet; the body adds "
        "`ready` and `status`", "probes: wait and ask again (`Retry-After`)", retry_after=True),
    "internal-error": ProblemType(
        (500,), "a bug: an error the service did not expect", f"report it; {_LOG}"),
}


def bad_request(detail: str, **extra: Any) -> Problem:
    return Problem(400, "invalid-request", "The request is not valid", detail, extra=extra)


def unauthenticated(detail: str) -> Problem:
    return Problem(401, "unauthenticated", "Authentication required", detail)


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", "Not allowed by policy", detail)


def not_found(detail: str) -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def unavailable(detail: str, retry_after: int, kind: str = "hsm-unavailable") -> Problem:
    return Problem(503, kind, "Service temporarily unavailable", detail, retry_after=retry_after)


def problem_response(p: Problem, instance: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": TYPE_BASE + p.type, "title": p.title, "status": p.status}
    if p.detail:
        body["detail"] = p.detail
    if instance:
        body["instance"] = instance
    body.update(p.extra)
    headers = {"Retry-After": str(p.retry_after)} if p.retry_after is not None else None
    if p.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="spyrus-hsm"'}
    return web.Response(status=p.status, text=json.dumps(body), content_type=CONTENT_TYPE,
                        headers=headers)


@dataclass(frozen=True)
class Answer:
    """How one kind of error is answered over HTTP."""
    status: int
    type: str
    title: str
    detail: str                 # sent when the error has no public text (see the module docstring)
    retry: bool = False         # with Retry-After: trying again later may work


_UNAVAILABLE = "Service temporarily unavailable"
_INVALID = "The request is not valid"

HTTP: dict[Kind, Answer] = {
    Kind.USAGE: Answer(400, "invalid-request", _INVALID, "the request is not valid"),
    Kind.INVALID: Answer(400, "invalid-request", _INVALID, "the HSM cannot use what the request gives or names"),
    Kind.CONFIG: Answer(503, "not-configured", "The module is not set up for this",
                        "the module's configuration or installation needs fixing; its log says why"),
    Kind.NOT_FOUND: Answer(404, "not-found", "Not found", "nothing by that name"),
    Kind.CONFLICT: Answer(409, "conflict", "Conflicts with what the HSM holds",
                          "the request conflicts with what the HSM holds"),
    Kind.REFUSED: Answer(422, "operation-failed", "The HSM refused the operation",
                         "the HSM refused the operation; the module's log says why"),
    Kind.CREDENTIAL: Answer(422, "credential-invalid", "The stored credential is not usable",
                            "the credential the request needs is not usable; the module's log says why"),
    Kind.UNAVAILABLE: Answer(503, "hsm-unavailable", _UNAVAILABLE, "the HSM is not ready; retry later", True),
    Kind.BUSY: Answer(503, "hsm-busy", _UNAVAILABLE, "the HSM queue is full; retry later", True),
    Kind.TIMEOUT: Answer(503, "hsm-timeout", _UNAVAILABLE, "the HSM did not answer in time; retry later", True),
    Kind.UPSTREAM: Answer(502, "registration-failed", "DPS registration failed",
                          "DPS did not complete the registration; the module's log says why"),
}


def from_exception(exc: BaseException, retry_after: int, where: str = "a request") -> Problem | None:
    """The problem for a package error, by its kind; None for anything else (a bug: 500, logged).
    When the caller is told less than the message, the message is logged, naming `where`."""
    if isinstance(exc, Problem):
        return exc
    if not isinstance(exc, SpyrusError):
        return None
    answer = HTTP[exc.kind]
    detail = exc.public or exc.public_detail or answer.detail
    if detail != str(exc):
        log.log(_level(exc.kind, answer.status), "%s answered %d %s: %s", where, answer.status, answer.type, exc)
    return Problem(answer.status, answer.type, answer.title, detail,
                   retry_after=_retry_after(exc, retry_after) if answer.retry else None)


# A busy, absent or slow HSM is already told once by the HSM's own state (its log line, /readyz,
# the twin, the metrics); a storm answers it thousands of times a second, and a log line each
# would cost the event loop more than the answers.
_TRANSIENT = {Kind.BUSY, Kind.UNAVAILABLE, Kind.TIMEOUT}


def _level(kind: Kind, status: int) -> int:
    if kind is Kind.CONFIG:
        return logging.ERROR
    if kind in _TRANSIENT:
        return logging.DEBUG
    return logging.WARNING if status >= 500 else logging.INFO


def _retry_after(exc: SpyrusError, default: int) -> int:
    """Seconds before a refused caller should try again. When the HSM queue is full and its
    drain time is known, callers are spread over its second half, so they come back while the
    queue still has work and the token never idles: a storm of new leaves told "1 s" all came
    back together every second and mostly bounced again, spending the event loop on refusals."""
    drain: float | None = getattr(exc, "drain_seconds", None)
    if not drain:
        return default
    spread = random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
    return max(default, math.floor(drain * spread))
