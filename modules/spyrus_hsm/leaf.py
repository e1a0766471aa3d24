"""The leaf-device side: SAS tokens from a spyrus-hsm module's HTTPS API, and an IoT Hub device
client connected through edgeHub (a transparent gateway) that renews them before they expire.

A leaf has no HSM and no key: it proves who it is to the module (a bearer token or a client
certificate), the module signs the leaf's SAS token with the key it holds in its HSM, and the leaf
hands the token to `IoTHubDeviceClient.create_from_sastoken(..., gateway_hostname=...)`. This module
imports nothing of PKCS#11 or of the rest of the package but its error root and the basics
(back-off, threads), so it runs anywhere `azure-iot-device` does; `TokenService` alone needs only
the standard library (the SDK is imported by `LeafDevice.connect`). The `spyrus-hsm-leaf`
distribution (leaf/pyproject.toml) installs just these modules on a leaf.

    tokens = TokenService("https://edge-gw:8443", "edge-ca.pem", "leaf-17", bearer_token=secret)
    leaf = LeafDevice(tokens, gateway_hostname="edge-gw", trust_anchor="edge-ca.pem").connect()
    leaf.client.send_message("hello")

Renewal: a thread asks the service for a new token once `renew_at` of the current one's life has
passed and gives it to the SDK (`update_sastoken`). A token's life is measured as the service
states it (`expiresInSeconds`, or its expiry against the answer's Date header) and counted down
on the leaf's monotonic clock: a leaf whose wall clock is wrong (ahead by more than the TTL, or
booted without a real-time clock) still renews on time. While the service is unreachable or answers
503/429 it retries with jittered, capped exponential back-off (at least Retry-After seconds when
the service says so) until the current token expires; the connection keeps the token it has.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .backoff import Backoff
from .errors import Kind, SpyrusError
from .threads import Worker

log = logging.getLogger(__name__)
RETRYABLE = frozenset({429, 502, 503, 504})


class TokenRefused(SpyrusError, kind=Kind.UPSTREAM):
    """The token service refused the request (a 4xx other than 429): retrying will not help."""


class TokenServiceUnavailable(SpyrusError, kind=Kind.UNAVAILABLE):
    """The token service could not be reached, or stayed busy, until the deadline."""


@dataclass(frozen=True)
class LeafToken:
    token: str
    expires_on: int        # seconds since the epoch, by the service's clock
    lifetime: float        # seconds it had left when the service answered, by the service's clock
    received: float        # the leaf's monotonic clock when the answer came

    def __repr__(self) -> str:  # the token is a credential
        return f"LeafToken(expires_on={self.expires_on}, lifetime={self.lifetime:g})"

    def renew_due(self, renew_at: float) -> float:
        """When (monotonic clock) `renew_at` of its life has passed."""
        return self.received + renew_at * self.lifetime

    @property
    def expires_at(self) -> float:
        """When (monotonic clock) it expires."""
        return self.received + self.lifetime


def token_backoff(initial: float = 0.5, cap: float = 30.0) -> Backoff:
    """A leaf's retries: full jitter (a random wait up to initial * 2**n, capped); a Retry-After
    is honoured up to `cap`, plus a little spread so leaves told the same time do not return together."""
    return Backoff(initial, cap, jitter="full", retry_after_cap=cap)


class TokenService:
    """A client of the module's `POST /v1/sas-tokens` for one device."""

    def __init__(self, url: str, trust_anchor: str, device_id: str, *, bearer_token: str | None = None,
                 client_cert: tuple[str, str] | None = None, hub: str | None = None, ttl: int | None = None,
                 timeout: float = 10.0, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"the token service URL must be https://host[:port], got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 443
        self.device_id, self.hub, self.ttl, self.timeout = device_id, hub, ttl, timeout
        self.backoff = backoff or token_backoff()
        self.clock = clock  # monotonic: a token's life is counted down on it
        self.retries = 0  # requests that failed and were tried again
        self._bearer = bearer_token
        self._context = ssl.create_default_context(cafile=trust_anchor)
        if client_cert is not None:
            self._context.load_cert_chain(*client_cert)

    def fetch(self, min_remaining: int | None = None, deadline: float | None = None,
              stop: threading.Event | None = None) -> LeafToken:
        """A token for the device; retried while the service is away or busy, until `deadline`
        (time.monotonic(); None: one minute) or until `stop` is set."""
        deadline = time.monotonic() + 60.0 if deadline is None else deadline
        attempt = 0
        while True:
            try:
                return self._request(min_remaining)
            except _Retry as retry:
                wait = self.backoff.delay(attempt + 1, retry.after)
                if time.monotonic() + wait > deadline:
                    raise TokenServiceUnavailable(f"no SAS token for {self.device_id} from "
                                                  f"{self.host}:{self.port}: {retry}") from None
                log.info("token service: %s; retrying in %.1f s", retry, wait)
                if (stop or threading.Event()).wait(wait):
                    raise TokenServiceUnavailable("stopped while waiting for the token service") from None
                attempt += 1
                self.retries += 1

    def _request(self, min_remaining: int | None) -> LeafToken:
        body: dict[str, Any] = {"deviceId": self.device_id}
        for name, value in (("hub", self.hub), ("ttlSeconds", self.ttl), ("minRemainingSeconds", min_remaining)):
            if value is not None:
                body[name] = value
        headers = {"Content-Type": "application/json"}
        if self._bearer is not None:
            headers["Authorization"] = f"Bearer {self._bearer}"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._context, timeout=self.timeout)
        try:
            conn.request("POST", "/v1/sas-tokens", body=json.dumps(body), headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if response.status in RETRYABLE:
            raise _Retry(f"HTTP {response.status}", _seconds(response.getheader("Retry-After")))
        answer = _json(data)
        if response.status != 200:
            raise TokenRefused(f"the token service refused a token for {self.device_id}: HTTP {response.status} "
                               f"{answer.get('title', '')} {answer.get('detail', '')}".rstrip())
        try:
            token, expires_on = str(answer["token"]), int(answer["expiresOn"])
        except (KeyError, TypeError, ValueError):
            raise TokenRefused("the token service's answer has no token and expiresOn") from None
        return LeafToken(token, expires_on, _lifetime(answer, expires_on, response.getheader("Date")), self.clock())


class LeafDevice:
    """An `IoTHubDeviceClient` connected through edgeHub with tokens from a `TokenService`,
    renewed after `renew_at` of each token's life."""

    def __init__(self, tokens: TokenService, gateway_hostname: str, trust_anchor: str, *, renew_at: float = 0.8,
                 **client_options: Any) -> None:
        if not 0.0 < renew_at < 1.0:
            raise ValueError(f"renew_at must be above 0 and below 1 (a fraction of a token's life), got {renew_at}")
        self.tokens, self.gateway_hostname, self.renew_at = tokens, gateway_hostname, renew_at
        with open(trust_anchor, encoding="ascii") as f:
            self._gateway_ca = f.read()
        self._options = client_options
        self._client: Any = None
        self._token: LeafToken | None = None
        self._worker = Worker("leaf-token-renewal", self._renew_forever)
        self.renewals = 0          # tokens handed to the SDK after the first
        self.failed_attempts = 0   # renewal rounds that ended without a token

    @property
    def client(self) -> Any:
        """The SDK client (send_message, receive handlers, ...), once connected."""
        if self._client is None:
            raise RuntimeError("the leaf device is not connected: call connect() first")
        return self._client

    @property
    def expires_on(self) -> int | None:
        return None if self._token is None else self._token.expires_on

    @property
    def renew_time(self) -> float | None:
        """When (time.time(), for display) the current token is due for renewal."""
        wait = self.seconds_to_renewal()
        return None if wait is None else time.time() + wait

    def seconds_to_renewal(self) -> float | None:
        """Seconds until the current token is due for renewal (0 when overdue)."""
        if self._token is None:
            return None
        return max(0.0, self._token.renew_due(self.renew_at) - self.tokens.clock())

    def connect(self) -> LeafDevice:
        from azure.iot.device import IoTHubDeviceClient  # here: TokenService needs no SDK

        self._token = self.tokens.fetch()
        options: dict[str, Any] = {"gateway_hostname": self.gateway_hostname,
                                   "server_verification_cert": self._gateway_ca, **self._options}
        self._client = IoTHubDeviceClient.create_from_sastoken(self._token.token, **options)
        self._client.connect()
        self._worker.start()
        return self

    def close(self) -> None:
        self._worker.close(self.tokens.timeout + 5)
        if self._client is not None:
            self._client.shutdown()

    def __enter__(self) -> LeafDevice:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _renew_forever(self) -> None:
        while not self._worker.stopping:
            token = self._token
            assert token is not None
            if self._worker.stop_event.wait(max(0.0, token.renew_due(self.renew_at) - self.tokens.clock())):
                return
            self._renew(token)

    def _renew(self, current: LeafToken) -> None:
        """One renewal round, retried until the current token expires; a failed round is followed
        by the next after a back-off (the SDK reconnects once it has a valid token)."""
        remaining = current.expires_at - self.tokens.clock()
        deadline = time.monotonic() + max(remaining, 1.0)
        try:
            fresh = self.tokens.fetch(min_remaining=max(1, int(remaining) + 1), deadline=deadline,
                                      stop=self._worker.stop_event)
        except (TokenRefused, TokenServiceUnavailable) as exc:
            self.failed_attempts += 1
            log.warning("SAS token for %s not renewed: %s", self.tokens.device_id, exc)
            # then at once: it is overdue
            self._worker.stop_event.wait(self.tokens.backoff.delay(self.failed_attempts + 1))
            return
        self._token = fresh
        try:
            self.client.update_sastoken(fresh.token)
        except Exception as exc:  # the SDK keeps the new token and connects with it when it can
            log.warning("SAS token for %s renewed, but reconnecting with it failed: %s",
                        self.tokens.device_id, type(exc).__name__)
        self.renewals += 1
        log.info("SAS token for %s renewed; expires at %d", self.tokens.device_id, fresh.expires_on)


class _Retry(Exception):
    """A failure worth retrying; private to TokenService.fetch, never raised out of it."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


def _lifetime(answer: dict[str, Any], expires_on: int, date: str | None) -> float:
    """Seconds the token had left when the service answered, by the service's own clock: its
    `expiresInSeconds`, or else its expiry against the answer's Date header (a service that
    predates the field); the leaf's wall clock only when the service sent neither."""
    stated = answer.get("expiresInSeconds")
    if isinstance(stated, (int, float)) and not isinstance(stated, bool):
        return max(0.0, float(stated))
    try:
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return max(0.0, expires_on - now)


def _seconds(header: str | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the back-off


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
