"""The service's state and the decisions every route shares: who may do what, which key signs
for a device, the token cache, the audit trail. Routes parse and answer; this decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer

from ..cloud.dps import Assignment, DpsRequest, Provisioner
from ..config import CloudConfig, PolicyRule, ServiceConfig
from ..hsm import Hsm, HsmError, ObjectNotFound, SignAlgorithm
from ..identity.sas import SasMinter, SasToken
from ..telemetry import Telemetry
from ..threads import Lane
from . import policy as pol
from .audit import CLOSE_TIMEOUT, AuditLog
from .auth import Authenticator, ClientCertVerifier, Principal
from .cache import TokenCache
from .keyroles import KeyRoles, unknown_key
from .problems import Problem, forbidden
from .ratelimit import FailureLimiter, RateLimiter, source_address

DPS_THREADS = 4
GRACE = 5.0            # seconds past registration_timeout before a DPS call is given up on
FILE_DEADLINE = 10.0   # seconds for a read of the state volume (a stalled disk)
PRINCIPAL = web.RequestKey("spyrus.principal", Principal)
AUDIT = web.RequestKey("spyrus.audit", dict[str, Any])
REQUEST_ID = web.RequestKey("spyrus.request_id", str)


@dataclass
class Deps:
    """What the service needs from the module around it."""
    hsm: Hsm
    telemetry: Telemetry
    state_dir: Path
    cloud: CloudConfig
    default_hub: Callable[[], str | None]      # the module's own hub, once known
    default_ttl: int                           # sas.default_ttl
    load_provider: Callable[[], None] | None   # for X.509 registrations (pkcs11-provider)


class Service:
    def __init__(self, cfg: ServiceConfig, deps: Deps, audit: AuditLog) -> None:
        self.deps = deps
        self.hsm = deps.hsm
        self.telemetry = deps.telemetry
        self.audit = audit
        self.minter = SasMinter(deps.hsm)
        self.provisioner = Provisioner(deps.hsm, deps.state_dir, deps.load_provider)
        self._registrations: dict[DpsRequest, asyncio.Task[Assignment]] = {}  # by canonical request
        self._latest: dict[str, asyncio.Task[Assignment]] = {}                 # by registration id
        # DPS runs block a thread for up to registration_timeout: a lane of their own, so a burst
        # of registrations (or a DPS that never answers) holds at most DPS_THREADS threads.
        self._dps = Lane("dps", DPS_THREADS)
        self._files = Lane("service-files", 2)  # stored registration results
        ca = deps.cloud.server_ca_file
        self.dps_ca_pem = Path(ca).read_text() if ca else None
        self.failures = FailureLimiter(cfg.unauthenticated_per_second, cfg.unauthenticated_burst)
        self.reconfigure(cfg)

    def reconfigure(self, cfg: ServiceConfig, ceiling: tuple[PolicyRule, ...] | None = None) -> None:
        """Apply a new service configuration without a restart (listeners excepted). `ceiling`:
        the config file's policy, when `cfg` comes from the module twin (it cannot widen it)."""
        verifier = ClientCertVerifier.from_file(cfg.client_ca_file) if cfg.client_ca_file else None
        self.cfg = cfg
        self.audit.fail_closed = cfg.audit_fail_closed
        self.audit.fsync = cfg.audit_fsync
        self.authenticator = Authenticator(verifier, cfg.bearer_tokens)
        self.policy = pol.Policy(cfg.policy, ceiling)
        self.roles = KeyRoles.of(cfg, self.deps.cloud)
        self.limiter = RateLimiter(cfg.rate_limit_per_second, cfg.rate_limit_burst)
        # the failure limiter is kept across reconfigurations (its buckets are the sources'
        # history); only its rate may change
        self.failures.rate, self.failures.burst = cfg.unauthenticated_per_second, cfg.unauthenticated_burst
        self.cache = TokenCache(cfg.cache_reuse_fraction, max_entries=cfg.cache_max_entries)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop taking registrations (a running DPS call is abandoned by its own timeout: its
        thread is a daemon, it holds up no exit); write what the audit log has queued (waiting
        at most `timeout`)."""
        self._dps.close(0)
        self.audit.close(timeout)

    @property
    def tracer(self) -> Tracer:
        return self.telemetry.tracer

    # --- authentication and authorisation -------------------------------------------------

    def authenticate(self, request: web.Request) -> Principal:
        # A source whose requests keep failing authentication is refused before its credentials
        # are looked at (see ratelimit.FailureLimiter).
        failures = self.failures
        source = source_address(request.transport.get_extra_info("peername") if request.transport else None)
        wait = failures.wait(source)
        if wait is not None:
            raise Problem(429, "rate-limited", "Too many requests",
                          f"too many requests from this address failed authentication; retry in {wait} s",
                          retry_after=wait)
        try:
            principal = self.authenticator.authenticate(
                request.transport.get_extra_info("ssl_object") if request.transport else None,
                request.headers.get("Authorization"))
        except Problem as exc:
            if exc.status == 401:
                failures.failed(source)
            raise
        request[PRINCIPAL] = principal
        self.audit_fields(request, principal=principal.name)
        wait = self.limiter.check(principal.name)
        if wait is not None:
            raise Problem(429, "rate-limited", "Too many requests",
                          f"'{principal.name}' is over {self.cfg.rate_limit_per_second:g} requests/s; "
                          f"retry in {wait} s", retry_after=wait)
        return principal

    def authorize(self, request: web.Request, operation: str, *, device: str | None = None,
                  key: str | None = None, key_named_by_caller: bool = False) -> None:
        principal: Principal = request[PRINCIPAL]
        self.audit_fields(request, operation=operation, device=device, key=key)
        decision = self.policy.decide(pol.Request(principal.name, operation, device, key, key_named_by_caller))
        if not decision.allowed:
            raise forbidden(decision.reason)
        self.audit_fields(request, reason=decision.reason)

    @staticmethod
    def audit_fields(request: web.Request, **fields: Any) -> None:
        if AUDIT not in request:
            request[AUDIT] = {}
        request[AUDIT].update(fields)

    # --- what signs for whom --------------------------------------------------------------

    async def sign_for_caller(self, request: web.Request, key: str, algorithm: SignAlgorithm,
                              data: bytes) -> bytes:
        """A signature with a key the caller named: only a key declared for it (keyroles), and
        the HSM refuses an identity's key in the same operation. Refused as a missing key."""
        hmac = algorithm is SignAlgorithm.HMAC_SHA256
        why = self.roles.why_not_signable(key, hmac)
        if why is not None:
            self.audit_fields(request, reason=f"key not signable: {why}")
            raise unknown_key(key, hmac, why)
        return await self.hsm.asign_unbound(key, algorithm, data)

    def device_key(self, request: web.Request, label: str, subject: str, named: str, *, hmac: bool,
                   own: str | None = None) -> str:
        """`label` (a device template's key) if it may serve `subject` (what the caller named:
        "device 'd'"); else refused as a missing key is (`chosen_key`). `own`: the reserved job
        this route uses it for (the DPS group key)."""
        why = self.roles.why_not_for_device(label, own=own)
        if why is not None:
            self.audit_fields(request, reason=f"key not for devices: {why}")
            with chosen_key(subject, named, label):
                raise unknown_key(label, hmac, why)
        return label

    def key_for(self, template: str, principal: str, **ids: str | None) -> str:
        values = {"deviceId": "", "moduleId": "", "registrationId": "", **{k: v or "" for k, v in ids.items()}}
        return template.format(cn=principal, **values)

    def default_hub(self) -> str | None:
        """The hub of device tokens whose request names none: configured, or the module's own."""
        return self.cfg.hub or self.deps.cloud.hub or self.deps.default_hub()

    def hub_for(self, requested: str | None) -> str:
        hub = requested or self.default_hub()
        if not hub:
            raise Problem(400, "invalid-request", "The request is not valid",
                          "'hub' is required: this service has no default hub")
        return hub

    async def sas_token(self, key: str, uri: str, ttl: int, key_name: str | None = None,
                        min_life: int | None = None) -> tuple[SasToken, bool]:
        """(token, reused): a token with at least `min_life` seconds left (default:
        cache_min_remaining_fraction of `ttl`). A "sas.mint" span covers each signature actually
        made; requests that shared it or were served from the cache are counted as cache hits.
        A cached token past its reuse point is refreshed in the background (see `cache`)."""
        if min_life is None:
            min_life = math.ceil(self.cfg.cache_min_remaining_fraction * ttl)
        token, reused = await self.cache.get((key, uri, key_name, ttl), ttl,
                                             lambda background: self._mint(key, uri, ttl, key_name, background),
                                             min(min_life, ttl))
        (self.telemetry.metrics.cache_hits if reused else self.telemetry.metrics.cache_misses).add(1)
        trace.get_current_span().set_attribute("sas.cache_hit", reused)  # on the request's span
        return token, reused

    async def _mint(self, key: str, uri: str, ttl: int, key_name: str | None, background: bool) -> SasToken:
        attributes: dict[str, str | int | bool] = {"hsm.key.label": key, "sas.ttl": ttl,
                                                   "sas.refresh_ahead": background}
        # No exception event: Python's traceback formatting costs more than the rest of a refused
        # request (a storm refuses thousands: "the HSM queue is full"); the error type says enough.
        with self.tracer.start_as_current_span("sas.mint", attributes=attributes, record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                return await self.minter.amint(key, uri, ttl, key_name, background)
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR))
                raise

    # --- DPS on behalf of leaves ----------------------------------------------------------

    async def register(self, req: DpsRequest) -> Assignment:
        """Concurrent identical requests share one registration. Different requests for one id
        run one after the other (DPS takes one connection per registration id) and each gets
        its own answer."""
        key = replace(req, payload=req.canonical_payload())
        task = self._registrations.get(key)
        if task is None:
            task = asyncio.ensure_future(self._register(req, after=self._latest.get(req.registration_id)))
            self._registrations[key] = self._latest[req.registration_id] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: DpsRequest, task: asyncio.Task[Assignment]) -> None:
        self._registrations.pop(key, None)
        if self._latest.get(key.registration_id) is task:
            del self._latest[key.registration_id]

    async def _register(self, req: DpsRequest, after: asyncio.Task[Assignment] | None) -> Assignment:
        if after is not None:
            await asyncio.wait([after])  # its outcome is its callers'
        attributes = {"dps.registration_id": req.registration_id, "dps.attestation": req.attestation,
                      "dps.id_scope": req.id_scope}
        with self.tracer.start_as_current_span("dps.register", attributes=attributes) as span:
            timeout = self.cfg.registration_timeout
            result = await self._dps.run(lambda: self.provisioner.register(req, timeout=timeout),
                                         timeout + GRACE, f"registering '{req.registration_id}' with DPS")
            span.set_attribute("dps.status", result.status)
            return result

    async def stored_registration(self, registration_id: str) -> Assignment | None:
        """The stored result (a file read, off the loop)."""
        return await self._files.run(lambda: self.provisioner.cached(registration_id), FILE_DEADLINE,
                                     f"reading the stored registration of '{registration_id}'")


@contextlib.contextmanager
def chosen_key(subject: str, named: str, *labels: str | None) -> Iterator[None]:
    """An HSM error that names a key the configuration chose (`labels`: a template's, a derived
    group key's), told in the caller's terms: `subject` is what it named ("device 'd'", the
    id `named`). A label other than that id is the operator's business: the log keeps it."""
    try:
        yield
    except HsmError as exc:
        hidden = [label for label in labels if label and label != named]
        if exc.public is not None and any(f"'{label}" in exc.public for label in hidden):
            exc.public = f"no key for {subject}" if isinstance(exc, ObjectNotFound) else \
                f"the HSM cannot use the key for {subject}"
        raise
