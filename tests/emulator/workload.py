"""The IoT Edge workload API for one module, on a Unix socket: what a module's SDK asks the
edge runtime (aziot-edged) instead of holding its key.

azure-iot-device's ``iothub/edge_hsm.py`` makes two requests, both with ``?api-version=`` set
from ``IOTEDGE_APIVERSION``:

- ``POST /modules/{moduleId}/genid/{generationId}/sign`` with
  ``{"keyId": "primary", "algo": "HMACSHA256", "data": "<base64>"}`` -> ``{"digest": "<base64>"}``,
  the HMAC-SHA256 of ``data`` under the module's primary key: here the key the emulated hub
  registered for the module (``Emulator.primary_key``), so the hub accepts what it signs;
- ``GET /trust-bundle`` -> ``{"certificate": "<PEM>"}``, the CA the module trusts for edgeHub.

Refusals carry the runtime's error body, ``{"message": "..."}``:

- a module id that is not this module: 403 ``forbidden`` (aziot-edged authorises the caller by
  its process and answers 403 to a process that is not that module);
- a generation id that is not the module's, or a key id other than ``primary``: 404 ``Module not
  found`` with the runtime's "caused by" line (the key is looked up by name and generation, so a
  stale ``IOTEDGE_MODULEGENERATIONID`` finds nothing);
- no or an unknown ``api-version``: 400 ``Invalid or missing API version``;
- an unreadable body 400, data that is not base64 422, as the runtime answers them.

``withdraw()`` stops serving and removes the socket, as when aziot-edged restarts;
``restore()`` serves again on the same path.

    api = WorkloadApi(emu, tmp_path / "workload.sock", "edge1", "spyrus_hsm", ca_pem).start()
    env = api.environment(hub="hub.example", gateway=emu.host)   # the seven IOTEDGE_* variables
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .core import Emulator

#: Workload API versions aziot-edged accepts (its ApiVersion enum).
API_VERSIONS = ("2018-06-28", "2019-01-30", "2019-10-22", "2019-11-05", "2020-07-07", "2021-12-07",
                "2022-08-03")
DEFAULT_API_VERSION = "2019-01-30"
_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkloadRequest:
    """One request the workload API answered (never the data it signed)."""

    method: str
    path: str
    status: int


class WorkloadApi:
    """The workload API for module ``device_id/module_id`` of ``emulator``'s hub."""

    def __init__(self, emulator: Emulator, socket_path: Path, device_id: str, module_id: str,
                 trust_bundle: str, generation_id: str | None = None) -> None:
        self.emulator = emulator
        self.socket_path = socket_path
        self.device_id = device_id
        self.module_id = module_id
        self.generation_id = generation_id or secrets.token_hex(8)
        self.trust_bundle = trust_bundle
        self.requests: list[WorkloadRequest] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="workload-api", daemon=True)
        self._runner: web.AppRunner | None = None

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> WorkloadApi:
        self._thread.start()
        self.restore()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.withdraw()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_TIMEOUT)

    def withdraw(self) -> None:
        """Stop answering and remove the socket file (the runtime is restarting)."""
        self._run(self._close())

    def restore(self) -> None:
        """Listen on the socket path again."""
        self._run(self._open())

    @property
    def serving(self) -> bool:
        return self._runner is not None

    def signatures(self) -> int:
        """Signatures handed out so far."""
        return sum(1 for r in list(self.requests) if r.path.endswith("/sign") and r.status == 200)

    def environment(self, hub: str, gateway: str, api_version: str = DEFAULT_API_VERSION) -> dict[str, str]:
        """The seven variables the edge runtime sets in the module's container."""
        return {
            "IOTEDGE_IOTHUBHOSTNAME": hub, "IOTEDGE_DEVICEID": self.device_id,
            "IOTEDGE_MODULEID": self.module_id, "IOTEDGE_GATEWAYHOSTNAME": gateway,
            "IOTEDGE_MODULEGENERATIONID": self.generation_id, "IOTEDGE_WORKLOADURI": f"unix://{self.socket_path}",
            "IOTEDGE_APIVERSION": api_version,
        }

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_TIMEOUT)

    async def _open(self) -> None:
        if self._runner is not None:
            return
        self.socket_path.unlink(missing_ok=True)
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/modules/{module}/genid/{genid}/sign", self._sign)
        app.router.add_get("/trust-bundle", self._trust_bundle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(self.socket_path)).start()
        self._runner = runner

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.socket_path.unlink(missing_ok=True)

    # --- routes ---------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.query.get("api-version") not in API_VERSIONS:
            response: web.StreamResponse = _error(400, "Invalid or missing API version")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason)
        self.requests.append(WorkloadRequest(request.method, request.path, response.status))
        return response

    async def _trust_bundle(self, request: web.Request) -> web.Response:
        return web.json_response({"certificate": self.trust_bundle})

    async def _sign(self, request: web.Request) -> web.Response:
        if request.match_info["module"] != self.module_id:
            return _error(403, "forbidden")
        try:
            body = json.loads(await request.read())
            key_id, algo, data = body["keyId"], body["algo"], body["data"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "Bad body")
        if request.match_info["genid"] != self.generation_id or key_id != "primary":
            return _error(404, "Module not found\n\tcaused by: Item not found.")
        if algo != "HMACSHA256":
            return _error(400, f"Bad body\n\tcaused by: unknown algorithm {algo!r}")
        try:
            message = base64.b64decode(data, validate=True)
        except (binascii.Error, TypeError, ValueError):
            return _error(422, "Invalid base64 string")
        key = await asyncio.to_thread(self.emulator.primary_key, self.device_id, self.module_id)
        digest = hmac.new(base64.b64decode(key), message, hashlib.sha256).digest()
        return web.json_response({"digest": base64.b64encode(digest).decode()})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)
