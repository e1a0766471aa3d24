"""After a card is pulled (an unplug, from tests/p11shim), a python-pkcs11 search left open is
finalised with CKR_DEVICE_REMOVED, and Cython prints that twice: the whole traceback through
sys.excepthook, then "Exception ignored" through the unraisable hook. `serve` silences both for
python-pkcs11's own frames (runtime._quiet_pkcs11_finalizers); an operator's log then holds no
traceback for a token that was simply pulled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(os.environ.get("SPYRUS_SHIM_LIBRARY") or ROOT / ".build" / "libp11shim.so")
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"

CHILD = """
import gc, sys
import pkcs11._pkcs11 as p11
from pkcs11 import Attribute, ObjectClass
from spyrus_hsm import runtime
from spyrus_hsm.hsm import Secret, library
from spyrus_hsm.hsm.provision import init_token

init_token(sys.argv[1], "t", Secret(b"so-pin-1"), Secret(b"user-pin-1"))
session = library.load_module(sys.argv[2]).get_token(token_label="t").open(user_pin="user-pin-1")
for i in range(2):
    session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: f"d{i}", Attribute.VALUE: b"x"})
search = p11.SearchIter(session, {}, 2)
search.__enter__()
next(search)
with open(sys.argv[3], "w") as control:
    control.write("state=unplugged\\n")
if sys.argv[4] == "quiet":
    runtime._quiet_pkcs11_finalizers()
del search
gc.collect()
"""


def finalise_after_unplug(tmp_path: Path, mode: str) -> str:
    if not SHIM.exists():
        pytest.fail(f"{SHIM} is not built; run 'make shim'")
    root = tmp_path / mode
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    control = root / "control"
    control.write_text("state=plugged\n")
    env = {"SOFTHSM2_CONF": str(conf), "P11SHIM_CONTROL": str(control), "P11SHIM_TARGET": SOFTHSM,
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, SOFTHSM, str(SHIM), str(control), mode], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_search_finalised_after_an_unplug_prints_nothing_in_serve(tmp_path: Path) -> None:
    assert "DeviceRemoved" in finalise_after_unplug(tmp_path, "default")  # what happens without the hooks
    assert finalise_after_unplug(tmp_path, "quiet") == ""
