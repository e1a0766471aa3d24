"""The PKCS#11 fault-injection shim (tests/p11shim/p11shim.c) with TWO SoftHSM2 tokens behind it:
one token is unplugged, replugged or busy (unplug_slot=N, serial=1 per slot) while the other keeps
working.

Like test_p11shim.py, this file loads private copies of the shim and of SoftHSM (a PKCS#11 module
is one instance per file in a process), so their state stays apart from every other test. The two
tokens are made through the shim by the project's own token init, in a token directory of this
file's own (the PINs never on a command line).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, SlotFlag
from pkcs11.exceptions import (
    DeviceRemoved,
    NoSuchToken,
    SessionHandleInvalid,
    TokenNotPresent,
    UserAlreadyLoggedIn,
)
from shim_control import write_control
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(os.environ.get("SPYRUS_SHIM_LIBRARY") or ROOT / ".build" / "libp11shim.so")
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL_A = "slot-a"
LABEL_B = "slot-b"
SO_PIN = "so-pin-1234"
USER_PIN = "user-pin-1234"
CKU_USER = 1
CKR_OK = 0
CKR_TOKEN_NOT_PRESENT = 0xE0
CKR_USER_ALREADY_LOGGED_IN = 0x100

pytestmark = pytest.mark.timeout(90)


@dataclass
class Rig:
    lib: Any
    control: Path
    shim: ctypes.CDLL  # the shim's exported C_* (the instance python-pkcs11 uses)
    target: ctypes.CDLL  # SoftHSM behind the shim, called directly: no control file sampled
    slot_a: int
    slot_b: int

    def set(self, **settings: object) -> None:
        """Replace the control file atomically."""
        write_control(self.control, **settings)

    def observe(self) -> None:
        """Make one PKCS#11 call, so the shim samples the control file now."""
        self.lib.get_slots()

    def token(self, label: str) -> Any:
        return self.lib.get_token(token_label=label)

    def login(self, label: str) -> Any:
        return self.token(label).open(rw=True, user_pin=USER_PIN)

    def raw_login(self, session: Any) -> int:
        """C_Login through the shim on an open session; the CKR."""
        pin = USER_PIN.encode()
        return int(self.shim.C_Login(session.handle, CKU_USER, pin, len(pin)))

    def open_in_target(self, session: Any) -> bool:
        """Whether SoftHSM itself still has the session (asked without going through the shim)."""
        info = (ctypes.c_ulong * 8)()
        return int(self.target.C_GetSessionInfo(session.handle, ctypes.byref(info))) == CKR_OK


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if not SHIM.is_file():
        pytest.skip(f"{SHIM} is not built; run 'make shim' in {ROOT}")
    if not SOFTHSM.is_file():
        pytest.skip(f"SoftHSM2 is not installed ({SOFTHSM}); apt-get install softhsm2")
    root = tmp_path_factory.mktemp("p11shim-slots")
    shim_copy = root / "libp11shim-slots.so"
    target_copy = root / "libsofthsm2-slots.so"
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

        # The two tokens made through the shim by the project's own code (PINs never on a
        # command line); the project's loader: C_Initialize with CKF_OS_LOCKING_OK.
        for label in (LABEL_A, LABEL_B):
            init_token(str(shim_copy), label, Secret(SO_PIN.encode()), Secret(USER_PIN.encode()))
        lib = library.load_module(str(shim_copy))
        assert isinstance(lib, pkcs11._pkcs11.lib)
        shim = ctypes.CDLL(str(shim_copy))
        shim.C_Login.restype = ctypes.c_ulong
        shim.C_Login.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong]
        target = ctypes.CDLL(str(target_copy))  # the instance the shim loaded (same file)
        target.C_GetSessionInfo.restype = ctypes.c_ulong
        target.C_GetSessionInfo.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
        slot_a = lib.get_token(token_label=LABEL_A).slot.slot_id
        slot_b = lib.get_token(token_label=LABEL_B).slot.slot_id
        assert slot_a != slot_b
        try:
            yield Rig(lib, control, shim, target, slot_a, slot_b)
        finally:
            lib.finalize()


