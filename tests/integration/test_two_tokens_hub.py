"""The module's own IoT Hub connection on two tokens (docs/two-tokens.md), against the emulator:
with a symmetric key (the primary on token A, the secondary on token B) and with X.509 (each
token its own key and a certificate from the device's CA), unplugging the token in use moves the
connection to the other token's credential without a restart. With an operational certificate
issued through DPS (cloud.issue_cert) each token gets its own and renews it on its own; only the
renewal of the token in use moves the connection. The fault shim unplugs one token's slot;
`serve` reaches both tokens through it."""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import addresses
import pytest
from cloud_harness import Serve
from pair_fixtures import *  # noqa: F403 - the fixtures first_token, second_token, hsm, second_hsm
from service_harness import certify_hsm_key, slot_of
from shim_control import write_control

from emulator.pki import EmulatorPki
from spyrus_hsm.cloud import renewal
from spyrus_hsm.edge.reported import twin_key
from spyrus_hsm.hsm import Hsm, ObjectNotFound, Secret
from spyrus_hsm.identity import x509 as x509_id

pytestmark = pytest.mark.timeout(180)

HOST = addresses.host()
SCOPE = "0ne0002T0K"
ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


class Site:
    """`serve` on both tokens through the shim with a `cloud` section."""

    def __init__(self, tmp_path: Path, token_env: Any, first: Any, second: Any, emulator_pki: EmulatorPki) -> None:
        if not SHIM.exists():
            pytest.fail(f"{SHIM} is not built; run 'make shim'")
        self.tmp_path, self.token_env, self.pki = tmp_path, token_env, emulator_pki
        self.first, self.second = first, second
        self.control = tmp_path / "shim.control"
        self.control.write_text("state=plugged\n")
        self.slots = (slot_of(token_env, first.label), slot_of(token_env, second.label))
        self.serve: Serve | None = None

    def start(self, **cloud: Any) -> Serve:
        ca_file = self.tmp_path / "server-ca.pem"
        ca_file.write_text(self.pki.ca_pem)
        config = {"hsm": {"module": str(SHIM), "token_label": self.first.label,
                          "pin_file": str(self.first.pin_file), "call_timeout": 5,
                          "second_token_label": self.second.label, "second_pin_file": str(self.second.pin_file)},
                  "state_dir": str(self.tmp_path / "state"),
                  "cloud": {"server_ca_file": str(ca_file), **cloud}}
        path = self.tmp_path / "serve.yaml"
        path.write_text(json.dumps(config))
        self.serve = Serve(self.token_env, path, P11SHIM_CONTROL=str(self.control), P11SHIM_TARGET=SOFTHSM,
                           OTEL_SDK_DISABLED="true")
        return self.serve

    def unplug(self, index: int) -> None:
        write_control(self.control, unplug_slot=self.slots[index])

    def stop(self) -> int | None:
        return self.serve.stop() if self.serve is not None else None


@pytest.fixture
def site(tmp_path: Path, token_env: Any, first_token: Any, second_token: Any,
         emulator_pki: EmulatorPki) -> Iterator[Site]:
    s = Site(tmp_path, token_env, first_token, second_token, emulator_pki)
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
    serve = site.start(hub=HOST, device_id=device, key=label)
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
        site: Site, emu: Any, hsm: Hsm, second_hsm: Hsm, emulator_pki: EmulatorPki, first_token: Any,
        second_token: Any) -> None:
    device = "pair-x509-" + secrets.token_hex(3)
    for keys in (hsm, second_hsm):  # each token its own key, certified by the device's CA
        certify_hsm_key(keys, device, device, emulator_pki.intermediate)
    emu.add_device(device, x509_ca_pem=emulator_pki.root.cert_pem)
    serve = site.start(hub=HOST, device_id=device, key=device, attestation="x509")
    emu.wait_for(lambda: _accepted(emu, device, "x509") >= 1, timeout=60)
    in_use = _token_in_use(serve)  # the first ready one that holds the key (either, if one was slow to start)
    other = second_token.label if in_use == first_token.label else first_token.label
    site.unplug([first_token.label, second_token.label].index(in_use))
    serve.wait_line(f"moved to token '{other}'", 60)
    assert _accepted(emu, device, "x509") >= 2  # the switch connected with token B's key
    before = _accepted(emu, device, "x509")
    assert emu.drop_connection(device)
    emu.wait_for(lambda: _accepted(emu, device, "x509") > before, timeout=60)  # and so do reconnects
    assert site.stop() == 0, serve.output()
    out = serve.output()
    assert "Traceback" not in out
    assert first_token.pin.decode() not in out and second_token.pin.decode() not in out


def _token_in_use(serve: Serve) -> str:
    """The token whose key the hub connection uses, as serve logs it."""
    at = serve.wait_line("the IoT Hub connection uses token", 60)
    found = re.search(r"uses token '([^']+)'", serve.output().splitlines()[at])
    assert found is not None
    return found.group(1)


