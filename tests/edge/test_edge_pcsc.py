"""Under IoT Edge with the token behind a real PC/SC reader (pcscd with the virtual reader and
card of tests/pcsc_rig.py; the test shim in PC/SC mode as the PKCS#11 module): the twin's
`hsm.reason` names the reader whose card was pulled, not a PKCS#11 code, and `hsm.ready`
comes back once the card is in again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edge_harness import EdgeSite
from pcsc_rig import READER, HostPcscd, VirtualCard, missing_tools
from service_harness import serve_config

from emulator.pki import EmulatorPki

pytestmark = [pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[VirtualCard]:
    missing = missing_tools() + ([] if SHIM.exists() else [str(SHIM)])
    if missing or os.getuid() != 0:
        pytest.fail(f"needs root and {', '.join(missing) or 'nothing else'}; run 'make deps shim' as root")
    daemon = HostPcscd(tmp_path / "pcscd.log").start()
    card = VirtualCard(tmp_path / "vicc")
    try:
        yield card
    finally:
        if card.proc is not None:
            card.pull()
        daemon.stop()


def hsm_reported(site: EdgeSite, ready: bool, fragment: str = "") -> dict[str, Any]:
    def matches(r: dict[str, Any]) -> bool:
        hsm = r.get("hsm") or {}
        return hsm.get("ready") is ready and fragment in (hsm.get("reason") or "")

    return site.wait_reported(matches, timeout=40)


def test_the_twin_names_the_reader_whose_card_was_pulled(site: EdgeSite, rig: VirtualCard, token_env: Any,
                                                          tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    # With the service on, as deployed: its probe notices a pulled card with no request in flight.
    config = serve_config(tmp_path, token_env, emulator_pki, {})
    settings = json.loads(config.read_text())
    settings["hsm"].update(module=str(SHIM), pcscd="host", call_timeout=5)
    config.write_text(json.dumps(settings))
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), P11SHIM_TARGET="/usr/lib/softhsm/libsofthsm2.so",
                        P11SHIM_CONTROL="", P11SHIM_PCSC_READER=READER, **site.env)
    out = tmp_path / "serve.out"
    rig.insert()
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "-v", "serve"], env=env,
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    try:
        hsm_reported(site, ready=True)
        rig.pull()
        reported = hsm_reported(site, ready=False, fragment=f"card removed from reader '{READER}'")
        assert "CKR_" not in reported["hsm"]["reason"]
        rig.insert()
        hsm_reported(site, ready=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in out.read_text()
