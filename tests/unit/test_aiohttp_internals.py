"""service/protocol.py builds aiohttp's server by hand to put its own protocol class in (aiohttp
has no option for it), so it depends on names aiohttp does not promise to keep. pyproject.toml
pins aiohttp's minor version for that reason; these tests are the alarm for the day the pin is
moved: each one names the private piece that changed, so the fix starts from the right place.
"""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
from aiohttp import http_exceptions, web, web_protocol, web_server
from aiohttp.http_writer import StreamWriter

from spyrus_hsm.service import protocol


def _moved(what: str) -> str:
    return (f"aiohttp {aiohttp.__version__}: {what}; service/protocol.py depends on it "
            "(update it, then the aiohttp pin in pyproject.toml)")


def test_the_request_handler_still_reports_parser_errors_through_handle_error() -> None:
    handle_error = getattr(web_protocol.RequestHandler, "handle_error", None)
    assert handle_error is not None, _moved("RequestHandler.handle_error is gone")
    params = list(inspect.signature(handle_error).parameters)
    assert params[:5] == ["self", "request", "status", "exc", "message"], _moved(
        f"RequestHandler.handle_error's parameters are now {params}")
    source = inspect.getsource(web_protocol.RequestHandler)
    assert "self.handle_error(" in source, _moved("RequestHandler no longer calls self.handle_error")


def test_the_server_still_builds_its_protocol_from_loop_and_kwargs() -> None:
    params = inspect.signature(web_server.Server.__init__).parameters
    for name in ("handler", "request_factory", "handler_cancellation", "loop", "kwargs"):
        assert name in params, _moved(f"web.Server.__init__ no longer takes {name!r}")
    call = inspect.getsource(web_server.Server.__call__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in call, _moved(
        "web.Server.__call__ no longer builds RequestHandler(self, loop=self._loop, **self._kwargs)")
    init = inspect.getsource(web_server.Server.__init__)
    for attribute in ("self._loop", "self._kwargs", "self.request_handler", "self.request_factory",
                      "self.handler_cancellation"):
        assert attribute in init, _moved(f"web.Server no longer sets {attribute}")


def test_the_app_runner_still_makes_its_server_in_make_server() -> None:
    make_server = getattr(web.AppRunner, "_make_server", None)
    assert make_server is not None, _moved("web.AppRunner._make_server is gone")
    assert inspect.iscoroutinefunction(make_server), _moved("web.AppRunner._make_server is no longer async")


def test_the_response_writer_still_counts_its_output() -> None:
    assert "output_size" in dir(StreamWriter), _moved("StreamWriter.output_size is gone")


def test_the_parser_exceptions_protocol_maps_still_exist() -> None:
    for name in ("BadHttpMethod", "HttpProcessingError", "LineTooLong", "PayloadEncodingError"):
        assert hasattr(http_exceptions, name), _moved(f"aiohttp.http_exceptions.{name} is gone")


def test_a_runner_serves_with_the_projects_protocol_class() -> None:
    async def build() -> None:
        runner = protocol.Runner(web.Application(), handle_signals=False)
        await runner.setup()
        try:
            server = runner.server
            assert isinstance(server, protocol._Server), _moved("AppRunner.server is not the server _make_server made")
            handler = server()
            assert isinstance(handler, protocol._Protocol), _moved("web.Server.__call__ is not used to make protocols")
            assert isinstance(server.request_handler, protocol._GuardedHandler)
        finally:
            await runner.cleanup()

    asyncio.run(build())
