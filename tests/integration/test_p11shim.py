"""The PKCS#11 fault-injection shim (tests/p11shim/p11shim.c) against a fresh SoftHSM2 token.

python-pkcs11 is used directly here (tests may; the package may not). A PKCS#11 module is loaded
once per process (dlopen shares one instance per file) and SoftHSM reads SOFTHSM2_CONF at
C_Initialize, so this file loads private copies of the shim and of SoftHSM: their state and
configuration stay apart from any other test in the same pytest process that loads
libsofthsm2.so or .build/libp11shim.so itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, SlotFlag
from pkcs11.exceptions import (
    DeviceMemory,
    DeviceRemoved,
    FunctionNotSupported,
    MechanismInvalid,
    NoSuchToken,
    PinIncorrect,
    SessionCount,
    SessionHandleInvalid,
    TokenNotPresent,
)
from shim_control import write_control
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(os.environ.get("SPYRUS_SHIM_LIBRARY") or ROOT / ".build" / "libp11shim.so")
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL = "t1"
SO_PIN = b"so-pin-1234"
USER_PIN = b"user-pin-1234"
# Faults a caller may see while the token is pulled or just put back; anything else is a bug.
REMOVAL_FAULTS = (DeviceRemoved, TokenNotPresent, SessionHandleInvalid)

pytestmark = pytest.mark.timeout(30)


@dataclass
class Shim:
    lib: Any
    control: Path
    path: str

    def set(self, **settings: object) -> None:
        """Replace the control file atomically."""
        write_control(self.control, **settings)

    def observe(self) -> None:
        """Make one PKCS#11 call, so the shim samples the control file now."""
        self.lib.get_slots()

    def replug(self) -> None:
        self.set(state="unplugged")
        self.observe()
        self.set(state="plugged")
        self.observe()

    def token(self) -> Any:
        return self.lib.get_token(token_label=LABEL)


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    if not SHIM.is_file():
        pytest.skip(f"{SHIM} is not built; run 'make shim' in {ROOT}")
    if not SOFTHSM.is_file():
        pytest.skip(f"SoftHSM2 is not installed ({SOFTHSM}); apt-get install softhsm2")
    root = tmp_path_factory.mktemp("p11shim")
    shim_copy = root / "libp11shim-test.so"
    target_copy = root / "libsofthsm2-test.so"
    shutil.copyfile(SHIM, shim_copy)
    shutil.copyfile(SOFTHSM, target_copy)
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    control = root / "control"
    control.write_text("state=plugged\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.setenv("P11SHIM_TARGET", str(target_copy))
        mp.setenv("P11SHIM_CONTROL", str(control))
        from spyrus_hsm.hsm import Secret, library
        from spyrus_hsm.hsm.provision import init_token

        # Through the shim: the project's own code makes the token (C_InitToken from the
        # shim's function list). Its loader is also how this file gets the library object:
        # a python-pkcs11 `lib` initialised with CKF_OS_LOCKING_OK, which concurrent sessions
        # on SoftHSM need (pkcs11.lib() would call C_Initialize(NULL) a second time).
        init_token(str(shim_copy), LABEL, Secret(SO_PIN), Secret(USER_PIN))
        lib = library.load_module(str(shim_copy))
        assert isinstance(lib, pkcs11._pkcs11.lib)
        try:
            yield Shim(lib, control, str(shim_copy))
        finally:
            lib.finalize()


@pytest.fixture(autouse=True)
def plugged(shim: Shim) -> Iterator[Shim]:
    shim.set(state="plugged")
    yield shim
    shim.replug()  # drops every session and the login, whatever the test left behind


def _login(shim: Shim) -> Any:
    return shim.token().open(rw=True, user_pin=USER_PIN.decode())


def _hmac_key(session: Any, value: bytes, private: bool = True) -> Any:
    return session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: value,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: private,
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
        Attribute.LABEL: "k-" + secrets.token_hex(4),
    })


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _sign(key: Any, data: bytes) -> bytes:
    return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))


