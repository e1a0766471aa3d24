"""Two tokens serving as one HSM (hsm.second_*): the site keeps running when one of them dies.

Each token has its own pool (sessions, workers, recovery, PIN); `TokenPair` is the same facade
as `Hsm` over both, for `serve` (the CLI and `selftest` address one token at a time). A key
label means "this key on whichever token holds it": a SAS key is the identity's primary key on
one token and its secondary key on the other, a key born in a token is that token's own, with
its own certificate. What the pair does with an operation:

- **signatures** (sign, HMAC) go to a ready token that holds the label, the least queued one
  (ties alternate), so two serial tokens give about twice the signatures a second. One that
  fails there because the token went away (unavailable, timed out, queue full) is tried once
  more on the other token: signing is idempotent, so a leaf gets its answer instead of a 503;
- **reads of what a key is** (its certificates, public key, algorithm) come from the token
  `member_for` names, then the other if that one fails;
- **multi-step work** (a certificate issued by a key and checked against its chain, a key
  generated then certified) must stay on one token: `member_for(label)` names it, and the
  writes of the pair (`generate_keypair`, `replace_certificates`, ...) go to that same token;
- **the state** is ready while one token is, with `degraded` saying which token is missing and
  why; not ready when neither is, as with one token. Each token's own state is in `members`.

Which labels each token holds is read when it becomes ready (one listing) and kept current by
the pair's own writes; a token whose labels differ from the other's is logged once per
difference (`differences`), since the two are meant to hold the same set.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .capabilities import Capabilities, Need
from .client import Hsm, Instrument, KeyRef
from .errors import HsmError, HsmUnavailable, ObjectNotFound
from .operations import KeyAlgorithm, ObjectInfo, SignAlgorithm
from .secret import Secret
from .state import HsmState, Status
from .uri import as_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failing on a token for these is the token's fault, not the request's: worth a second token.
_TOKEN_FAULTS = (HsmUnavailable,)  # HsmTimeout and HsmBusy are HsmUnavailable too


class TokenPair(Hsm):
    """Two `Hsm`s, one per token, as one (see the module's docstring)."""

    def __init__(self, members: Sequence[Hsm]) -> None:
        # Deliberately not Hsm.__init__: the pair has no pool of its own; every method of the
        # facade is answered from the members.
        if len(members) != 2:
            raise ValueError("a token pair is two tokens")
        self.members: tuple[Hsm, ...] = tuple(members)
        self.settings = members[0].settings
        self._instrument: Instrument | None = None
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._held: list[dict[str, set[str]] | None] = [None] * len(members)  # label -> types, once listed
        self._reported: str | None = None  # the last label difference logged
        self._listeners: list[Callable[[HsmState], None]] = []
        self._closing = False
        self._state = self._combine()
        for index, member in enumerate(self.members):
            member.add_listener(partial(self._changed, index))

    # --- state -------------------------------------------------------------------------------

    @property
    def state(self) -> HsmState:
        return self._state

    def _member_state(self, index: int) -> HsmState:
        m = self.members[index]
        st, token = m.state, m.settings.token
        return replace(st, token_label=st.token_label or token.label, token_serial=st.token_serial or token.serial)

    def _combine(self) -> HsmState:
        states = tuple(self._member_state(i) for i in range(len(self.members)))
        ready = [s for s in states if s.ready]
        recoveries = sum(s.recoveries for s in states)
        changes = [s.last_change for s in states if s.last_change]
        last_change = changes[-1] if changes else None
        if ready:
            return HsmState("ready", None, ready[0].token_label, ready[0].token_serial, recoveries=recoveries,
                            last_change=last_change, members=states)
        statuses = {s.status for s in states}
        status: Status = "starting" if "starting" in statuses else "stopped" if statuses == {"stopped"} else "degraded"
        reason = "; ".join(f"token {s.name}: {s.reason or s.status}" for s in states)
        return HsmState(status, reason, states[0].token_label, states[0].token_serial, recoveries=recoveries,
                        restart_required=any(s.restart_required for s in states), last_change=last_change,
                        members=states)

    def _changed(self, index: int, state: HsmState) -> None:
        """A member's state changed (on its thread): tell the pair's listeners the sum, then
        re-read the member's labels if it is ready (after: listing a large token takes a while,
        and a listener may have to note something at once, e.g. which reader holds the card)."""
        self._tell()
        if state.ready:
            self._list(index)

    def _tell(self) -> None:
        with self._lock:
            before, self._state = self._state, self._combine()
            after = self._state
        if _same(before, after):
            return
        if self._closing:
            pass
        elif after.degraded and not before.degraded:
            log.warning("HSM: serving on one token; %s", after.degraded)
        elif before.degraded and not after.degraded and after.ready:
            log.info("HSM: both tokens serve again")
        for fn in list(self._listeners):
            try:
                fn(after)
            except Exception:
                log.exception("HSM state listener failed")

    def add_listener(self, fn: Callable[[HsmState], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[HsmState], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def explain_faults(self, fn: Callable[[], str | None] | None) -> None:
        for m in self.members:
            m.explain_faults(fn)

    def instrument(self, wrapper: Instrument | None) -> Instrument | None:
        previous, self._instrument = self._instrument, wrapper
        for m in self.members:
            m.instrument(wrapper)
        return previous

    def queue_depth(self) -> int:
        return sum(m.queue_depth() for m in self.members)

    def start(self, wait: bool = True) -> TokenPair:
        """wait=True connects both now and raises the first one's error (the CLI addresses one
        token, so only tests do this); serve starts them without waiting."""
        for m in self.members:
            m.start(wait=wait)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True  # one token stopping before the other is not news
        for m in self.members:
            m.close(timeout / len(self.members))

    @property
    def capabilities(self) -> Capabilities | None:
        """What the first ready token can do (the configuration must suit both; `require` asks each)."""
        for m in self.members:
            if m.state.ready and m.capabilities is not None:
                return m.capabilities
        return self.members[0].capabilities

    def require(self, *needs: Need) -> None:
        for m in self.members:
            m.require(*needs)

    def ask_secret_import(self) -> None:
        for m in self.members:
            if m.state.ready:
                m.ask_secret_import()

    # --- which labels each token holds ----------------------------------------------------------

    def _list(self, index: int) -> None:
        try:
            objects = self.members[index].list_objects()
        except HsmError as exc:
            log.debug("could not list token %d's objects: %s", index + 1, exc)
            return
        held: dict[str, set[str]] = {}
        for o in objects:
            held.setdefault(o.label, set()).add(o.type)
        with self._lock:
            self._held[index] = held
        self._report_differences()

    def differences(self) -> dict[str, list[str]]:
        """Token name -> the keys ("label (type)") the other token holds and it lacks; empty
        while either token has not been listed."""
        with self._lock:
            held = list(self._held)
        if any(h is None for h in held):
            return {}
        out = {}
        for i, mine in enumerate(held):
            other = held[1 - i]
            assert mine is not None and other is not None
            lacks = sorted(f"{label} ({t})" for label, types in other.items() for t in types
                           if t in ("private", "secret-key", "cert") and t not in mine.get(label, set()))
            if lacks:
                out[self._member_state(i).name] = lacks
        return out

    def _report_differences(self) -> None:
        diff = self.differences()
        text = "; ".join(f"token {name} lacks {_some(keys)}" for name, keys in diff.items()) or None
        with self._lock:
            if text == self._reported:
                return
            self._reported = text
        if text:
            log.warning("HSM: the two tokens do not hold the same keys: %s (a key on one token only is "
                        "lost with it; see docs/two-tokens.md)", text)

    def _holds(self, index: int, label: str | None) -> bool | None:
        """Whether token `index` holds `label` (None: not known, e.g. not listed yet)."""
        with self._lock:
            held = self._held[index]
        if held is None or label is None:
            return None
        return label in held

    def _note(self, index: int, label: str, type: str | None, present: bool) -> None:
        with self._lock:
            held = self._held[index]
            if held is None:
                return
            if present:
                held.setdefault(label, set()).add(type or "?")
            else:
                held.pop(label, None)

    # --- routing --------------------------------------------------------------------------------

    def _order(self, label: str | None, share: bool = True) -> list[int]:
        """Tokens to try for `label`, best first: ready ones that hold it (or may), least queued,
        ties alternating (share=False: in member order, as `member_for` picks); then the
        others, so that an error names why none could."""
        turn = next(self._turn)
        n = len(self.members)
        ready = [i for i in range(n) if self.members[i].state.ready and self._holds(i, label) is not False]
        if share:
            ready.sort(key=lambda i: (self.members[i].queue_depth(), (i + turn) % n))
        holders = [i for i in range(n) if i not in ready and self._holds(i, label) is not False]
        rest = [i for i in range(n) if i not in ready and i not in holders]
        return ready + holders + rest

    def member_for(self, key: KeyRef) -> Hsm:
        """The token multi-step work on `key` should stay on (see the module's docstring): the
        first ready one that holds it, else the first ready one; the same answer for as long as
        the tokens' states do not change (no load sharing here)."""
        label = as_uri(key).object
        n = len(self.members)
        ready = [i for i in range(n) if self.members[i].state.ready]
        holders = [i for i in ready if self._holds(i, label) is not False]
        return self.members[(holders or ready or [0])[0]]

    def _route(self, key: KeyRef, call: Callable[[Hsm], T], share: bool = True) -> T:
        label = as_uri(key).object
        order = self._order(label, share)
        for n, index in enumerate(order):
            try:
                return call(self.members[index])
            except HsmError as exc:
                self._failed(order, n, label, exc)
        raise AssertionError("unreachable: the last token's error is raised")

    async def _aroute(self, key: KeyRef, call: Callable[[Hsm], Awaitable[T]], share: bool = True) -> T:
        label = as_uri(key).object
        order = self._order(label, share)
        for n, index in enumerate(order):
            try:
                return await call(self.members[index])
            except HsmError as exc:
                self._failed(order, n, label, exc)
        raise AssertionError("unreachable: the last token's error is raised")

    def _failed(self, order: list[int], n: int, label: str | None, exc: HsmError) -> None:
        """Token order[n] failed with `exc`: raise it, unless it is the token's fault (or the key
        is not there) and a ready token is next to try."""
        index = order[n]
        if isinstance(exc, ObjectNotFound) and label is not None:
            self._note(index, label, None, present=False)
        last = n + 1 == len(order) or not self.members[order[n + 1]].state.ready
        if last or not isinstance(exc, (ObjectNotFound, *_TOKEN_FAULTS)):
            raise exc
        log.debug("token %d failed (%s); trying the other", index + 1, exc)

    # --- one-step operations: either token (signatures shared; what a key is, from the token
    # member_for names, so that a multi-step caller reads and signs on the same one) -----------

    def sign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        return self._route(key, lambda m: m.sign(key, algorithm, data))

    async def asign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes,
                    timeout: float | None = None, background: bool = False) -> bytes:
        return await self._aroute(key, lambda m: m.asign(key, algorithm, data, timeout, background))

    async def asign_unbound(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        return await self._aroute(key, lambda m: m.asign_unbound(key, algorithm, data))

    async def aprobe(self, timeout: float | None = None) -> None:
        """Probe every ready token (a failed probe starts that token's recovery); raises only
        when none answered."""
        answered, error = False, None
        for m in self.members:
            if not m.state.ready:
                continue
            try:
                await m.aprobe(timeout)
                answered = True
            except HsmError as exc:
                error = exc
        if not answered and error is not None:
            raise error

    async def acertificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        return await self._aroute(key, lambda m: m.acertificate_chain(key), share=False)

    def hmac_sha256(self, key: KeyRef, data: bytes) -> bytes:
        return self.sign(key, SignAlgorithm.HMAC_SHA256, data)

    def key_algorithm(self, key: KeyRef) -> KeyAlgorithm:
        return self._route(key, lambda m: m.key_algorithm(key), share=False)

    def public_key(self, key: KeyRef) -> PublicKeyTypes:
        return self._route(key, lambda m: m.public_key(key), share=False)

    def certificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        return self._route(key, lambda m: m.certificate_chain(key), share=False)

    def secret_key_value_readable(self, key: KeyRef) -> bool:
        return self._route(key, lambda m: m.secret_key_value_readable(key), share=False)

    # --- reading both ------------------------------------------------------------------------------

    def list_objects(self) -> list[ObjectInfo]:
        """The objects of every ready token (a key on both is listed once per token)."""
        out: list[ObjectInfo] = []
        for m in self._ready_or_first():
            out += m.list_objects()
        return out

    def find(self, label: str, type: str | None = None) -> list[ObjectInfo]:
        """The objects labelled `label` on the token `member_for(label)` names: what a
        multi-step caller then works on."""
        return self.member_for(label).find(label, type)

    def _ready_or_first(self) -> list[Hsm]:
        ready = [m for m in self.members if m.state.ready]
        return ready or [self.members[0]]

    # --- writes: on the token multi-step work on the label stays on ---------------------------------

    def _write(self, label: str, type: str | None, call: Callable[[Hsm], T]) -> T:
        index = self.members.index(self.member_for(label))
        result = call(self.members[index])
        self._note(index, label, type, present=True)
        return result

    def import_secret_key(self, label: str, value: Secret) -> str:
        return self._write(label, "secret-key", lambda m: m.import_secret_key(label, value))

    def derive_hmac_key(self, parent: KeyRef, message: bytes, label: str) -> str:
        """Derived on every ready token that holds `parent` (a DPS group key: the primary's
        derivation on one token, the secondary's on the other; DPS accepts either)."""
        made = None
        for index in self._order(as_uri(parent).object):
            m = self.members[index]
            if not m.state.ready or self._holds(index, as_uri(parent).object) is False:
                continue
            held = m.find(label, "secret-key")
            made = held[0].id_hex if held else m.derive_hmac_key(parent, message, label)
            self._note(index, label, "secret-key", present=True)
        if made is None:
            return self.members[0].derive_hmac_key(parent, message, label)  # raises why it cannot
        return made

    def generate_keypair(self, label: str, algorithm: KeyAlgorithm) -> str:
        return self._write(label, "private", lambda m: m.generate_keypair(label, algorithm))

    def import_pkcs12(self, label: str, data: bytes, password: Secret | None) -> str:
        return self._write(label, "private", lambda m: m.import_pkcs12(label, data, password))

    def import_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        return self._write(label, "cert", lambda m: m.import_certificates(label, certs))

    def replace_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        return self._write(label, "cert", lambda m: m.replace_certificates(label, certs))

    def delete(self, ref: KeyRef) -> int:
        label = as_uri(ref).object
        member = self.member_for(ref)
        count = member.delete(ref)
        if label is not None:
            self._note(self.members.index(member), label, None, present=False)
        return count


LISTED = 10  # keys named in the log line about the tokens' differences; the rest counted


def _some(keys: list[str]) -> str:
    more = len(keys) - LISTED
    return ", ".join(keys[:LISTED]) + (f" and {more} more ('spyrus-hsm token compare' lists them)" if more > 0 else "")


K = TypeVar("K")


def one_token(keys: K, label: str) -> K:
    """`keys` for multi-step work on `label` (a key read, then used; a chain and its key): with
    two tokens the one that work stays on (`member_for`), with one token `keys` itself."""
    if isinstance(keys, TokenPair):
        return cast(K, keys.member_for(label))
    return keys


def _same(a: HsmState, b: HsmState) -> bool:
    """Equal but for `since` (each combination is stamped anew)."""
    return replace(a, since=0.0, members=()) == replace(b, since=0.0, members=()) and \
        [(m.status, m.reason) for m in a.members] == [(m.status, m.reason) for m in b.members]
