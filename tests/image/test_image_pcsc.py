"""The image with its token behind a real PC/SC reader, in both topologies:

- `internal`: the module's own pcscd (started by `serve`) with the virtual reader driver
  (vsmartcard-vpcd, added to the test image by scripts/image-test.sh); the card emulator runs on
  this machine and reaches the reader through a published port;
- `host`: this machine's pcscd (run by the test, as a host's) with its /run/pcscd bound in.

The PKCS#11 module is the test shim (mounted, not in the image) forwarding to the image's
SoftHSM2 only while the card is in "Virtual PCD 00 00", as a vendor library over a CCID reader
would. In each: selftest inside names the reader and the card; pulling the card makes /readyz
false naming the reader; putting it back makes it ready again and a SAS token is minted.
This machine has no USB bus: `internal` gets an empty folder as /dev/bus/usb.

Run by `make image-test`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pcsc_rig import READER, HostPcscd, VirtualCard, missing_tools
from test_image import (
    DEVICE,
    HUB,
    SOFTHSM,
    ULIMITS,
    Module,
    free_port,
    make_token,
    podman,
    post_sas_token,
    wait_running,
    write_module_files,
)

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("SPYRUS_IMAGE_TEST") != "1",
                       reason="container image test: run 'make image-test' (builds the image with podman)"),
    pytest.mark.timeout(300),
]

ROOT = Path(__file__).resolve().parents[2]
# `make image-test-arm64` builds the shim for the image's architecture and names it here.
SHIM = Path(os.environ.get("SPYRUS_IMAGE_SHIM") or ROOT / ".build" / "libp11shim.so").resolve()
SHIM_IN_CONTAINER = "/opt/p11shim/libp11shim.so"
GUARD = 90.0  # seconds; only so that a container that never gets there fails instead of hanging
READYZ = ("import urllib.request as u, urllib.error as e\n"
          "try:\n"
          "    r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/readyz', timeout=4)\n"
          "    print(r.status, r.read().decode())\n"
          "except e.HTTPError as x:\n"
          "    print(x.code, x.read().decode())\n")


def readyz(mod: Module) -> tuple[int, dict[str, Any]] | None:
    proc = podman("exec", mod.container, "python3", "-c", READYZ, check=False)
    status, _, body = proc.stdout.strip().partition(" ")
    if proc.returncode != 0 or not status.isdigit():
        return None
    return int(status), json.loads(body)


def selftest(mod: Module) -> tuple[int, dict[str, Any]]:
    proc = podman("exec", mod.container, "spyrus-hsm", "selftest", "--json", check=False, timeout=120)
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def ready(mod: Module) -> bool:
    answer = readyz(mod)
    return answer is not None and answer[0] == 200


def reason(mod: Module) -> str:
    answer = readyz(mod)
    return "" if answer is None or answer[0] == 200 else str(answer[1].get("detail"))


@pytest.fixture(scope="module")
def image() -> str:
    return os.environ["IMAGE"]


@pytest.fixture(scope="module")
def rig_tools() -> None:
    missing = missing_tools() + ([] if SHIM.exists() else [str(SHIM)])
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}; run 'make deps shim'")


def run_module(image: str, root: Path, mode: str, extra: list[str]) -> Module:
    device_key = make_token(root)
    etc, ca_file, bearer = write_module_files(root, root / "user.pin")
    port = free_port()
    name = f"spyrus-hsm-image-test-{mode}-" + secrets.token_hex(3)
    podman("run", "-d", "--name", name, *ULIMITS, "-p", f"127.0.0.1:{port}:8443", *extra,
           "-v", f"{etc}:/etc/spyrus-hsm:ro",
           "-v", f"{root / 'user.pin'}:/run/secrets/spyrus-hsm-pin:ro",
           "-v", f"{root / 'tokens'}:/srv/softhsm/tokens",
           "-v", f"{SHIM}:{SHIM_IN_CONTAINER}:ro",
           "-e", "SOFTHSM2_CONF=/etc/spyrus-hsm/softhsm2.conf",
           "-e", f"SPYRUS_HSM_PKCS11_MODULE={SHIM_IN_CONTAINER}",
           "-e", f"P11SHIM_TARGET={SOFTHSM}", "-e", f"P11SHIM_PCSC_READER={READER}",
           "-e", f"SPYRUS_HSM_PCSCD={mode}",
           image)
    return Module(name, port, ca_file, bearer, device_key)


@pytest.fixture
def internal(image: str, rig_tools: None, tmp_path: Path) -> Iterator[tuple[Module, VirtualCard]]:
    usb = tmp_path / "usb"
    usb.mkdir()
    vpcd = free_port()
    mod = run_module(image, tmp_path, "internal", ["-p", f"127.0.0.1:{vpcd}:35963", "-v", f"{usb}:/dev/bus/usb:ro"])
    card = VirtualCard(tmp_path / "vicc", host="127.0.0.1", port=vpcd, check_locally=False)
    try:
        yield mod, card
    finally:
        card.pull()
        podman("rm", "-f", "-t", "0", mod.container, check=False)


@pytest.fixture
def host(image: str, rig_tools: None, tmp_path: Path) -> Iterator[tuple[Module, VirtualCard]]:
    daemon = HostPcscd(tmp_path / "pcscd.log").start()
    mod = run_module(image, tmp_path, "host", ["-v", "/run/pcscd:/run/pcscd"])
    card = VirtualCard(tmp_path / "vicc")
    try:
        yield mod, card
    finally:
        card.pull()
        podman("rm", "-f", "-t", "0", mod.container, check=False)
        daemon.stop()


def insert_until_ready(mod: Module, card: VirtualCard) -> float:
    """Insert the card (again, if the emulator found no reader listening yet) until /readyz is true."""
    def inserted_and_ready() -> bool:
        if card.proc is None or card.proc.poll() is not None:
            card.insert()
        return ready(mod)
    return wait_running(mod, "ready with the card in", inserted_and_ready, GUARD, 0.3)


def card_follows_readiness(mod: Module, card: VirtualCard, mode: str) -> None:
    seconds = insert_until_ready(mod, card)
    code, checks = selftest(mod)
    assert code == 0, checks
    assert checks["pcsc card"]["detail"] == f"card in reader '{READER}'", checks
    assert READER in checks["pcsc readers"]["detail"] and mode in checks["pcsc readers"]["detail"], checks
    card.pull()
    gone = wait_running(mod, "/readyz naming the reader",
                        lambda: f"card removed from reader '{READER}'" in reason(mod), GUARD, 0.3)
    code, checks = selftest(mod)
    assert code == 1 and not checks["pcsc card"]["ok"], checks
    back = insert_until_ready(mod, card)
    status, body = post_sas_token(mod, {"deviceId": DEVICE, "hub": HUB, "ttlSeconds": 3600})
    assert status == 200, f"{status} {body}\nlogs:\n{mod.logs()}"
    print(f"{mode}: ready {seconds:.1f} s after start, not ready {gone:.1f} s after the card was pulled, "
          f"ready again {back:.1f} s after it was put back")


def test_internal_pcscd_sees_the_card_and_readiness_follows_it(internal: tuple[Module, VirtualCard]) -> None:
    mod, card = internal
    card_follows_readiness(mod, card, "internal")
    # SIGTERM stops the module and its pcscd: exit code 0 within edgeAgent's 10 s.
    started = time.monotonic()
    podman("stop", "-t", "10", mod.container, timeout=30)
    elapsed = time.monotonic() - started
    code = podman("inspect", mod.container, "--format", "{{.State.ExitCode}}").stdout.strip()
    print(f"internal: stopped in {elapsed:.1f} s, exit code {code}")
    assert code == "0" and elapsed < 10, mod.logs()


def test_the_hosts_pcscd_bound_in_sees_the_card_and_readiness_follows_it(host: tuple[Module, VirtualCard]) -> None:
    mod, card = host
    card_follows_readiness(mod, card, "host")
