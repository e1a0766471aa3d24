"""pytest fixtures for the emulator; import them into a conftest or a test module:

    from emulator.fixtures import emulator_pki, make_emulator, sdk_clients  # noqa: F401

or, in a test module, ``pytest_plugins = ["emulator.fixtures"]``.

``make_emulator(host)`` starts an Emulator with a server certificate for ``host`` signed by
``emulator_pki.root`` (pass ``emulator_pki.ca_pem`` as the SDK's ``server_verification_cert``)
and stops it at teardown. Give each test module its own host from ``addresses.host()`` (the
test session's own loopback addresses); without one, each emulator gets a host of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import addresses
import pytest

from .auth import new_symmetric_key
from .core import Emulator
from .pki import EmulatorPki


@pytest.fixture(scope="session")
def emulator_pki(tmp_path_factory: pytest.TempPathFactory) -> EmulatorPki:
    """Root + intermediate CA; PEM files under a session temporary directory."""
    return EmulatorPki(tmp_path_factory.mktemp("emulator-pki"))


@pytest.fixture
def make_emulator(emulator_pki: EmulatorPki) -> Iterator[Callable[..., Emulator]]:
    """Factory: ``make_emulator(host, **Emulator kwargs)`` -> a started Emulator."""
    started: list[Emulator] = []

    def factory(host: str | None = None, **kwargs: Any) -> Emulator:
        host = host or addresses.host()
        names = [host, kwargs.get("hub_hostname") or host]
        files = emulator_pki.server(names)
        emulator = Emulator(host, server_cert=files.cert_file, server_key=files.key_file, **kwargs)
        started.append(emulator.start())
        return emulator

    yield factory
    for emulator in reversed(started):
        emulator.stop()


__all__ = ["emulator_pki", "make_emulator", "new_symmetric_key", "sdk_clients"]


class _ShutsDown(Protocol):
    def shutdown(self) -> None: ...


@pytest.fixture
def sdk_clients() -> Iterator[Callable[[Any], Any]]:
    """``client = sdk_clients(IoTHubDeviceClient.create_from_...(...))``: shut down at teardown
    so no SDK threads outlive the test."""
    clients: list[_ShutsDown] = []

    def track(client: Any) -> Any:
        clients.append(client)
        return client

    yield track
    for client in reversed(clients):
        with contextlib.suppress(Exception):
            client.shutdown()
