"""RFC 9457 problem details: the one place where failures become HTTP answers.

Handlers raise `Problem` (or let package errors through); `problem_response` renders it, and
`from_exception` maps the package's own errors — so the HTTP layer never guesses at PKCS#11.
Details never quote request data, tokens, keys or PINs: messages of HSM errors are written by
this package and name only labels and reasons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..cloud.dps import RegistrationError
from ..hsm import errors as hsm_errors
from ..identity.sas import SasError
from ..identity.x509 import ChainError

CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://spyrus-hsm.dev/problems/"  # identifiers, documented in the README


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


def from_exception(exc: BaseException, retry_after: int) -> Problem | None:
    """The problem for a known package error; None for anything else (a bug: 500, logged)."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, hsm_errors.HsmBusy):
        return unavailable("the HSM queue is full; retry later", retry_after, "hsm-busy")
    if isinstance(exc, hsm_errors.HsmTimeout):
        return unavailable("the HSM did not answer in time; retry later", retry_after, "hsm-timeout")
    if isinstance(exc, (hsm_errors.HsmUnavailable, hsm_errors.LoginFailed, hsm_errors.HsmConfigError)):
        return unavailable("the HSM is not ready; retry later", retry_after)
    if isinstance(exc, hsm_errors.ObjectNotFound):
        return not_found(str(exc))
    if isinstance(exc, (hsm_errors.InvalidInput, SasError)):
        return bad_request(str(exc))
    if isinstance(exc, hsm_errors.OperationFailed):
        return Problem(422, "operation-failed", "The HSM refused the operation", str(exc))
    if isinstance(exc, ChainError):
        return Problem(422, "credential-invalid", "The stored credential is not usable", str(exc))
    if isinstance(exc, RegistrationError):
        return Problem(502, "registration-failed", "DPS registration failed", str(exc))
    return None
