"""The HSM facade used by the rest of the package: typed operations, sync and async, its state
and the hooks on it (state listeners, queue depth, an instrumentation wrapper).

Everything runs on the pool's worker threads; the async variants await without blocking the
event loop. Object-changing operations bump the pool's epoch so every worker drops its cached
handles.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from . import library
from . import operations as ops
from .batcher import AsyncRunner
from .capabilities import Capabilities, Need
from .errors import InvalidInput, ObjectNotFound
from .operations import KeyAlgorithm, ObjectInfo, SignAlgorithm, WorkerSession
from .pool import HsmPool
from .recovery import PinSource
from .secret import Secret
from .state import HsmState, PoolSettings
from .uri import Pkcs11Uri, as_uri

T = TypeVar("T")
KeyRef = str | Pkcs11Uri


class Instrument(Protocol):
    """Wraps one operation before it goes to a worker: (fn, operation, key label, mechanism) ->
    fn. The wrapper runs on the worker thread inside the caller's contextvars (telemetry spans
    use it)."""

    def __call__(self, fn: Callable[[WorkerSession], T], operation: str, key: str | None,
                 mechanism: str | None, /) -> Callable[[WorkerSession], T]: ...


class Hsm:
    def __init__(self, settings: PoolSettings, pin: PinSource) -> None:
        self.pool = HsmPool(settings, pin)
        self._async = AsyncRunner(self.pool)
        self.settings = settings
        self._instrument: Instrument | None = None

    def instrument(self, wrapper: Instrument | None) -> Instrument | None:
        """Wrap every instrumented operation with `wrapper` (None: none); returns the previous
        wrapper, so a caller can chain to it."""
        previous, self._instrument = self._instrument, wrapper
        return previous

    def _op(self, fn: Callable[[WorkerSession], T], operation: str, uri: Pkcs11Uri | None = None,
            mechanism: str | None = None) -> Callable[[WorkerSession], T]:
        if self._instrument is None:
            return fn
        label = None if uri is None else (uri.object or (uri.id.hex() if uri.id else None))
        return self._instrument(fn, operation, label, mechanism)

    def member_for(self, key: KeyRef) -> Hsm:
        """The token multi-step work on `key` stays on: this one (a `TokenPair` picks one)."""
        return self

    def add_listener(self, fn: Callable[[HsmState], None]) -> None:
        """Call `fn(state)` on every state change, on an HSM thread; `fn` may call the HSM."""
        self.pool.add_listener(fn)

    def remove_listener(self, fn: Callable[[HsmState], None]) -> None:
        self.pool.remove_listener(fn)

    def explain_faults(self, fn: Callable[[], str | None] | None) -> None:
        """Say why the token is missing in the transport's terms (see HsmPool.explain_faults)."""
        self.pool.explain_faults(fn)

    def queue_depth(self) -> int:
        """Requests admitted and not yet answered."""
        return self.pool.queue_depth()

    def start(self, wait: bool = True) -> Hsm:
        self.pool.start(wait=wait)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers, waiting at most `timeout` for a call in progress."""
        self.pool.close(timeout)

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state(self) -> HsmState:
        return self.pool.state

    @property
    def capabilities(self) -> Capabilities | None:
        """What the token can do, asked when the pool last connected (None: not yet)."""
        return self.pool.capabilities

    def require(self, *needs: Need) -> None:
        """Refuse (`Unsupported`, one line) what the token cannot do, before any work reaches
        it; nothing when the token has not been asked yet (the operation itself checks then)."""
        if Need.SECRET_IMPORT in needs:
            self.ask_secret_import()
        caps = self.pool.capabilities
        if caps is not None:
            caps.require(*needs)

    def ask_secret_import(self) -> None:
        """Find out, once per connection, whether the token stores a secret key given to it (no
        mechanism tells): a session object made and destroyed on a worker's session."""
        caps = self.pool.capabilities
        if caps is None or caps.secret_import is not None or not caps.has(Need.HMAC_SHA256):
            return
        asked = self._run(lambda ws: library.probe_secret_import(ws.session, caps),
                          "asking whether the token stores secret keys")
        if self.pool.capabilities is caps:  # not reconnected meanwhile
            self.pool.learned(asked)

    def _run(self, fn: Callable[[WorkerSession], T], what: str, mutates: bool = False) -> T:
        try:
            return self.pool.run(fn, what)
        finally:
            if mutates:
                self.pool.bump_epoch()

    # --- signing -----------------------------------------------------------------------------

    def sign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        uri = as_uri(key)
        return self.pool.run(self._sign_op(uri, algorithm, data), _what("signing", uri))

    async def asign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes,
                    timeout: float | None = None, background: bool = False) -> bytes:
        """background=True: nobody waits for this signature (e.g. a refresh ahead of expiry); it
        runs after every request that is waiting, and is refused once half the queue is full."""
        uri = as_uri(key)
        return await self._async.run(self._sign_op(uri, algorithm, data), _what("signing", uri), timeout,
                                     background)

    async def asign_unbound(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        """`asign` for bytes a caller chose: refused, as a missing key is, for a private key with
        a certificate beside it (checked in the same operation as the signature)."""
        uri = as_uri(key)
        return await self._async.run(self._sign_op(uri, algorithm, data, ops.sign_unbound), _what("signing", uri))

    def _sign_op(self, uri: Pkcs11Uri, algorithm: SignAlgorithm, data: bytes,
                 fn: Callable[..., bytes] = ops.sign) -> Callable[[WorkerSession], bytes]:
        return self._op(partial(fn, uri=uri, algorithm=algorithm, data=data), "sign", uri,
                        ops.MECHANISM_NAMES[algorithm])

    async def aprobe(self, timeout: float | None = None) -> None:
        """Ask the token for a few random bytes: fails (and starts recovery) if it is gone.
        Not instrumented: a periodic health probe would drown the traces."""
        await self._async.run(ops.probe, "checking the token", timeout)

    async def acertificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        uri = as_uri(key)
        ders = await self._async.run(self._op(partial(ops.certificate_chain, uri=uri), "read_certificates", uri),
                                    _what("reading certificates", uri))
        return [x509.load_der_x509_certificate(d) for d in ders]

    def hmac_sha256(self, key: KeyRef, data: bytes) -> bytes:
        return self.sign(key, SignAlgorithm.HMAC_SHA256, data)

    # --- reading -----------------------------------------------------------------------------

    def key_algorithm(self, key: KeyRef) -> KeyAlgorithm:
        uri = as_uri(key)
        return self._run(partial(ops.key_algorithm, uri=uri), _what("reading key", uri))

    def public_key(self, key: KeyRef) -> PublicKeyTypes:
        """The public key (a `cryptography` object) of the pair named by `key`."""
        uri = as_uri(key)
        der = self._run(partial(ops.public_key_spki, uri=uri), _what("reading public key", uri))
        return serialization.load_der_public_key(der)

    def certificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        uri = as_uri(key)
        ders = self._run(partial(ops.certificate_chain, uri=uri), _what("reading certificates", uri))
        return [x509.load_der_x509_certificate(d) for d in ders]

    def list_objects(self) -> list[ObjectInfo]:
        """Every object on the token: on a USB token each read is a round trip; to look up a
        label use `find`."""
        return self._run(ops.list_objects, "listing objects")

    def find(self, label: str, type: str | None = None) -> list[ObjectInfo]:
        """The objects labelled `label`, of `type` (private, public, cert, secret-key, data;
        None: any type), read with one search. Duplicates are not an error here: all are
        returned, sorted by type then id, and a caller that needs exactly one says so."""
        return self._run(partial(ops.find_objects, label=label, type=type), f"finding '{label}'")

    def secret_key_value_readable(self, key: KeyRef) -> bool:
        uri = as_uri(key)
        return self._run(partial(ops.secret_key_value_readable, uri=uri), _what("reading", uri))

    # --- provisioning ------------------------------------------------------------------------

    def import_secret_key(self, label: str, value: Secret) -> str:
        return self._run(partial(ops.import_secret_key, label=label, value=value),
                         f"importing key '{label}'", mutates=True)

    def derive_hmac_key(self, parent: KeyRef, message: bytes, label: str) -> str:
        uri = as_uri(parent)
        return self._run(partial(ops.derive_hmac_key, parent=uri, message=message, label=label),
                         f"deriving key '{label}'", mutates=True)

    def generate_keypair(self, label: str, algorithm: KeyAlgorithm) -> str:
        return self._run(partial(ops.generate_keypair, label=label, algorithm=algorithm),
                         f"generating key '{label}'", mutates=True)

    def import_pkcs12(self, label: str, data: bytes, password: Secret | None) -> str:
        """Import key, certificate and chain from a PKCS#12, all under one label and CKA_ID."""
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(
                data, password.reveal() if password else None)
        except ValueError:
            raise InvalidInput(
                "the PKCS#12 could not be opened: wrong password, or not a PKCS#12 file"
            ) from None
        if key is None:
            raise InvalidInput("the PKCS#12 holds no private key")
        certs = [c.public_bytes(serialization.Encoding.DER) for c in ([cert] if cert else []) + list(extra or [])]
        if cert is not None:
            _check_matches(key, cert)
        try:
            return self._run(partial(ops.import_pkcs12_objects, label=label, key=key, certs=certs),
                             f"importing PKCS#12 as '{label}'", mutates=True)
        finally:
            del key

    def import_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        """Store certificates beside the key labelled `label`, under the key's CKA_ID."""
        return self._store_certificates(label, certs, replace=False)

    def replace_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        """Store certificates beside the key `label` in place of those there, new first, old
        deleted after: interrupted, the key keeps the old chain (or both), never none."""
        return self._store_certificates(label, certs, replace=True)

    def _store_certificates(self, label: str, certs: list[x509.Certificate], replace: bool) -> str:
        if not certs:
            raise InvalidInput("no certificate found in the input")
        ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
        leaf = x509.load_der_x509_certificate(ops.order_chain(ders)[0])

        def store(ws: WorkerSession) -> str:
            key_id = ops.key_id_of(ws, label)
            if key_id is None:
                raise ObjectNotFound(
                    f"no private key labelled '{label}' to attach the certificate to; "
                    "import or generate the key first"
                )
            spki = ops.public_key_spki(ws, Pkcs11Uri(object=label, id=key_id or None))
            if spki != leaf.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
                raise InvalidInput(f"the certificate's public key is not that of key '{label}'")
            if replace:
                ops.replace_certificates(ws, label, key_id, ders)
                return key_id.hex()
            if ops.has_certificates(ws, label):
                raise InvalidInput(
                    f"key '{label}' already has certificates; delete them first with "
                    f"'spyrus-hsm delete --label {label} --type cert'"
                )
            ops.store_certificates(ws, label, key_id, ders)
            return key_id.hex()

        return self._run(store, f"{'replacing' if replace else 'importing'} certificates for '{label}'",
                         mutates=True)

    def delete(self, ref: KeyRef) -> int:
        uri = as_uri(ref)
        return self._run(partial(ops.delete, uri=uri), _what("deleting", uri), mutates=True)


def _check_matches(key: PrivateKeyTypes, cert: x509.Certificate) -> None:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        raise InvalidInput("the PKCS#12 certificate does not belong to its private key")


def _what(verb: str, uri: Pkcs11Uri) -> str:
    name = uri.object if uri.object is not None else f"id {uri.id.hex() if uri.id else '?'}"
    return f"{verb} '{name}'"