@pytest.fixture(autouse=True)
def plugged(rig: Rig) -> Iterator[Rig]:
    rig.set(state="plugged")
    yield rig
    rig.set(state="unplugged")  # a global replug: drops every session and login the test left
    rig.observe()
    rig.set(state="plugged")
    rig.observe()


def _hmac_key(session: Any, value: bytes) -> Any:
    return session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: value,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,  # usable only while the token is logged in
        Attribute.SIGN: True,
        Attribute.LABEL: "k-" + secrets.token_hex(4),
    })


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _sign(key: Any, data: bytes) -> bytes:
    return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))


class Signer(threading.Thread):
    """One sign in a thread of its own; `outcome` is the signature or the exception."""

    def __init__(self, key: Any, data: bytes, before: Any = None) -> None:
        super().__init__(daemon=True)
        self.key, self.data, self.before = key, data, before
        self.outcome: bytes | BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            if self.before is not None:
                self.before()
            self.outcome = _sign(self.key, self.data)
        except BaseException as exc:
            self.outcome = exc
        finally:
            self.done.set()


def _in_delay(log: Path) -> Any:
    """The watched thread's second C_Sign (the first is the length query) has been entered."""
    return lambda: log.exists() and log.read_text().count("C_Sign ") >= 2


# python-pkcs11's search iterator calls C_FindObjectsFinal again when it is garbage-collected
# after a failed C_FindObjectsInit and raises there (DeviceRemoved) - "ignored in __del__".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unplug_slot_unplugs_that_token_only(rig: Rig) -> None:
    va, vb = secrets.token_bytes(32), secrets.token_bytes(32)
    sa, sb = rig.login(LABEL_A), rig.login(LABEL_B)
    ka, kb = _hmac_key(sa, va), _hmac_key(sb, vb)
    pa, pb = rig.token(LABEL_A).open(), rig.token(LABEL_B).open()  # public sessions
    token_a = rig.token(LABEL_A)
    slot_a, slot_b = token_a.slot, rig.token(LABEL_B).slot

    rig.set(state="plugged", unplug_slot=rig.slot_a)
    # A: every session call DEVICE_REMOVED, every token call TOKEN_NOT_PRESENT.
    with pytest.raises(DeviceRemoved):
        _sign(ka, b"x")
    with pytest.raises(DeviceRemoved):
        list(sa.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    with pytest.raises(DeviceRemoved):
        pa.generate_random(128)
    with pytest.raises(TokenNotPresent):
        token_a.open(rw=True)
    with pytest.raises(TokenNotPresent):
        slot_a.get_token()
    with pytest.raises(TokenNotPresent):
        slot_a.get_mechanisms()
    assert rig.raw_login(pa) == CKR_TOKEN_NOT_PRESENT  # C_Login goes by its session's slot
    with pytest.raises(NoSuchToken):
        rig.token(LABEL_A)
    present = [s.slot_id for s in rig.lib.get_slots(token_present=True)]
    assert rig.slot_a not in present and rig.slot_b in present
    flags = {s.slot_id: s.flags for s in rig.lib.get_slots(token_present=False)}
    assert not flags[rig.slot_a] & SlotFlag.TOKEN_PRESENT
    assert flags[rig.slot_b] & SlotFlag.TOKEN_PRESENT
    assert LABEL_A not in [t.label for t in rig.lib.get_tokens()]

    # B: works, its login included.
    assert _sign(kb, b"x") == _mac(vb, b"x")
    assert rig.raw_login(pb) == CKR_USER_ALREADY_LOGGED_IN
    assert len(pb.generate_random(128)) == 16
    assert slot_b.get_mechanisms()
    labels = [t.label for t in rig.lib.get_tokens()]
    assert LABEL_B in labels and LABEL_A not in labels
    fresh = rig.token(LABEL_B).open()
    assert len(fresh.generate_random(128)) == 16
    fresh.close()

    # state=unplugged still means every slot.
    rig.set(state="unplugged", unplug_slot=rig.slot_a)
    with pytest.raises(DeviceRemoved):
        _sign(kb, b"y")
    with pytest.raises(TokenNotPresent):
        slot_b.get_token()
    assert rig.lib.get_slots(token_present=True) == []


def test_replugging_one_slot_leaves_the_other_slots_sessions_and_login(rig: Rig) -> None:
    va, vb = secrets.token_bytes(32), secrets.token_bytes(32)
    sa, sb = rig.login(LABEL_A), rig.login(LABEL_B)
    ka, kb = _hmac_key(sa, va), _hmac_key(sb, vb)
    pa, pb = rig.token(LABEL_A).open(), rig.token(LABEL_B).open()

    rig.set(state="plugged", unplug_slot=rig.slot_a)
    rig.observe()
    rig.set(state="plugged")
    rig.observe()
    # B: the sessions from before still work, and B is still logged in (kb is a private object).
    assert _sign(kb, b"after") == _mac(vb, b"after")
    assert len(pb.generate_random(128)) == 16
    assert rig.open_in_target(sb) and rig.open_in_target(pb)
    with pytest.raises(UserAlreadyLoggedIn):
        rig.login(LABEL_B)
    # A: the sessions from before are dead (closed in SoftHSM too), and A's login went with them.
    assert not rig.open_in_target(sa) and not rig.open_in_target(pa)
    with pytest.raises(SessionHandleInvalid):
        _sign(ka, b"after")
    with pytest.raises(SessionHandleInvalid):
        pa.generate_random(128)
    fresh = rig.login(LABEL_A)  # not "already logged in"
    ka2 = _hmac_key(fresh, va)
    assert _sign(ka2, b"after") == _mac(va, b"after")
    with pytest.raises(SessionHandleInvalid):
        sa.close()
    assert _sign(kb, b"again") == _mac(vb, b"again")


def test_slots_come_back_one_at_a_time(rig: Rig) -> None:
    va, vb = secrets.token_bytes(32), secrets.token_bytes(32)
    sa, sb = rig.login(LABEL_A), rig.login(LABEL_B)
    ka, kb = _hmac_key(sa, va), _hmac_key(sb, vb)

    rig.set(state="plugged", unplug_slot=f"{rig.slot_a}, {rig.slot_b}")
    assert rig.lib.get_slots(token_present=True) != []  # the free slot SoftHSM always has
    assert {s.slot_id for s in rig.lib.get_slots(token_present=True)} & {rig.slot_a, rig.slot_b} == set()
    with pytest.raises(DeviceRemoved):
        _sign(kb, b"x")
    rig.set(state="plugged", unplug_slot=rig.slot_b)  # A is back: its old sessions are dead
    with pytest.raises(SessionHandleInvalid):
        _sign(ka, b"x")
    with pytest.raises(DeviceRemoved):  # B is still out: its sessions are not dead (yet)
        _sign(kb, b"x")
    sa2 = rig.login(LABEL_A)
    ka2 = _hmac_key(sa2, va)
    rig.set(state="plugged")  # B is back: its old sessions are dead; A's new one lives on
    with pytest.raises(SessionHandleInvalid):
        _sign(kb, b"x")
    assert _sign(ka2, b"x") == _mac(va, b"x")

    # A global replug while B is listed: every session is dropped, and B stays unplugged.
    rig.set(state="unplugged", unplug_slot=rig.slot_b)
    rig.observe()
    rig.set(state="plugged", unplug_slot=rig.slot_b)
    with pytest.raises(SessionHandleInvalid):
        _sign(ka2, b"x")
    with pytest.raises(NoSuchToken):
        rig.login(LABEL_B)
    fresh = rig.login(LABEL_A)
    assert _sign(_hmac_key(fresh, va), b"x") == _mac(va, b"x")


def test_only_an_unplug_of_its_own_slot_cuts_a_slow_sign_short(rig: Rig, tmp_path: Path) -> None:
    va = secrets.token_bytes(32)
    ka = _hmac_key(rig.login(LABEL_A), va)
    # B unplugged all along: every poll of A's delay sees it, and A's sign goes through.
    rig.set(state="plugged", sign_delay_ms=200, unplug_slot=rig.slot_b)
    assert _sign(ka, b"slow") == _mac(va, b"slow")

    log = tmp_path / "calls.log"

    def watch_me() -> None:
        rig.set(state="plugged", sign_delay_ms=60000, watch_thread=threading.get_native_id(), thread_log=log)

    signer = Signer(ka, b"never", before=watch_me)
    signer.start()
    try:
        wait_for(_in_delay(log), 10, "the sign on A in its delay")
        rig.set(state="plugged", sign_delay_ms=60000, unplug_slot=rig.slot_a)
        assert signer.done.wait(20), "the slow sign did not notice the unplug of its slot"
        assert isinstance(signer.outcome, DeviceRemoved), signer.outcome
    finally:
        rig.set(state="unplugged")  # whatever happened, no sign stays asleep
        signer.join(20)


def test_serial_locks_each_slot_on_its_own(rig: Rig, tmp_path: Path) -> None:
    """serial=1: a sign on B goes through while one on A holds A's lock; a second one on A waits.

    That the first sign on A holds A's lock is proven, not timed: it is in its delay (after the
    lock) once a replug of B has happened, which only its polls of the control file can have
    observed (this thread makes no call through the shim meanwhile; it watches SoftHSM directly).
    """
    va, vb = secrets.token_bytes(32), secrets.token_bytes(32)
    sa = rig.login(LABEL_A)
    ka = _hmac_key(sa, va)
    sa2 = rig.token(LABEL_A).open()  # a second session on A, with the same (session) key
    ka_2 = sa2.get_key(label=ka.label)
    marker = rig.token(LABEL_B).open()  # closed in SoftHSM by the replug of B
    log = tmp_path / "calls.log"

    def watch_me() -> None:
        rig.set(state="plugged", serial=1, sign_delay_ms=60000, unplug_slot=rig.slot_b,
                watch_thread=threading.get_native_id(), thread_log=log)

    first = Signer(ka, b"first", before=watch_me)
    second = Signer(ka_2, b"second")
    on_b: Signer | None = None
    first.start()
    try:
        wait_for(_in_delay(log), 10, "the first sign on A entering its delay")
        rig.set(state="plugged", serial=1, sign_delay_ms=0)  # B back; later signs: no delay
        wait_for(lambda: not rig.open_in_target(marker), 10,
                 "the replug of B, seen by the first sign on A in its delay")
        assert not first.done.is_set()

        second.start()  # waits for A's lock (after its entry: delay 0)
        kb = _hmac_key(rig.login(LABEL_B), vb)
        on_b = Signer(kb, b"on b")
        on_b.start()
        assert on_b.done.wait(20), "a sign on B waited for the lock of A"
        assert on_b.outcome == _mac(vb, b"on b"), on_b.outcome
        assert not first.done.is_set()
        assert not second.done.is_set(), f"a second sign on A did not wait for the first: {second.outcome!r}"

        rig.set(state="plugged", serial=1, sign_delay_ms=0, unplug_slot=rig.slot_a)
        assert first.done.wait(20) and second.done.wait(20)
        assert isinstance(first.outcome, DeviceRemoved), first.outcome
        # The second one was entered before the unplug (its delay is 0: nothing to cut short), or,
        # entered later, it found A unplugged.
        assert second.outcome == _mac(va, b"second") or isinstance(second.outcome, DeviceRemoved), \
            second.outcome
    finally:
        rig.set(state="unplugged")  # whatever happened, no sign stays asleep
        for t in (first, second, on_b):
            if t is not None and t.ident is not None:
                t.join(20)
