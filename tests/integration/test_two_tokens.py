"""`serve` on two tokens (docs/two-tokens.md): two SoftHSM2 tokens in one token directory, reached
through the fault shim, which unplugs one token (its slot) at a time.

Under a load of leaf SAS-token and signature requests, either token unplugged leaves every answer
200 or 503 with Retry-After, the 503s within one second, and every answer verifies with the key of
one of the two tokens (primary and secondary SAS keys, each token's own EC key); the work is shared
while both serve; a replugged token takes its share again; both unplugged is not ready, as with one
token; /readyz, the metrics and the log say which token is missing, and a key on one token only
is reported.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pair_fixtures import *  # noqa: F403 - the fixtures first_token, second_token, hsm, second_hsm
from service_harness import HOST, ClientThreads, free_port, serve_config, slot_of, stop_process, verify_sas
from shim_control import write_control
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, Secret

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENTS = 4


DEVICES = 3


class Keys:
    """The same labels on both tokens: each device's primary SAS key on A and its secondary on
    B; an EC signing key of each token's own."""

    def __init__(self, a: Hsm, b: Hsm) -> None:
        tag = secrets.token_hex(3)
        self.devices = [f"pair-{tag}-{i}" for i in range(DEVICES)]
        self.sas: dict[str, tuple[bytes, bytes]] = {}
        for device in self.devices:
            primary, secondary = secrets.token_bytes(32), secrets.token_bytes(32)
            a.import_secret_key(device, Secret(primary))
            b.import_secret_key(device, Secret(secondary))
            self.sas[device] = (primary, secondary)
        self.signer = f"sign-{tag}"
        a.generate_keypair(self.signer, KeyAlgorithm.EC_P256)
        b.generate_keypair(self.signer, KeyAlgorithm.EC_P256)
        self.public = (a.public_key(self.signer), b.public_key(self.signer))
        self.only_a = f"only-a-{tag}"  # a key on one token only: reported
        a.import_secret_key(self.only_a, Secret(secrets.token_bytes(32)))

    def sas_token_from(self, device: str, token: str) -> int:
        """Which token (0: A, 1: B) signed a SAS token: its signature verifies with that key."""
        for index, key in enumerate(self.sas[device]):
            try:
                verify_sas(token, key)
                return index
            except AssertionError:
                continue
        raise AssertionError(f"a SAS token for {device} verifies with neither token's key")

    def signature_from(self, data: bytes, raw: bytes) -> int:
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        for index, public in enumerate(self.public):
            assert isinstance(public, ec.EllipticCurvePublicKey)
            try:
                public.verify(der, data, ec.ECDSA(hashes.SHA256()))
                return index
            except InvalidSignature:
                continue
        raise AssertionError("a signature verifies with neither token's key")