def test_forwards_login_import_and_sign(shim: Shim) -> None:
    assert shim.lib.cryptoki_version == (2, 40)
    # A 2.40 module: python-pkcs11 must not find a C_GetInterface (3.0) entry point.
    assert not hasattr(ctypes.CDLL(shim.path), "C_GetInterface")
    token = shim.token()
    assert token.label == LABEL
    session = _login(shim)
    value = secrets.token_bytes(32)
    key = _hmac_key(session, value)
    assert _sign(key, b"hello") == _mac(value, b"hello")
    stream = key.sign(iter([b"hel", b"lo"]), mechanism=Mechanism.SHA256_HMAC)  # Update/Final
    assert bytes(stream) == _mac(value, b"hello")
    found = list(session.get_objects({Attribute.LABEL: key.label}))
    assert [o.handle for o in found] == [key.handle]
    session.close()


# python-pkcs11's search iterator calls C_FindObjectsFinal again when it is garbage-collected
# after a failed C_FindObjectsInit and raises there (DeviceRemoved) - "ignored in __del__".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unplugged_token_answers_like_a_removed_usb_device(shim: Shim) -> None:
    session = _login(shim)
    value = secrets.token_bytes(32)
    key = _hmac_key(session, value)
    token = shim.token()
    slot = token.slot
    assert _sign(key, b"before") == _mac(value, b"before")

    shim.set(state="unplugged")
    with pytest.raises(DeviceRemoved):
        _sign(key, b"during")
    with pytest.raises(DeviceRemoved):
        list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    with pytest.raises(DeviceRemoved):
        _hmac_key(session, value)
    with pytest.raises(TokenNotPresent):
        token.open(rw=True)
    with pytest.raises(TokenNotPresent):
        slot.get_token()
    with pytest.raises(TokenNotPresent):
        slot.get_mechanisms()
    assert shim.lib.get_slots(token_present=True) == []
    all_slots = shim.lib.get_slots(token_present=False)
    assert all_slots and all(not (s.flags & SlotFlag.TOKEN_PRESENT) for s in all_slots)
    assert list(shim.lib.get_tokens()) == []
    with pytest.raises(NoSuchToken):
        shim.token()
    with pytest.raises(DeviceRemoved):
        session.close()  # C_Logout on a session of a removed token


def test_replug_drops_old_sessions_and_the_login(shim: Shim) -> None:
    session = _login(shim)
    value = secrets.token_bytes(32)
    key = _hmac_key(session, value)
    public = shim.token().open()  # a second, not logged-in session: gone as well
    assert _sign(key, b"before") == _mac(value, b"before")

    shim.replug()
    with pytest.raises(SessionHandleInvalid):
        _sign(key, b"after")
    with pytest.raises(SessionHandleInvalid):
        public.generate_random(64)
    with pytest.raises(SessionHandleInvalid):
        session.close()
    # The login went with the sessions: logging in again is not "already logged in".
    fresh = _login(shim)
    key2 = _hmac_key(fresh, value)
    assert _sign(key2, b"after") == _mac(value, b"after")
    # Stale handles stay dead; the new session is unaffected by them.
    with pytest.raises(SessionHandleInvalid):
        public.close()
    assert _sign(key2, b"again") == _mac(value, b"again")
    fresh.close()


def test_a_missing_control_file_means_plugged(shim: Shim) -> None:
    shim.set(state="unplugged")
    assert shim.lib.get_slots(token_present=True) == []
    shim.control.unlink()
    assert shim.lib.get_slots(token_present=True) != []
    shim.control.write_text("")
    session = _login(shim)
    value = secrets.token_bytes(32)
    assert _sign(_hmac_key(session, value), b"x") == _mac(value, b"x")


def test_sign_delay_slows_signing_and_changes_apply_without_reloading(shim: Shim) -> None:
    session = _login(shim)
    value = secrets.token_bytes(32)
    key = _hmac_key(session, value)
    shim.set(state="plugged", sign_delay_ms=50)
    start = time.monotonic()
    assert _sign(key, b"slow") == _mac(value, b"slow")
    assert time.monotonic() - start >= 0.050
    shim.set(state="plugged", sign_delay_ms=150)
    start = time.monotonic()
    assert _sign(key, b"slower") == _mac(value, b"slower")
    assert time.monotonic() - start >= 0.150
    # Only signing is slowed: a verify with the same key is not (no lower bound to check).
    key.verify(b"slow", _mac(value, b"slow"), mechanism=Mechanism.SHA256_HMAC)
    session.close()


