"""The module's own IoT Hub connection on two tokens (docs/two-tokens.md), against the emulator:
with a symmetric key (the primary on token A, the secondary on token B) and with X.509 (each
token its own key and a certificate from the device's CA), unplugging the token in use moves the
connection to the other token's credential without a restart. The fault shim unplugs one token's
slot; `serve` reaches both tokens through it."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import addresses
import pytest
from cloud_harness import Serve
from service_harness import certify_hsm_key, slot_of

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(180)

HOST = addresses.host()
SCOPE = "0ne0002T0K"
ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


class Site:
    """`serve` on both tokens through the shim with a `cloud` section."""

    def __init__(self, tmp_path: Path, token_env: Any, second: Any, emulator_pki: EmulatorPki) -> None:
        if not SHIM.exists():
            pytest.fail(f"{SHIM} is not built; run 'make shim'")
        self.tmp_path, self.token_env, self.second, self.pki = tmp_path, token_env, second, emulator_pki
        self.control = tmp_path / "shim.control"
        self.control.write_text("state=plugged\n")
        self.slots = (slot_of(token_env, token_env.label), slot_of(token_env, second.label))
        self.serve: Serve | None = None

    def start(self, **cloud: Any) -> Serve:
        ca_file = self.tmp_path / "server-ca.pem"
        ca_file.write_text(self.pki.ca_pem)
        config = {"hsm": {"module": str(SHIM), "token_label": self.token_env.label,
                          "pin_file": str(self.token_env.pin_file), "call_timeout": 5,
                          "second_token_label": self.second.label, "second_pin_file": str(self.second.pin_file)},
                  "state_dir": str(self.tmp_path / "state"),
                  "cloud": {"server_ca_file": str(ca_file), "hub": HOST, **cloud}}
        path = self.tmp_path / "serve.yaml"
        path.write_text(json.dumps(config))
        self.serve = Serve(self.token_env, path, P11SHIM_CONTROL=str(self.control), P11SHIM_TARGET=SOFTHSM,
                           OTEL_SDK_DISABLED="true")
        return self.serve

    def unplug(self, index: int) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(f"unplug_slot={self.slots[index]}\n")
        tmp.replace(self.control)

    def stop(self) -> int | None:
        return self.serve.stop() if self.serve is not None else None


@pytest.fixture
def site(tmp_path: Path, token_env: Any, second_token: Any, emulator_pki: EmulatorPki) -> Iterator[Site]:
    s = Site(tmp_path, token_env, second_token, emulator_pki)
    yield s
    s.stop()


def _accepted(emu: Any, device: str, method: str) -> int:
    return sum(1 for c in emu.received.connects
               if c.client_id == device and c.auth_method == method and c.accepted)


def test_a_symmetric_key_identity_moves_to_the_secondary_key_when_its_token_goes(
        site: Site, emu: Any, hsm: Hsm, second_hsm: Hsm) -> None:
    device, label = "pair-sas-" + secrets.token_hex(3), "hubkey-" + secrets.token_hex(3)
    primary, secondary = secrets.token_bytes(32), secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(primary))
    second_hsm.import_secret_key(label, Secret(secondary))
    emu.add_device(device, symmetric_key=base64.b64encode(primary).decode(),
                   secondary_key=base64.b64encode(secondary).decode())
    serve = site.start(device_id=device, key=label)
    emu.wait_for(lambda: _accepted(emu, device, "sas") >= 1, timeout=60)
    site.unplug(0)
    before = _accepted(emu, device, "sas")
    assert emu.drop_connection(device)
    # the SDK reconnects with a new SAS token, which only the secondary key on token B can sign
    # now: the pair tries A (not yet known to be gone), then B
    emu.wait_for(lambda: _accepted(emu, device, "sas") > before, timeout=60)
    serve.wait_line("serving on one token", 30)
    assert site.stop() == 0, serve.output()
    assert "Traceback" not in serve.output()


def test_an_x509_identity_moves_to_the_other_tokens_key_when_its_token_goes(
        site: Site, emu: Any, hsm: Hsm, second_hsm: Hsm, emulator_pki: EmulatorPki, token_env: Any,
        second_token: Any) -> None:
    device = "pair-x509-" + secrets.token_hex(3)
    for keys in (hsm, second_hsm):  # each token its own key, certified by the device's CA
        certify_hsm_key(keys, device, device, emulator_pki.intermediate)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    serve = site.start(device_id=device, key=device, attestation="x509")
    emu.wait_for(lambda: _accepted(emu, device, "x509") >= 1, timeout=60)
    site.unplug(0)
    serve.wait_line(f"moved to token '{second_token.label}'", 60)
    assert _accepted(emu, device, "x509") >= 2  # the switch connected with token B's key
    before = _accepted(emu, device, "x509")
    assert emu.drop_connection(device)
    emu.wait_for(lambda: _accepted(emu, device, "x509") > before, timeout=60)  # and so do reconnects
    assert site.stop() == 0, serve.output()
    out = serve.output()
    assert "Traceback" not in out
    assert token_env.pin.decode() not in out and second_token.pin.decode() not in out
