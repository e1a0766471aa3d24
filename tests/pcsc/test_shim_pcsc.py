"""The test shim's PC/SC mode against a real pcscd and virtual card: the SoftHSM2 token behind it
is there only while the card is in the named reader, and pulling the card fails calls as a
vendor library over a CCID reader would (CKR_DEVICE_REMOVED on sessions, CKR_TOKEN_NOT_PRESENT
for new ones); a card put back is a fresh token (old sessions invalid, a new login works).

Private copies of the shim and of SoftHSM (as in tests/integration/test_p11shim.py) keep their
state apart from any other PKCS#11 use in this pytest process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pcsc_rig import READER, HostPcscd, VirtualCard
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import DeviceRemoved, NoSuchToken, SessionHandleInvalid

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / ".build" / "libp11shim.so"
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL = "pcsc-shim"
SO_PIN, USER_PIN = b"so-pin-5678", b"user-pin-5678"


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not SHIM.is_file():
        pytest.fail(f"{SHIM} is not built; run 'make shim'")
    root = tmp_path_factory.mktemp("shim-pcsc")
    shim_copy, target_copy = root / "libp11shim-pcsc.so", root / "libsofthsm2-pcsc.so"
    shutil.copyfile(SHIM, shim_copy)
    shutil.copyfile(SOFTHSM, target_copy)
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    # The token is made straight on SoftHSM (no card needed for that), then used through the shim.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.setenv("P11SHIM_TARGET", str(target_copy))
        mp.setenv("P11SHIM_CONTROL", "")
        mp.setenv("P11SHIM_PCSC_READER", READER)
        from spyrus_hsm.hsm import Secret, library
        from spyrus_hsm.hsm.provision import init_token

        init_token(str(target_copy), LABEL, Secret(SO_PIN), Secret(USER_PIN))
        loaded = library.load_module(str(shim_copy))
        try:
            yield loaded
        finally:
            loaded.finalize()


def login(lib: Any) -> Any:
    return lib.get_token(token_label=LABEL).open(rw=True, user_pin=USER_PIN.decode())


def hmac_key(session: Any, value: bytes) -> Any:
    return session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: value, Attribute.TOKEN: False, Attribute.SIGN: True, Attribute.LABEL: "k",
    })


def signs(session: Any) -> bool:
    value = secrets.token_bytes(32)
    mac = bytes(hmac_key(session, value).sign(b"data", mechanism=Mechanism.SHA256_HMAC))
    return mac == hmac.new(value, b"data", hashlib.sha256).digest()


def test_the_token_is_there_only_while_the_card_is_in_the_reader(lib: Any, host_pcscd: HostPcscd,
                                                                 card: VirtualCard) -> None:
    with pytest.raises(NoSuchToken):
        lib.get_token(token_label=LABEL)
    card.insert()
    session = login(lib)
    assert signs(session)
    card.pull()
    with pytest.raises(DeviceRemoved):
        session.generate_random(32)
    with pytest.raises(NoSuchToken):
        lib.get_token(token_label=LABEL)
    slot = lib.get_slots(token_present=False)[0]
    with pytest.raises(pkcs11.exceptions.TokenNotPresent):
        slot.get_token()
    card.insert()
    with pytest.raises(SessionHandleInvalid):  # the card was out: its sessions are gone
        session.generate_random(32)
    assert signs(login(lib))


def test_a_card_pulled_and_put_back_between_two_calls_still_ends_the_sessions(
        lib: Any, host_pcscd: HostPcscd, card: VirtualCard) -> None:
    card.insert()
    session = login(lib)
    assert signs(session)
    card.pull()
    card.insert()  # no PKCS#11 call saw the card out; pcscd's event counter did
    with pytest.raises(SessionHandleInvalid):
        session.generate_random(32)
    assert signs(login(lib))


def test_without_pcscd_there_is_no_token_and_with_it_back_there_is(lib: Any, host_pcscd: HostPcscd,
                                                                    card: VirtualCard) -> None:
    card.insert()
    assert signs(login(lib))
    host_pcscd.kill()
    card.forget()
    with pytest.raises(NoSuchToken):
        lib.get_token(token_label=LABEL)
    host_pcscd.start()
    card.insert()
    assert signs(login(lib))
