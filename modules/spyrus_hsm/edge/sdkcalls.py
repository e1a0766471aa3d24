"""The agent's calls into azure-iot-device: each in a `threads.Lane` with a deadline (the
synchronous SDK waits for ever), so calls that never return hold at most the lane's width of
threads; what the SDK raises comes out as a `sdkerrors.HubError` naming the hub and the reason.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from azure.iot.device import IoTHubModuleClient

from ..errors import one_line
from ..sdkerrors import HubTimeout, translate
from ..threads import Lane
from .environment import EdgeEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")


class SdkCalls:
    def __init__(self, env: EdgeEnvironment, timeout: float, options: dict[str, Any]) -> None:
        self.timeout = timeout     # the SDK's connect and twin GET/PATCH wait for an answer forever
        self.options = options
        self.hub = f"{env.hub_hostname} via edgeHub {env.gateway_hostname}"
        self.client_id = f"{env.device_id}/{env.module_id}"
        self.connects = Lane("edge-connect", 2)  # making a client (workload API) and connecting it
        self.calls = Lane("edge-sdk-call", 2)    # twin reads and patches, method responses
        self.closes = Lane("edge-shutdown", 2)

    def new_client(self, what: str = "making a client") -> Any:
        """A module client from the environment; under IoT Edge this asks the workload API for
        the trust bundle and the first token's signature."""
        return self._call(self.connects, what, functools.partial(
            IoTHubModuleClient.create_from_edge_environment, ensure_desired_properties=False, **self.options))

    def connect(self, client: Any) -> None:
        """`client.connect()` within the deadline; a connect that succeeds only after it was
        given up on is shut down again (it would push the next client off: one id)."""
        abandoned = threading.Event()

        def connect() -> None:
            client.connect()
            if abandoned.is_set():
                shutdown_quietly(client)

        try:
            self._call(self.connects, "connecting", connect)
        except BaseException:
            abandoned.set()
            raise

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """A twin read or patch, or a method response (HubTimeout if no answer in time)."""
        return self._call(self.calls, what, fn)

    def close(self, client: Any, seconds: float) -> bool:
        """Shut `client` down, waiting at most `seconds`; False if it did not finish."""
        try:
            self.closes.call(functools.partial(shutdown_quietly, client), seconds, "closing the IoT Edge client")
        except TimeoutError:
            return False
        return True

    def close_later(self, client: Any) -> None:
        """Shut `client` down in the background (waiting for a place in the lane, if earlier
        shutdowns hang, at most the SDK deadline)."""
        try:
            self.closes.submit(functools.partial(shutdown_quietly, client), self.timeout,
                               "closing the IoT Edge client")
        except TimeoutError as exc:
            log.warning("IoT Edge client not shut down: %s", exc)

    def _call(self, lane: Lane, what: str, fn: Callable[[], T]) -> T:
        try:
            return lane.call(fn, self.timeout, what)
        except TimeoutError as exc:
            raise HubTimeout(f"IoT Hub {self.hub} ({self.client_id}) did not answer within {self.timeout:g} s "
                             f"while {what}") from exc
        except Exception as exc:
            raise translate(exc, self.hub, self.client_id, what) from exc


def shutdown_quietly(client: Any) -> None:
    try:
        client.shutdown()
    except Exception as exc:
        log.debug("IoT Edge client shutdown: %s", one_line(exc))
