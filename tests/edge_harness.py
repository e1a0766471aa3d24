"""The module under IoT Edge, for real (fixtures in tests/edge/conftest.py): the emulator acts
as edgeHub on an address of the test session's own (a gateway host name distinct from the hub
name, as on an edge device), the SDK connects through the `EdgeHubConnectionString` +
`EdgeModuleCACertificateFile` fallback of `create_from_edge_environment` (or, after
`EdgeSite.use_workload`, with the seven `IOTEDGE_*` variables and the emulator's workload API),
and the emulator checks the module's SAS against its key. `ServeProcess` runs `spyrus-hsm serve`
in a process of its own, as edgeAgent does.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import addresses
import yaml

from emulator import Emulator, new_symmetric_key
from emulator.pki import EmulatorPki
from emulator.workload import WorkloadApi
from spyrus_hsm import config, telemetry
from spyrus_hsm.runtime import Module

GATEWAY = addresses.host()
HUB = "edge-test-hub.azure-devices.net"
DEVICE, MODULE = "edge1", "spyrus_hsm"
API_HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]


class EdgeSite:
    """The emulator as edgeHub with this module's identity registered, and the environment
    the edge runtime would give the module."""

    def __init__(self, emu: Emulator, pki: EmulatorPki) -> None:
        self.emu = emu
        self.pki = pki
        self.workload: WorkloadApi | None = None
        self.module_key = new_symmetric_key()
        emu.add_device(DEVICE, symmetric_key=new_symmetric_key())
        emu.add_module(DEVICE, MODULE, symmetric_key=self.module_key)
        self.env = {
            "EdgeHubConnectionString": f"HostName={HUB};DeviceId={DEVICE};ModuleId={MODULE};"
                                       f"SharedAccessKey={self.module_key};GatewayHostName={GATEWAY}",
            "EdgeModuleCACertificateFile": str(pki.ca_file),
        }

    def use_workload(self, socket_path: Path) -> WorkloadApi:
        """Run the workload API on `socket_path` and give the module the edge runtime's seven
        variables instead of the connection string (the module key stays in the emulator)."""
        self.workload = WorkloadApi(self.emu, socket_path, DEVICE, MODULE, self.pki.ca_pem).start()
        self.env = self.workload.environment(hub=HUB, gateway=self.emu.host)
        return self.workload

    def reported(self) -> dict[str, Any]:
        return self.emu.twin(DEVICE, MODULE)["reported"]

    def wait_reported(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 20.0) -> dict[str, Any]:
        """The reported properties once `predicate` holds for them."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            doc = self.reported()
            if predicate(doc):
                found.append(doc)
                return True
            return False

        self.emu.wait_for(check, timeout)
        return found[0]

    def patch(self, desired: dict[str, Any]) -> int:
        return self.emu.send_desired_patch(DEVICE, desired, MODULE)

    def wait_config(self, version: int) -> dict[str, Any]:
        """The reported `config` section once desired `version` has been handled."""
        doc = self.wait_reported(lambda r: (r.get("config") or {}).get("desiredVersion") == version)
        return dict(doc["config"])

    def method(self, name: str, payload: Any = None) -> tuple[int, Any]:
        return self.emu.invoke_method(DEVICE, name, payload, module_id=MODULE, timeout=25.0)


class RunningModule:
    """`Module.run` on its own event loop thread, as `serve` runs it."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),),
                                       name="module-loop", daemon=True)
        self.ready = threading.Event()

    async def _main(self) -> None:
        self.stop_event = asyncio.Event()
        self.ready.set()
        await self.module.run(self.stop_event)

    def start(self) -> RunningModule:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> bool:
        """Stop as SIGTERM does; True when run() returned within edgeAgent's 10 s."""
        if self.thread.is_alive():
            assert self.stop_event is not None
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(10)
        stopped = not self.thread.is_alive()
        if stopped:
            self.loop.close()
        return stopped


class ModuleSite:
    """A Module with the HTTP service on loopback, its config file, and a bearer caller 'gw'."""

    def __init__(self, token_env: Any, directory: Path, pki: EmulatorPki, service: dict[str, Any]) -> None:
        server = pki.server([API_HOST])
        self.pki = pki
        self.bearer = secrets.token_urlsafe(24)
        self.config_file = directory / "spyrus-hsm.yaml"
        self.document: dict[str, Any] = {
            "hsm": {"module": token_env.module, "token_label": token_env.label,
                    "pin_file": str(token_env.pin_file), "call_timeout": 5},
            "state_dir": str(directory / "state"),
            "service": {"host": API_HOST, "port": 0, "health_port": 0, "tls_cert_file": str(server.cert_file),
                        "tls_key_file": str(server.key_file), "hub": "hub.example",
                        "audit_file": str(directory / "audit.log"),
                        "bearer_tokens": {"gw": hashlib.sha256(self.bearer.encode()).hexdigest()},
                        **service},
        }
        self.write_config()
        self.running: RunningModule | None = None

    def write_config(self, **service_changes: Any) -> None:
        self.document["service"].update(service_changes)
        self.config_file.write_text(yaml.safe_dump(self.document))

    def start(self) -> Module:
        module = Module(config.load(str(self.config_file), env={}),
                        telemetry.disabled())
        self.running = RunningModule(module).start()
        return module

    @property
    def module(self) -> Module:
        assert self.running is not None
        return self.running.module

    def api_port(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listeners = self.module.listeners
            if listeners is not None and listeners.api_port:
                return listeners.api_port
            time.sleep(0.02)
        raise AssertionError("the API did not start")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        conn = http.client.HTTPSConnection(API_HOST, self.api_port(), context=ctx, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Authorization": f"Bearer {self.bearer}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(data) if data else None


class ServeProcess:
    """`spyrus-hsm -v serve` in its own process with `site`'s environment; `config` adds YAML
    to the file it is started with."""

    def __init__(self, token_env: Any, directory: Path, site: EdgeSite, token_label: str, pin_file: Path,
                 config: str = "") -> None:
        self.config = directory / "serve.yaml"
        self.config.write_text(f"hsm:\n  module: {token_env.module}\n  token_label: {token_label}\n"
                               f"  pin_file: {pin_file}\n  call_timeout: 5\nstate_dir: {directory / 'state'}\n"
                               + config)
        self.output = directory / "serve.out"
        env = token_env.env(SPYRUS_HSM_CONFIG=str(self.config), **site.env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "modules"), env.get("PYTHONPATH", "")])
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "-v", "serve"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> int:
        """SIGTERM, as edgeAgent stops a module; the exit code (10 s, then it would be killed)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return self.output.read_text(errors="replace")
