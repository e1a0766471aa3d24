"""`spyrus-hsm serve` with its token behind a real PC/SC reader: the test shim forwards to SoftHSM2
only while the emulated card is in "Virtual PCD 00 00" (tests/p11shim, P11SHIM_PCSC_READER), as a
vendor library over a CCID reader behaves.

Under load, pulling the card gives leaves only 200 or 503, /readyz turns false naming the
reader, and putting it back brings signing back without a restart. pcscd killed is reported
(host mode: the socket is named); in `internal` mode serve restarts its own pcscd.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import signal
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pcsc_rig import READER, SOCKET, HostPcscd, VirtualCard, wait_until
from service_harness import HOST, ClientThreads, free_port, serve_config, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret
from spyrus_hsm.pcsc import scard

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"
POLICY = [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["pcsc-*"]}]
CLIENTS = 4


class Module:
    """A `serve` process on the session's token through the shim in PC/SC mode."""

    def __init__(self, tmp_path: Path, token_env: Any, pki: EmulatorPki, pcscd: str) -> None:
        if not SHIM.exists():
            pytest.fail(f"{SHIM} is not built; run 'make shim'")
        self.bearer = secrets.token_urlsafe(24)
        self.api_port, self.health_port = free_port(), free_port()
        path = serve_config(tmp_path, token_env, pki, {
            "port": self.api_port, "health_port": self.health_port, "bearer": {"gateway": self.bearer},
            "policy": POLICY, "cache_reuse_fraction": 0.0, "rate_limit_per_second": 0.0})
        config = json.loads(path.read_text())
        config["hsm"].update(module=str(SHIM), pcscd=pcscd, call_timeout=5)
        path.write_text(json.dumps(config))
        self.ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        self.log = tmp_path / "serve.err"
        env = token_env.env(SPYRUS_HSM_CONFIG=str(path), OTEL_SDK_DISABLED="true", P11SHIM_CONTROL="",
                            P11SHIM_TARGET="/usr/lib/softhsm/libsofthsm2.so", P11SHIM_PCSC_READER=READER)
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--verbose", "serve"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def readyz(self) -> tuple[int, dict[str, Any]] | None:
        assert self.proc.poll() is None, f"serve exited: {self.log.read_text()[-3000:]}"
        conn = http.client.HTTPConnection(HOST, self.health_port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        except OSError:
            return None
        finally:
            conn.close()

    def ready(self) -> bool:
        answer = self.readyz()
        return answer is not None and answer[0] == 200

    def sas(self, device: str) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(HOST, self.api_port, context=self.ctx, timeout=30)
        try:
            conn.request("POST", "/v1/sas-tokens", json.dumps({"deviceId": device}),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.bearer}"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def wait(self, cond: Any, what: str, within: float = 60) -> None:
        """wait_until, and on failure the last /readyz answer and the tail of serve's log."""
        try:
            wait_until(cond, what, within=within)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; /readyz: {self.readyz()!r}; serve's log ends:\n"
                                 f"{self.log.read_text()[-4000:]}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Load(ClientThreads):
    """CLIENTS threads asking for SAS tokens until stopped; every status is counted."""

    def __init__(self, module: Module, devices: dict[str, bytes]) -> None:
        super().__init__(CLIENTS)
        self.module, self.devices = module, devices
        self.names = sorted(devices)
        self.statuses: Counter[int] = Counter()

    def one(self, n: int) -> None:
        device = self.names[n % len(self.names)]
        status, body = self.module.sas(device)
        self.statuses[status] += 1
        if status == 200:
            verify_sas(body["token"], self.devices[device])  # never another device's key


@pytest.fixture
def devices(hsm: Hsm) -> dict[str, bytes]:
    keys = {f"pcsc-{secrets.token_hex(3)}": secrets.token_bytes(32) for _ in range(3)}
    for name, key in keys.items():
        hsm.import_secret_key(name, Secret(key))
    return keys


@pytest.fixture
def module_factory(tmp_path: Path, token_env: Any, emulator_pki: EmulatorPki) -> Iterator[Any]:
    started: list[Module] = []

    def make(pcscd: str) -> Module:
        m = Module(tmp_path, token_env, emulator_pki, pcscd)
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def not_ready_reason(module: Module) -> str:
    answer = module.readyz()
    if answer is None or answer[0] == 200:
        return ""
    return str(answer[1].get("detail"))


def test_a_pulled_card_is_named_and_signing_resumes_when_it_is_back(
        host_pcscd: HostPcscd, card: VirtualCard, devices: dict[str, bytes], module_factory: Any) -> None:
    card.insert()
    module = module_factory("host")
    wait_until(module.ready, "serve ready with the card in", within=60)
    with Load(module, devices) as load:
        wait_until(lambda: load.statuses[200] >= 20, "tokens signed under load", within=60)
        card.pull()
        module.wait(lambda: f"card removed from reader '{READER}'" in not_ready_reason(module),
                    "/readyz naming the reader")
        signed_before = load.statuses[200]
        wait_until(lambda: load.statuses[503] >= 5, "leaves refused while the card is out")
        card.insert()
        wait_until(module.ready, "serve ready again with the card back", within=60)
        wait_until(lambda: load.statuses[200] >= signed_before + 20, "tokens signed again", within=60)
    assert not load.bad, load.bad[:5]
    assert set(load.statuses) <= {200, 503}, load.statuses
    status, _ = module.sas(sorted(devices)[0])
    assert status == 200
    assert module.stop() == 0
    assert "Traceback" not in module.log.read_text()


def test_host_pcscd_killed_is_reported_with_its_socket(host_pcscd: HostPcscd, card: VirtualCard,
                                                       devices: dict[str, bytes], module_factory: Any) -> None:
    card.insert()
    module = module_factory("host")
    wait_until(module.ready, "serve ready with the card in", within=60)
    host_pcscd.kill()
    card.forget()
    wait_until(lambda: f"pcscd not reachable at {SOCKET}" in not_ready_reason(module), "/readyz naming pcscd")
    status, _ = module.sas(sorted(devices)[0])
    assert status == 503


def test_internal_pcscd_is_restarted_by_serve_and_the_card_is_seen_again(
        card: VirtualCard, devices: dict[str, bytes], module_factory: Any) -> None:
    if scard.survey().problem is None:
        pytest.fail(f"a pcscd already answers at {SOCKET}; the module must run its own")
    module = module_factory("internal")
    wait_until(lambda: bool(scard.survey().readers), "serve's pcscd answering")
    card.insert()
    wait_until(module.ready, "serve ready with the card in", within=60)
    first = pcscd_pids(module.log)
    assert len(first) == 1, module.log.read_text()[-3000:]
    subprocess.run(["kill", "-9", str(first[0])], check=True)
    card.forget()  # vicc leaves when its reader's daemon dies
    wait_until(lambda: not module.ready(), "/readyz false with pcscd gone")
    wait_until(lambda: len(pcscd_pids(module.log)) == 2, "serve starting pcscd again")
    log = module.log.read_text()
    assert "pcscd exited (signal 9); restarting it" in log
    wait_until(lambda: bool(scard.survey().readers), "the new pcscd answering")
    card.insert()
    wait_until(module.ready, "serve ready again", within=60)
    status, _ = module.sas(sorted(devices)[0])
    assert status == 200
    second = pcscd_pids(module.log)[-1]
    assert module.stop() == 0
    wait_until(lambda: not Path(f"/proc/{second}").exists(), "serve's pcscd stopped with it")


def pcscd_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"pcscd started \(pid (\d+)\)", log.read_text())]
