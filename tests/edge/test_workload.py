"""The module as the real edge runtime starts it: no key and no connection string, only the seven
`IOTEDGE_*` variables; the SDK asks the workload API (the emulator's, on a Unix socket) for the
trust bundle and for every SAS signature, and connects to edgeHub with them.

The first tests drive the workload API with the SDK's own client (`edge_hsm.IoTEdgeHsm`), the
last runs `spyrus-hsm serve` under it, through a workload outage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import addresses
import pytest
import requests
from azure.iot.device.iothub.edge_hsm import IoTEdgeError, IoTEdgeHsm
from edge_harness import DEVICE, HUB, MODULE, EdgeSite, ServeProcess

from emulator import Emulator
from emulator.auth import sign
from emulator.pki import EmulatorPki
from emulator.workload import WorkloadApi

pytestmark = [pytest.mark.timeout(150)]
GATEWAY = addresses.host()
CLIENT_ID = f"{DEVICE}/{MODULE}"
SAS_TTL = 130  # the SDK renews 120 s before expiry: a renewal 10 s after each connect


@pytest.fixture
def site(make_emulator: Callable[..., Emulator], emulator_pki: EmulatorPki) -> EdgeSite:
    """edgeHub on an address of this module's own (the other edge tests share edge_harness's)."""
    return EdgeSite(make_emulator(GATEWAY, hub_hostname=HUB), emulator_pki)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="wl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workload(site: EdgeSite, socket_dir: Path) -> Iterator[WorkloadApi]:
    api = site.use_workload(socket_dir / "workload.sock")
    yield api
    api.stop()


def sdk_hsm(api: WorkloadApi, module_id: str = MODULE, generation_id: str | None = None,
            api_version: str = "2019-01-30") -> IoTEdgeHsm:
    return IoTEdgeHsm(module_id, generation_id or api.generation_id, f"unix://{api.socket_path}", api_version)


def refusal(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """The status and body with which the workload API refused the SDK's request."""
    with pytest.raises(IoTEdgeError) as info:
        call()
    cause = info.value.__cause__
    assert isinstance(cause, requests.HTTPError) and cause.response is not None
    return cause.response.status_code, cause.response.json()


def test_the_sdk_signs_with_the_module_key_the_hub_knows(site: EdgeSite, workload: WorkloadApi) -> None:
    uri = f"{HUB}/devices/{DEVICE}/modules/{MODULE}"
    signature = sdk_hsm(workload).sign(f"{quote(uri, safe='')}\n1900000000")
    assert signature == sign(site.module_key, uri, 1900000000)
    assert sdk_hsm(workload).get_certificate() == site.pki.ca_pem


def test_a_wrong_generation_id_is_refused_as_module_not_found(workload: WorkloadApi) -> None:
    status, body = refusal(lambda: sdk_hsm(workload, generation_id="stale-generation").sign("x"))
    assert status == 404 and body["message"].startswith("Module not found")
    assert workload.signatures() == 0


def test_another_modules_id_is_forbidden(workload: WorkloadApi) -> None:
    status, body = refusal(lambda: sdk_hsm(workload, module_id="edgeHub").sign("x"))
    assert (status, body) == (403, {"message": "forbidden"})


def test_an_unknown_api_version_is_refused(workload: WorkloadApi) -> None:
    status, body = refusal(lambda: sdk_hsm(workload, api_version="2099-01-01").get_certificate())
    assert (status, body) == (400, {"message": "Invalid or missing API version"})


def test_serve_under_the_edge_runtime_survives_the_workload_api_going_away(
        site: EdgeSite, workload: WorkloadApi, serve: Callable[..., ServeProcess], token_env: Any) -> None:
    process = serve(token_env.label, token_env.pin_file, f"edge:\n  sas_ttl: {SAS_TTL}\n")
    assert "EdgeHubConnectionString" not in site.env

    site.wait_reported(lambda r: (r.get("hsm") or {}).get("ready") is True, timeout=40)
    assert workload.signatures() >= 1
    assert site.emu.received.accepted_connects(CLIENT_ID)[0].auth_method == "sas"
    assert site.wait_config(site.patch({"logLevel": "debug"}))["status"] == "applied"
    status, body = site.method("getStatus")
    assert status == 200 and body["module"]["gateway"] == site.emu.host and body["hsm"]["ready"] is True

    workload.withdraw()  # aziot-edged restarts: the next renewal cannot be signed
    reported = site.wait_reported(lambda r: "could not be renewed" in ((r.get("lastError") or {}).get("message", "")),
                                  timeout=40)
    assert reported["lastError"]["source"] == "edge"
    assert CLIENT_ID in site.emu.connected()  # the current token still holds
    connects = len(site.emu.received.accepted_connects(CLIENT_ID))
    signed = workload.signatures()

    workload.restore()
    site.emu.wait_for(lambda: len(site.emu.received.accepted_connects(CLIENT_ID)) > connects, timeout=40)
    assert workload.signatures() > signed
    assert site.wait_config(site.patch({"logLevel": "info"}))["status"] == "applied"
    assert site.method("getStatus")[0] == 200
    expired = [d for d in site.emu.received.disconnects if d.client_id == CLIENT_ID and "expired" in d.reason]
    assert expired == []

    assert process.terminate() == 0, process.text()
    text = process.text()
    assert "Traceback" not in text and site.module_key not in text
