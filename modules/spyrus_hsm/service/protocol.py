"""aiohttp's connection handling, made to answer what never reaches the application without
repeating the request: a request the HTTP parser refuses, and what is raised outside the
middlewares (an unknown Expect, routing of the health listener).

aiohttp answers a request its parser refuses with the parser's message, which quotes the raw
request bytes (bearer token included), and logs it with a traceback at ERROR. Here the answer
is problem+json with a fixed detail and the log one WARNING line, whichever parser (C or pure
Python) refused it. aiohttp has no option for its protocol class, so `Runner` builds the same
server as AppRunner does with the subclass below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong, PayloadEncodingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .problems import Problem, problem_response

log = logging.getLogger(__name__)
_HTTP_TYPES = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large", 417: "expectation-failed",
               431: "header-too-large"}


def parser_problem(status: int, exc: BaseException | None) -> Problem:
    """What to answer for a request aiohttp refused before any handler ran. Only the class of the
    error is used: its message quotes the request."""
    if isinstance(exc, LineTooLong):
        return Problem(431, "header-too-large", "Request header fields too large",
                       "the request line or a header field is too long")
    if isinstance(exc, BadHttpMethod):
        return Problem(400, "malformed-request", "The request is not HTTP",
                       "the request line is not an HTTP/1.1 request line")
    if isinstance(exc, PayloadEncodingError):
        return Problem(400, "malformed-request", "The request is not well-formed HTTP",
                       "the request body's framing (its length or chunked encoding) is malformed")
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return Problem(400 if status >= 500 else status, "malformed-request", "The request is not well-formed HTTP",
                       "the request line or header section is malformed (line endings are CRLF; "
                       "header values hold no control characters)")
    return Problem(status, "internal-error", "Internal error", None)


def http_problem(exc: web.HTTPException, detail: str | None = None) -> Problem:
    """aiohttp's own HTTP errors (routing, sizes, Expect) as problems. Their text is not used:
    some quote the request (an unknown Expect value)."""
    return Problem(exc.status, _HTTP_TYPES.get(exc.status, "invalid-request"), exc.reason, detail)


def http_problem_response(problem: Problem, exc: web.HTTPException | None = None,
                          instance: str | None = None) -> web.Response:
    """The problem's answer, with its type in X-Problem-Type (for the audit record) and the
    methods a resource has when it is a 405 (RFC 9110 wants them listed)."""
    response = problem_response(problem, instance)
    response.headers["X-Problem-Type"] = problem.type
    if exc is not None and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


class _Protocol(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        problem = parser_problem(status, exc)
        name = type(exc).__name__ if exc is not None else str(status)
        if problem.status >= 500:
            log.error("internal error answering %s (%s)", request.remote, name, exc_info=exc)
        else:
            log.warning("refused a malformed request from %s: %s (%s)", request.remote, problem.detail, name)
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection is broken
            raise ConnectionError("the response has already begun")
        response = http_problem_response(problem)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class _GuardedHandler:
    """The application's entry point, with aiohttp's HTTP errors raised before the middlewares
    (the default Expect handler, the health listener's routing) answered as problems."""

    def __init__(self, inner: Callable[[BaseRequest], Awaitable[web.StreamResponse]]) -> None:
        self._inner = inner

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        try:
            return await self._inner(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_problem_response(http_problem(exc), exc)


class Runner(web.AppRunner):
    """web.AppRunner with the protocol above."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(_GuardedHandler(made.request_handler), request_factory=made.request_factory,
                       handler_cancellation=made.handler_cancellation, loop=asyncio.get_running_loop(),
                       **made._kwargs)