class Serve:
    """`serve` on both tokens through the shim, whose control file unplugs a token's slot."""

    def __init__(self, tmp_path: Path, token_env: Any, first: Any, second: Any, pki: EmulatorPki) -> None:
        if not SHIM.exists():
            pytest.fail(f"{SHIM} is not built; run 'make shim'")
        self.bearer = secrets.token_urlsafe(24)
        self.api_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        policy = [{"principals": ["leaf"], "operations": ["sas-token"], "devices": ["pair-*"]},
                  {"principals": ["leaf"], "operations": ["signature"], "keys": ["sign-*"]}]
        path = serve_config(tmp_path, token_env, pki, {
            "port": self.api_port, "health_port": self.health_port, "bearer": {"leaf": self.bearer},
            "policy": policy, "signing_keys": ["sign-*"], "cache_reuse_fraction": 0.0,
            "rate_limit_per_second": 0.0})
        config = json.loads(path.read_text())
        config["hsm"].update(module=str(SHIM), call_timeout=5, token_label=first.label, pin_file=str(first.pin_file),
                             second_token_label=second.label,
                             second_pin_file=str(second.pin_file))
        config["metrics"] = {"enabled": True, "host": HOST, "port": self.metrics_port}
        path.write_text(json.dumps(config))
        self.control = tmp_path / "shim.control"
        self.control.write_text("state=plugged\n")
        self.ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        self.log = tmp_path / "serve.err"
        env = token_env.env(SPYRUS_HSM_CONFIG=str(path), OTEL_SDK_DISABLED="false", P11SHIM_CONTROL=str(self.control),
                            P11SHIM_TARGET=SOFTHSM)
        env.pop("SPYRUS_HSM_PKCS11_MODULE", None)
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--verbose", "serve"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def unplug(self, *slots: int) -> None:
        write_control(self.control, **({"unplug_slot": ",".join(map(str, slots))} if slots else {}))

    def get(self, port: int, path: str) -> tuple[int, str]:
        assert self.proc.poll() is None, f"serve exited: {self.log.read_text()[-3000:]}"
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        except OSError:
            return 0, ""
        finally:
            conn.close()

    def readyz(self) -> dict[str, Any]:
        status, body = self.get(self.health_port, "/readyz")
        return {**(json.loads(body) if body else {}), "http": status}

    def metric(self, name: str) -> float | None:
        _, text = self.get(self.metrics_port, "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPSConnection(HOST, self.api_port, context=self.ctx, timeout=30)
        try:
            conn.request("POST", path, json.dumps(body),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.bearer}"})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            conn.close()

    def wait(self, cond: Any, what: str, within: float = 60) -> Any:
        try:
            return wait_for(cond, within, what, every=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; /readyz: {self.readyz()}; serve's log ends:\n"
                                 f"{self.log.read_text()[-4000:]}") from None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            stop_process(self.proc)
        return self.proc.returncode


class Load(ClientThreads):
    """CLIENTS threads alternating SAS-token and signature requests; every answer is checked
    and counted by status and by the token that made it."""

    def __init__(self, serve: Serve, keys: Keys) -> None:
        super().__init__(CLIENTS)
        self.serve, self.keys = serve, keys
        self.statuses: Counter[int] = Counter()
        self.by_token: Counter[int] = Counter()
        self.unavailable_at: list[float] = []

    def one(self, n: int) -> None:
        if n % 2:
            device = self.keys.devices[n % DEVICES]
            status, headers, body = self.serve.post("/v1/sas-tokens", {"deviceId": device})
            if status == 200:
                self.by_token[self.keys.sas_token_from(device, body["token"])] += 1
        else:
            data = f"message {n} {secrets.token_hex(4)}".encode()
            status, headers, body = self.serve.post("/v1/signatures", {
                "key": self.keys.signer, "algorithm": "ES256", "data": base64.b64encode(data).decode()})
            if status == 200:
                self.by_token[self.keys.signature_from(data, base64.b64decode(body["signature"]))] += 1
        self.statuses[status] += 1
        if status == 503:
            self.unavailable_at.append(time.monotonic())
            if "Retry-After" not in headers:
                self.bad.append(f"503 without Retry-After: {body}")
        elif status != 200:
            self.bad.append(f"{status}: {body}")

    def served(self, token: int) -> int:
        return self.by_token[token]


@pytest.fixture
def site(tmp_path: Path, token_env: Any, first_token: Any, second_token: Any, hsm: Hsm, second_hsm: Hsm,
         emulator_pki: EmulatorPki) -> Iterator[tuple[Serve, Keys, tuple[int, int]]]:
    keys = Keys(hsm, second_hsm)
    slots = (slot_of(token_env, first_token.label), slot_of(token_env, second_token.label))
    serve = Serve(tmp_path, token_env, first_token, second_token, emulator_pki)
    try:
        yield serve, keys, slots
    finally:
        serve.stop()


def test_either_token_unplugged_under_load_every_answer_verifies_and_the_survivor_serves(
        site: tuple[Serve, Keys, tuple[int, int]], first_token: Any, second_token: Any) -> None:
    serve, keys, slots = site
    names = (first_token.label, second_token.label)
    serve.wait(lambda: serve.readyz()["http"] == 200 and serve.readyz().get("degraded") is None,
               "serve ready on both tokens")
    assert serve.metric("spyrus_hsm_tokens_configured") == 2.0

    def token_series() -> bool:  # one series per token
        _, text = serve.get(serve.metrics_port, "/metrics")
        return all(any(line.startswith("spyrus_hsm_hsm_token_info{") and f'hsm_token="{which}"' in line
                       and f'hsm_token_label="{label}"' in line for line in text.splitlines())
                   for which, label in (("first", first_token.label), ("second", second_token.label)))

    serve.wait(token_series, "an hsm_token_info series for each token")
    with Load(serve, keys) as load:
        serve.wait(lambda: load.served(0) >= 10 and load.served(1) >= 10, "both tokens sharing the work")
        for lost in (0, 1):
            _unplug_and_replug(serve, load, slots, names, lost)
    assert not load.bad, load.bad[:5]
    assert set(load.statuses) <= {200, 503}, load.statuses
    if load.unavailable_at:
        window = max(load.unavailable_at) - min(load.unavailable_at)
        assert window <= 1.0, f"503s over {window:.1f} s ({len(load.unavailable_at)} of them)"
    log = serve.log.read_text()
    lacks = [line for line in log.splitlines() if "do not hold the same keys" in line]
    assert lacks and f"token '{second_token.label}'" in lacks[0] and "lacks" in lacks[0], log[-3000:]
    assert "serving on one token" in log
    assert serve.stop() == 0
    assert "Traceback" not in serve.log.read_text()
    for secret in (first_token.pin, second_token.pin):
        assert secret.decode() not in serve.log.read_text()


def _unplug_and_replug(serve: Serve, load: Load, slots: tuple[int, int], names: tuple[str, str], lost: int) -> None:
    """Token `lost` unplugged under the load: /readyz, the metric and the answers show the other
    serving alone; replugged, it takes its share again."""
    kept = 1 - lost
    serve.unplug(slots[lost])
    answer = serve.wait(lambda: (r := serve.readyz()).get("degraded") and r, "/readyz degraded")
    assert answer["http"] == 200 and answer["ready"] is True
    assert f"'{names[lost]}'" in answer["degraded"]
    assert [t["ready"] for t in answer["tokens"]] == [lost != 0, lost != 1]
    serve.wait(lambda: serve.metric("spyrus_hsm_tokens_ready") == 1.0, "tokens_ready 1")
    before = load.served(kept)
    serve.wait(lambda: load.served(kept) >= before + 30, f"token {kept} serving alone")
    served_lost = load.served(lost)
    serve.wait(lambda: load.served(kept) >= before + 50, f"token {kept} still serving alone")
    assert load.served(lost) == served_lost, "the unplugged token answered"
    serve.unplug()
    serve.wait(lambda: serve.readyz().get("degraded") is None and serve.readyz()["http"] == 200,
               "both tokens ready again")
    serve.wait(lambda: load.served(lost) >= served_lost + 10, f"token {lost} taking its share again")


def test_both_tokens_unplugged_is_not_ready_and_answers_503(site: tuple[Serve, Keys, tuple[int, int]]) -> None:
    serve, keys, slots = site
    serve.wait(lambda: serve.readyz()["http"] == 200, "serve ready")
    serve.unplug(*slots)
    status, headers, body = 0, {}, {}
    for _ in range(3):  # the first may find a token not yet known to be gone: it is tried on the other
        status, headers, body = serve.post("/v1/sas-tokens", {"deviceId": keys.devices[0]})
    answer = serve.wait(lambda: (r := serve.readyz())["http"] == 503 and r, "/readyz not ready")
    assert answer["ready"] is False
    assert status == 503 and "Retry-After" in headers, (status, body)
    assert serve.wait(lambda: serve.metric("spyrus_hsm_tokens_ready") == 0.0, "tokens_ready 0")
    serve.unplug()
    serve.wait(lambda: serve.readyz()["http"] == 200 and serve.readyz().get("degraded") is None, "ready again")
    status, _, body = serve.post("/v1/sas-tokens", {"deviceId": keys.devices[0]})
    assert status == 200
    keys.sas_token_from(keys.devices[0], body["token"])