def test_unplug_during_a_slow_sign_fails_it(shim: Shim, tmp_path: Path) -> None:
    session = _login(shim)
    key = _hmac_key(session, secrets.token_bytes(32))
    calls = tmp_path / "signer-calls.log"
    outcome: list[BaseException | bytes] = []
    watching = threading.Event()

    def sign() -> None:
        shim.set(state="plugged", sign_delay_ms=5000, watch_thread=threading.get_native_id(), thread_log=calls)
        watching.set()
        try:
            outcome.append(_sign(key, b"never"))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=sign)
    t.start()
    assert watching.wait(5)
    # The shim notes each call before its delay: the second C_Sign (after the length query) is
    # the one now sleeping.
    wait_for(lambda: calls.exists() and calls.read_text().count("C_Sign ") >= 2, 5.0, "the sign in its delay")
    shim.set(state="unplugged", sign_delay_ms=5000)
    t.join(timeout=4)
    assert not t.is_alive(), "the slow sign did not notice the unplug"
    assert len(outcome) == 1 and isinstance(outcome[0], DeviceRemoved), outcome


def test_fail_login_and_a_same_size_rewrite_in_place(shim: Shim) -> None:
    shim.control.write_text("fail_login=1\n")
    with pytest.raises(PinIncorrect):
        _login(shim)
    # Same size, same inode, usually the same timestamp tick: still noticed (by content).
    shim.control.write_text("fail_login=0\n")
    session = _login(shim)
    session.close()


def test_concurrent_signers_across_unplug_and_replug_never_get_a_wrong_answer(
        shim: Shim) -> None:
    value = secrets.token_bytes(32)
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"ok": 0, "fault": 0}
    problems: list[str] = []

    def worker(n: int) -> None:
        key = session = None
        i = 0
        while not stop.is_set():
            data = f"{n}:{i}".encode()
            i += 1
            try:
                if key is None:
                    session = shim.token().open(rw=True)  # public session object: no login
                    key = _hmac_key(session, value, private=False)
                good = _sign(key, data) == _mac(value, data)
                with lock:
                    counts["ok"] += 1
                    if not good:
                        problems.append(f"wrong signature for {data!r}")
            except (*REMOVAL_FAULTS, NoSuchToken):
                with lock:
                    counts["fault"] += 1
                key = session = None
                time.sleep(0.005)  # pacing of the load, not a wait
            except Exception as exc:
                with lock:
                    problems.append(repr(exc))
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    def count(kind: str) -> int:
        with lock:
            return counts[kind]

    def more(kind: str, n: int, what: str) -> None:
        before = count(kind)
        wait_for(lambda: problems or count(kind) >= before + n, 10.0, what)

    try:
        for _ in range(3):
            more("ok", 40, "signatures while plugged")
            shim.set(state="unplugged")
            more("fault", 8, "faults while unplugged")
            shim.set(state="plugged")
        more("ok", 40, "signatures after the last replug")
        ok_before_end = count("ok")
        more("ok", 40, "signatures at the end")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert problems == []
    assert counts["fault"] > 0
    assert counts["ok"] > ok_before_end > 0


# --- the smart-card profile: a session cap, no C_CopyObject, raw ECDSA only, a small store ----

class _TokenInfo(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                ("flags", ctypes.c_ulong), ("ulMaxSessionCount", ctypes.c_ulong),
                ("ulSessionCount", ctypes.c_ulong), ("ulMaxRwSessionCount", ctypes.c_ulong),
                ("ulRwSessionCount", ctypes.c_ulong), ("rest", ctypes.c_ubyte * 128)]


def _token_info(shim: Shim) -> _TokenInfo:
    """C_GetTokenInfo's session counts (python-pkcs11 does not expose them)."""
    info = _TokenInfo()
    slot = shim.token().slot.slot_id
    assert ctypes.CDLL(shim.path).C_GetTokenInfo(ctypes.c_ulong(slot), ctypes.byref(info)) == 0
    return info


def _token_objects(session: Any) -> int:
    return len(list(session.get_objects({Attribute.TOKEN: True})))


def _data_object(session: Any, label: str, token: bool = True) -> Any:
    return session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: token,
                                  Attribute.LABEL: label, Attribute.VALUE: b"d"})