def _renewed_by(emu: Any, device: str) -> dict[str, list[str]]:
    """Token label -> the generations its renewals announced (the certificate-renewed messages)."""
    out: dict[str, list[str]] = {}
    for t in list(emu.received.telemetry):
        if t.device_id == device and t.properties.get("type") == "certificate-renewed":
            message = t.json()
            out.setdefault(message["token"], []).append(message["label"])
    return out


def _newest(keys: Hsm, base: str) -> renewal.Generation | None:
    complete = [g for g in renewal.generations(keys, base) if g.complete]
    return complete[-1] if complete else None


def _leaves(tokens: dict[str, Hsm], base: str) -> dict[str, Any] | None:
    """Token label -> the leaf certificate of its newest complete generation of `base` (a private
    key and a certificate in that token), once both tokens hold one."""
    out = {}
    try:
        for label, keys in tokens.items():
            newest = _newest(keys, base)
            if newest is None or not (keys.find(newest.label, "private") and keys.find(newest.label, "cert")):
                return None
            out[label] = x509_id.select(keys, label=newest.label).leaf
    except ObjectNotFound:  # renewed meanwhile: the previous generation deleted
        return None
    return out


@pytest.mark.timeout(360)
def test_each_token_gets_and_renews_its_own_operational_certificate_and_the_connection_follows_the_token(
        site: Site, emu: Any, hsm: Hsm, second_hsm: Hsm, first_token: Any, second_token: Any) -> None:
    reg, onboarding = "pair-op-" + secrets.token_hex(3), "onboard-" + secrets.token_hex(3)
    base = onboarding + "-op"
    primary, secondary = secrets.token_bytes(32), secrets.token_bytes(32)
    hsm.import_secret_key(onboarding, Secret(primary))  # DPS onboarding: the primary key on token A,
    second_hsm.import_secret_key(onboarding, Secret(secondary))  # the secondary on token B
    emu.add_individual_enrollment(reg, symmetric_key=base64.b64encode(primary).decode(),
                                  secondary_key=base64.b64encode(secondary).decode(), assigned_hub=HOST)
    emu.issued_validity = 20  # each token's certificate is due about 10 s after it is received
    tokens = {first_token.label: hsm, second_token.label: second_hsm}
    serve = site.start(id_scope=SCOPE, registration_id=reg, provisioning_host=HOST, attestation="symmetricKey",
                       key=onboarding, issue_cert=base, renew_at=0.5, renew_retry_initial=1, renew_retry_max=4,
                       registration_timeout=10)

    def connects() -> int:
        return sum(1 for c in list(emu.received.connects)
                   if c.client_id == reg and c.service == "hub" and c.auth_method == "x509" and c.accepted)

    # 1. The connection uses one token's credential; the other token gets its own issued meanwhile.
    # (The tokens are read from here only once serve has stopped: SoftHSM2 in two processes at
    # once, one deleting what the other lists, is a race of the test's making.)
    in_use = _token_in_use(serve)
    standby = next(label for label in tokens if label != in_use)
    serve.wait_line(f"token '{standby}' holds its own operational certificate", 60)

    # 2. Both renew on their own; only the renewals of the token in use connect again.
    def settled() -> bool:
        renewed = _renewed_by(emu, reg)
        return len(renewed.get(standby, [])) >= 2 and len(renewed.get(in_use, [])) >= 1 \
            and connects() == 1 + len(renewed[in_use])

    emu.wait_for(settled, timeout=90)
    reported = emu.twin(reg)["reported"]["credentials"]
    names = {first_token.label: base, second_token.label: renewal.reported_name(base, True)}
    for label, name in names.items():
        state = reported[twin_key(name)]["renewal"]
        assert renewal.generation_of(base, state["label"]) and state["label"] != base, (name, state)
        assert state["label"] in _renewed_by(emu, reg)[label], (name, state)

    # 3. The token in use goes: the connection moves to the other token's current credential ...
    before = connects()
    site.unplug(list(tokens).index(in_use))
    serve.wait_line(f"moved to token '{standby}'", 60)
    assert connects() == before + 1
    # ... and from then on that token's renewals move it (a connect each).
    moved = connects()
    renewed_before = len(_renewed_by(emu, reg)[standby])
    emu.wait_for(lambda: len(_renewed_by(emu, reg)[standby]) > renewed_before and connects() > moved, timeout=60)
    code = site.stop()
    out = serve.output()
    assert code == 0, out
    # Each token holds its own newest generation, past its first, announced by its renewals; the
    # two certificates differ, both for the registration, from the same CA.
    leaves = _leaves(tokens, base)
    assert leaves is not None
    for label, keys in tokens.items():
        newest = _newest(keys, base)
        assert newest is not None and newest.number > 1 and newest.label in _renewed_by(emu, reg)[label]
    assert leaves[in_use] != leaves[standby] and leaves[in_use].public_key() != leaves[standby].public_key()
    assert all(leaf.subject.rfc4514_string() == f"CN={reg}" for leaf in leaves.values())
    assert leaves[in_use].issuer == leaves[standby].issuer
    assert "Traceback" not in out
    assert first_token.pin.decode() not in out and second_token.pin.decode() not in out