def test_the_smartcard_profile_caps_sessions_refuses_copies_and_offers_raw_ecdsa_only(shim: Shim) -> None:
    shim.set(state="plugged", profile="smartcard")
    token = shim.token()
    sessions = [_login(shim)] + [token.open() for _ in range(3)]
    with pytest.raises(SessionCount):
        token.open()
    info = _token_info(shim)
    assert (info.ulMaxSessionCount, info.ulSessionCount) == (4, 4)
    sessions.pop().close()
    sessions.append(token.open())  # a closed session gives its place back
    with pytest.raises(SessionCount):
        token.open(rw=True)
    session = sessions[0]
    pub, priv = session.generate_keypair(KeyType.EC, store=False, label="sc",
                                         public_template={Attribute.EC_PARAMS: _P256_PARAMS})
    with pytest.raises(FunctionNotSupported):
        pub.copy({Attribute.LABEL: "sc-copy"})
    mechanisms = set(token.slot.get_mechanisms())
    assert Mechanism.ECDSA in mechanisms and Mechanism.SHA256_HMAC in mechanisms
    assert not mechanisms & {Mechanism.ECDSA_SHA1, Mechanism.ECDSA_SHA256, Mechanism.ECDSA_SHA384}
    with pytest.raises(MechanismInvalid):
        token.slot.get_mechanism_info(Mechanism.ECDSA_SHA256)
    with pytest.raises(MechanismInvalid):
        priv.sign(b"data", mechanism=Mechanism.ECDSA_SHA256)
    digest = hashlib.sha256(b"data").digest()
    assert pub.verify(digest, priv.sign(digest, mechanism=Mechanism.ECDSA), mechanism=Mechanism.ECDSA)

    # A token without HMAC as well (names or numbers), and a session cap of its own.
    shim.set(state="plugged", profile="smartcard", hide_mechanisms=f"CKM_SHA256_HMAC,{0x1041:#x}",
             max_sessions=5)
    mechanisms = set(token.slot.get_mechanisms())
    assert not mechanisms & {Mechanism.SHA256_HMAC, Mechanism.ECDSA, Mechanism.ECDSA_SHA256}
    assert Mechanism.SHA384_HMAC in mechanisms
    key = _hmac_key(session, secrets.token_bytes(32))
    with pytest.raises(MechanismInvalid):
        _sign(key, b"x")
    with pytest.raises(MechanismInvalid):
        priv.sign(digest, mechanism=Mechanism.ECDSA)
    sessions.append(token.open())
    with pytest.raises(SessionCount):
        token.open()

    # Without the profile: SoftHSM's own behaviour again, on the sessions already open.
    shim.set(state="plugged")
    sessions.append(token.open())
    assert pub.copy({Attribute.LABEL: "sc-copy"})[Attribute.LABEL] == "sc-copy"
    assert len(_sign(key, b"x")) == 32
    for s in reversed(sessions):
        s.close()


_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # the named curve prime256v1


def test_a_full_store_refuses_new_token_objects_until_one_is_deleted(shim: Shim) -> None:
    session = _login(shim)
    held = _token_objects(session)
    shim.set(state="plugged", max_objects=held + 1)
    with pytest.raises(DeviceMemory):  # a key pair is two objects
        session.generate_keypair(KeyType.EC, store=True, label="full",
                                 public_template={Attribute.EC_PARAMS: _P256_PARAMS})
    assert _token_objects(session) == held
    first = _data_object(session, "one")
    with pytest.raises(DeviceMemory):
        _data_object(session, "two")
    with pytest.raises(DeviceMemory):
        session.generate_key(KeyType.AES, 128, store=True, label="aes")
    _data_object(session, "session-only", token=False)  # session objects take no room
    first.destroy()
    _data_object(session, "two").destroy()

    # The same with room counted from the setting: the third object is refused.
    shim.set(state="plugged", free_objects=2)
    made = [_data_object(session, "a"), _data_object(session, "b")]
    with pytest.raises(DeviceMemory):
        _data_object(session, "c")
    made.pop().destroy()
    made.append(_data_object(session, "c"))
    shim.set(state="plugged", free_objects=1)  # a new setting: counted from here
    with pytest.raises(DeviceMemory):
        session.generate_keypair(KeyType.EC, store=True, label="full",
                                 public_template={Attribute.EC_PARAMS: _P256_PARAMS})
    made.append(_data_object(session, "d"))
    shim.set(state="plugged")
    for obj in made:
        obj.destroy()
    assert _token_objects(session) == held
    session.close()
