"""The long-running module (`spyrus-hsm serve`): HSM pool, OpenSSL provider, Azure identity,
the HTTP signing service for leaf devices and telemetry, the Prometheus endpoint and, under
IoT Edge, the upstream events.

Starts even when the HSM is missing or the PIN is wrong: it reports not-ready and recovers
when fixed rather than crash-looping (edgeAgent stops restarting a module that does). Stops
cleanly on SIGTERM/SIGINT with exit code 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import sys
import threading
import traceback
import types
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import events as events_mod
from . import threads
from .cloud.connection import CloudConnection
from .config import Config, HsmConfig, PolicyRule, ServiceConfig
from .edge.agent import EdgeAgent, EdgeHooks
from .edge.environment import detect as detect_edge
from .hsm import (
    EXIT_RESTART,
    Hsm,
    HsmError,
    HsmState,
    RefusedPins,
    TokenPair,
    mark_shared,
    read_secret_file,
    restart_done,
    restart_once,
)
from .identity import tls
from .identity import x509 as x509_id
from .listening import ListenError
from .metrics import EdgeLabels, MetricsEndpoint, registry
from .pcsc.daemon import Pcscd
from .pcsc.watch import CardWatch
from .service import collector
from .service.api_tls import ServerTls
from .service.audit import AuditLog
from .service.core import Deps, Service
from .service.server import Listeners, probe_forever
from .shutdown import Shutdown
from .telemetry import Telemetry, hsm_instrument
from .threads import Lane, Worker

log = logging.getLogger("spyrus_hsm")
# Each part's own limit when stopping; together they share one budget (shutdown.STOP_SECONDS).
EDGE_STOP_SECONDS = 3.0
AUDIT_CLOSE_SECONDS = 2.0  # a stalled audit disk
HSM_CLOSE_SECONDS = 5.0  # a call in progress in the token
PCSCD_STOP_SECONDS = 3.0
LISTEN_RETRY = 5.0  # seconds between attempts to bind a listener's port (and to start the API)
CERTIFICATE_CHECK_INTERVAL = 600.0  # seconds between reads of the X.509 credentials' expiry
READ_DEADLINE = 60.0        # seconds for a read of the token's credentials (several HSM calls)
EXIT_UNSUPPORTED = 2  # the token cannot do what the configuration needs: as a config error
TLS_SETUP_DEADLINE = 120.0  # ... for the API's TLS credential (HSM reads, a signature, the provider)


def serving_hsm(cfg: Config) -> Hsm:
    """The token `serve` uses, or both (a `TokenPair`) with hsm.second_* set."""
    if not cfg.hsm.two_tokens:
        return _one_token(cfg.hsm, cfg.state_dir, "hsm.pin_file (or SPYRUS_HSM_PIN_FILE)")
    # Two pools on one module: neither may C_Finalize it under the other's sessions.
    mark_shared(cfg.hsm.module)
    return TokenPair([_one_token(cfg.hsm.token("first"), cfg.state_dir, "hsm.pin_file (or SPYRUS_HSM_PIN_FILE)"),
                      _one_token(cfg.hsm.token("second"), cfg.state_dir, "hsm.second_pin_file")])


def _one_token(hsm_cfg: HsmConfig, state_dir: str, setting: str) -> Hsm:
    pin_file = hsm_cfg.pin_file
    if not pin_file:
        raise ValueError(f"serve needs {setting}")
    refused = RefusedPins.for_file(state_dir, pin_file)
    return Hsm(hsm_cfg.pool_settings(refused), lambda: read_secret_file(pin_file))


class Module:
    def __init__(self, cfg: Config, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.hsm = serving_hsm(cfg)
        self.hsm.instrument(hsm_instrument(telemetry))
        # PC/SC: pcscd run here (internal) or the host's; either way a missing token is explained
        # in reader terms ("card removed from reader X"). The first listener: the pool calls its
        # listeners one after the other, and the reader holding the card must be noted as soon
        # as the token is ready (a listener before it, listing a token of many objects, once
        # delayed it past a card pulled seconds later: the reader was then never named).
        self.pcscd = Pcscd() if cfg.hsm.pcscd == "internal" else None
        self.cards = CardWatch() if cfg.hsm.pcscd != "none" else None
        if self.cards is not None:
            cards = self.cards
            self.hsm.explain_faults(cards.explain)
            self.hsm.add_listener(lambda state: cards.token_ready() if state.ready else None)
        telemetry.metrics.watch_queue_depth(self.hsm.queue_depth)
        telemetry.metrics.watch("hsm.ready", lambda: 1.0 if self.hsm.state.ready else 0.0)
        telemetry.metrics.watch("tokens.ready", lambda: float(self.hsm.state.tokens_ready))
        telemetry.metrics.watch("tokens.configured", lambda: float(self.hsm.state.tokens))
        telemetry.metrics.watch("hsm.recoveries", lambda: self.hsm.state.recoveries)
        telemetry.metrics.watch("hsm.pin_refused", lambda: 1.0 if self.hsm.state.pin_refused else 0.0)
        telemetry.metrics.watch("hsm.restart_required", lambda: 1.0 if self.hsm.state.restart_required else 0.0)
        telemetry.metrics.watch_each("hsm.token.info", self._token_info)
        self.not_after: dict[str, dt.datetime] = {}  # of the X.509 credentials by label, last read
        self._reread_certificates = False  # set when the operational credential in use changed
        self._credential_in_use: dict[str, tuple[Any, Any]] = {}  # renewal name -> (its label, its notAfter)
        telemetry.metrics.watch_each("certificate.not_after.timestamp", self._not_after_timestamps)
        telemetry.metrics.watch("hsm.queue.limit", lambda: cfg.hsm.queue_limit)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.events: events_mod.Events | None = None
        self.telemetry = telemetry
        self.state_dir = Path(cfg.state_dir)
        self.cloud: CloudConnection | None = None
        if cfg.cloud.enabled:
            self.cloud = CloudConnection(cfg.cloud, self.hsm, self.state_dir, self.load_provider,
                                         lambda: self.hsm.state.token_label or "")
            self.cloud.add_renewal_listener(self._renewal_changed)
        self.service: Service | None = None
        self.listeners: Listeners | None = None
        if cfg.service.enabled:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            audit_path = cfg.service.audit_file or str(self.state_dir / "audit.log")
            deps = Deps(self.hsm, telemetry, self.state_dir, cfg.cloud, self._assigned_hub,
                        cfg.sas.default_ttl, self.load_provider)
            self.service = Service(cfg.service, deps, AuditLog(audit_path, cfg.service.audit_fail_closed))
            audit = self.service.audit
            telemetry.metrics.watch("audit.dropped", lambda: audit.dropped)
            self._roles_checked = False
            self.hsm.add_listener(self._warn_about_reserved_keys)
        telemetry.metrics.watch_each("certificate.renewal.consecutive_failures", self._renewal_failures)
        self.edge_env = detect_edge(os.environ)  # IoT Edge? (raises on a half-configured environment)
        self.edge: EdgeAgent | None = None
        self.exit_code = 0
        self._needs_checked = False
        self.shutdown: Shutdown | None = None  # once stopping: the budget the stop shares
        self._reads = Lane("module-hsm", 2)     # the loop's blocking calls (token reads, TLS setup)
        self._connecting: Worker | None = None

    def _warn_about_reserved_keys(self, state: HsmState) -> None:
        """Once the token is first ready: a warning for each policy rule or signing pattern that
        would have reached a key reserved for another job (on the pool's supervisor thread)."""
        if not state.ready or self._roles_checked or self.service is None:
            return
        self._roles_checked = True
        service = self.service
        try:
            objects = self.hsm.list_objects()
        except HsmError as exc:
            log.warning("could not list the token's keys to check the policy against reserved keys: %s", exc)
            return
        for line in service.roles.warnings(service.cfg.policy, objects):
            log.warning("%s", line)

    def _refuse_unmet_needs(self, state: HsmState, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Once the token is first ready: a configuration whose keys need what the token lacks
        (an HMAC key with no CKM_SHA256_HMAC, an ECDSA TLS key with no ECDSA) is refused in one
        line, and serve stops with the usage exit code (on the pool's supervisor thread)."""
        if not state.ready or self._needs_checked:
            return
        self._needs_checked = True
        try:
            self.hsm.ask_secret_import()
        except HsmError as exc:
            log.debug("could not ask the token whether it stores secret keys: %s", exc)
        caps = self.hsm.capabilities
        if caps is None:
            return
        needs = config_mod.token_needs(self.cfg)
        label = self.cfg.service.tls_key_label if self.cfg.service.enabled else None
        if label:
            try:
                if self.hsm.find(label, "private"):
                    needs.append((f"service.tls_key_label '{label}'",
                                  config_mod.tls_key_needs(self.hsm.key_algorithm(label))))
            except HsmError as exc:
                log.warning("could not read the API's TLS key '%s' to check the token can sign with it: %s",
                            label, exc)
        unmet = [f"{setting}: {why}" for setting, need in needs if (why := caps.missing(need)) is not None]
        if not unmet or self.exit_code:
            return
        log.error("the configuration needs what the token cannot do; %s", "; ".join(dict.fromkeys(unmet)))
        self.exit_code = EXIT_UNSUPPORTED
        loop.call_soon_threadsafe(stop.set)

    def _assigned_hub(self) -> str | None:
        return self.cloud.assigned_hub if self.cloud is not None else None

    def load_provider(self) -> None:
        assert self.cfg.hsm.pin_file
        tls.load_provider(self.cfg.hsm.module, self.cfg.hsm.pin_file, self.state_dir / "openssl")

    def start(self) -> None:
        if self.pcscd is not None:
            self.pcscd.start()  # the HSM's connection attempts retry until pcscd answers
        self.hsm.add_listener(_log_state)
        self.hsm.start(wait=False)
        if self.cloud is not None:
            self._connecting = Worker("cloud-connect", self.cloud.run)  # returns once connected or stopped
            self._connecting.start()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut everything down (bounded: edgeAgent waits 10 s)."""
        loop = asyncio.get_running_loop()
        self.hsm.add_listener(lambda state: self._restart_if_needed(state, loop, stop))
        self.hsm.add_listener(lambda state: self._refuse_unmet_needs(state, loop, stop))
        if self.edge_env is not None and self.cfg.events.enabled:
            self.events = events_mod.Events(self.cfg.events, self.edge_env.device_id, self.edge_env.module_id)
            self.hsm.add_listener(self.events.hsm_state)
            events_mod.install(self.events)
        self.start()
        if self.edge_env is not None:
            self.edge = self._start_edge(asyncio.get_running_loop())
            if self.events is not None:
                self.events.start(self.edge.output_client)
        tasks = [asyncio.create_task(self._watch_certificates(stop))]
        if self.telemetry.pull_reader is not None and self.cfg.metrics.enabled:
            tasks.append(asyncio.create_task(self._start_metrics(stop)))
        elif self.cfg.metrics.enabled:
            log.info("no metrics endpoint: OpenTelemetry is disabled (OTEL_SDK_DISABLED=true)")
        if self.service is not None:
            self.listeners = Listeners(self.service)
            tasks.append(asyncio.create_task(self._start_health(stop)))
        if self.service is not None or isinstance(self.hsm, TokenPair):
            # Noticing a token gone with no request in flight: /readyz with the service; with two
            # tokens also the hub connection moving to the other one's credential.
            tasks.append(asyncio.create_task(probe_forever(self.hsm, stop)))
            tasks.append(asyncio.create_task(self._start_api(stop)))
        await stop.wait()
        await self._stop_all(tasks, Shutdown())

    async def _stop_all(self, tasks: list[asyncio.Task[None]], shutdown: Shutdown) -> None:
        """Every part stopped within one shared budget (edgeAgent kills the module 10 s after
        SIGTERM): each is waited for at most what the ones before it left."""
        self.shutdown = shutdown
        if self.events is not None:
            events_mod.install(None)
            await shutdown.call("events", self.events.stop, cap=1.0)
        if self.edge is not None:
            await shutdown.call("edgeHub client", self.edge.stop, cap=EDGE_STOP_SECONDS)
        for task in tasks:
            task.cancel()
        await shutdown.wait("background tasks", asyncio.gather(*tasks, return_exceptions=True))
        if self.listeners is not None:
            await shutdown.wait("listeners", self.listeners.stop())
        if self.metrics_endpoint is not None:
            await shutdown.wait("metrics endpoint", self.metrics_endpoint.stop())
        if self.service is not None:  # the audit log waits for a stalled disk: not on the loop
            await shutdown.call("service", self.service.close, cap=AUDIT_CLOSE_SECONDS)
        cloud = self.cloud
        if cloud is not None:
            await shutdown.call("hub connection", lambda _: cloud.stop())
        await shutdown.call("HSM pool", self.hsm.close, cap=HSM_CLOSE_SECONDS)
        if self.pcscd is not None:
            await shutdown.call("pcscd", self.pcscd.stop, cap=PCSCD_STOP_SECONDS)

    def _start_edge(self, loop: asyncio.AbstractEventLoop) -> EdgeAgent:
        """The module client for edgeHub: twin configuration, reported state, direct methods."""
        assert self.edge_env is not None
        service = self.service
        apply = None
        if service is not None:
            async def reconfigure(cfg: ServiceConfig, ceiling: tuple[PolicyRule, ...]) -> None:
                service.reconfigure(cfg, ceiling)  # on the loop, between requests

            def apply(cfg: ServiceConfig, ceiling: tuple[PolicyRule, ...]) -> None:
                future = asyncio.run_coroutine_threadsafe(reconfigure(cfg, ceiling), loop)
                try:
                    future.result(5.0)
                except TimeoutError:
                    future.cancel()  # not applied later behind the agent's back
                    raise

        log.info("IoT Edge: %s", self.edge_env.describe())
        cloud = self.cloud if self.cloud is not None and self.cloud.operational else None
        hooks = EdgeHooks(self.hsm, self.cfg, self._reload_config, apply,
                          set_renew_at=cloud.set_renew_at if cloud is not None else None)
        agent = EdgeAgent(self.edge_env, hooks, sdk_options={"sastoken_ttl": self.cfg.edge.sas_ttl})
        if cloud is not None:
            cloud.add_renewal_listener(agent.on_renewal)
        return agent.start()

    def _reload_config(self) -> Config:
        return config_mod.load(None if self.cfg.source == "defaults" else self.cfg.source)

    def labels(self) -> EdgeLabels:
        """The module's identity as edgeHub labels its metrics (the edge runtime's names first)."""
        if self.edge_env is not None:
            return EdgeLabels(self.edge_env.hub_hostname, self.edge_env.device_id, self.edge_env.module_id)
        c = self.cfg.cloud
        return EdgeLabels(self._assigned_hub() or c.hub or "", c.device_id or c.registration_id or "",
                          c.module_id or "")

    async def _start_metrics(self, stop: asyncio.Event) -> None:
        """The Prometheus endpoint, retried while its port is taken."""
        assert self.telemetry.pull_reader is not None
        m = self.cfg.metrics
        endpoint = MetricsEndpoint(registry(self.telemetry.pull_reader, self.labels()), m.host, m.port)
        told = False
        while not stop.is_set():
            try:
                port = await endpoint.start()
            except ListenError as exc:
                told = _port_taken(exc, told)
                await asyncio.sleep(LISTEN_RETRY)
                continue
            self.metrics_endpoint = endpoint
            print(f"spyrus-hsm: metrics on http://{m.host}:{port}/metrics", flush=True)
            return

    async def _watch_certificates(self, stop: asyncio.Event) -> None:
        """Reads the X.509 credentials' expiry when the HSM becomes ready and every ten minutes
        (for the expiry metric and event); off the loop, each HSM call bounded by the pool."""
        due, seen_recoveries = 0.0, -1
        while not stop.is_set():
            state = self.hsm.state
            if state.ready and (loop_time() >= due or state.recoveries != seen_recoveries
                                or self._reread_certificates):
                seen_recoveries, self._reread_certificates = state.recoveries, False
                try:
                    creds = await self._reads.run(lambda: x509_id.credentials(self.hsm), READ_DEADLINE,
                                                  "reading the certificates' expiry")
                except Exception as exc:
                    log.warning("reading the certificates' expiry failed: %s", exc)
                    due = loop_time() + 60
                else:
                    due = loop_time() + CERTIFICATE_CHECK_INTERVAL
                    self._certificates_read([(c.label, c.leaf.not_valid_after_utc) for c in creds])
            await asyncio.sleep(1.0)

    def _certificates_read(self, expiries: list[tuple[str, dt.datetime]]) -> None:
        earliest: dict[str, dt.datetime] = {}  # a label several credentials share: the earliest
        for label, when in expiries:
            earliest[label] = min(when, earliest.get(label, when))
        self.not_after = earliest
        for label, when in expiries:
            events_mod.certificate_expiring(label, when)

    def _renewal_changed(self, label: str, state: dict[str, Any]) -> None:
        """A renewal listener (on the renewal thread): when the credential in use changes (issued,
        or renewed into a new generation), the expiry metric is read again at once rather than at
        the next ten-minute check."""
        in_use = (state.get("label"), state.get("notAfter"))
        if in_use != self._credential_in_use.get(label):
            self._credential_in_use[label] = in_use
            self._reread_certificates = True

    def _renewal_failures(self) -> list[tuple[dict[str, str], float]]:
        renewers = self.cloud.renewers() if self.cloud is not None else []
        return [({"label": name}, renewer.status.failures) for name, renewer in renewers]

    def _token_info(self) -> list[tuple[dict[str, str], float]]:
        """The token logged in to; with two tokens one series each, told apart by `hsm.token`
        (first, second), so that the serial-change alert compares each token with itself."""
        state = self.hsm.state
        if state.members:
            return [({"hsm.token.label": m.token_label or "", "hsm.token.serial": m.token_serial,
                      "hsm.token": which}, 1.0)
                    for m, which in zip(state.members, ("first", "second"), strict=False) if m.token_serial]
        if state.token_serial is None:
            return []
        return [({"hsm.token.label": state.token_label or "", "hsm.token.serial": state.token_serial}, 1.0)]

    def _not_after_timestamps(self) -> list[tuple[dict[str, str], float]]:
        return [({"label": label}, when.timestamp()) for label, when in self.not_after.items()]

    async def _start_health(self, stop: asyncio.Event) -> None:
        """The health listener, retried while its port is taken (see _port_taken)."""
        assert self.listeners is not None
        told = False
        while not stop.is_set():
            try:
                await self.listeners.start_health()
                return
            except ListenError as exc:
                told = _port_taken(exc, told)
            await asyncio.sleep(LISTEN_RETRY)

    async def _start_api(self, stop: asyncio.Event) -> None:
        """The HTTPS listener; with the server key in the HSM it waits for the HSM first. A
        failure is logged once (ERROR, saying what to fix) until it changes, shown by /readyz on
        the health port, and retried."""
        assert self.service is not None and self.listeners is not None
        svc_cfg, listeners = self.service.cfg, self.listeners
        told = False
        last_error: str | None = None
        while not stop.is_set():
            if svc_cfg.tls_key_label and not self.hsm.state.ready:
                await asyncio.sleep(0.5)
                continue
            server_tls: ServerTls | None = None
            try:
                server_tls = await self._reads.run(
                    lambda: ServerTls(svc_cfg, self.hsm, self.state_dir / "tls", self.load_provider),
                    TLS_SETUP_DEADLINE, "setting up the API's TLS credential")
                await listeners.start_api(server_tls)
                collector.pace()
                print(f"spyrus-hsm: API on https://{svc_cfg.host}:{listeners.api_port}", flush=True)
                return
            except ListenError as exc:
                told = _port_taken(exc, told)
            except Exception as exc:  # whatever it is, the module stays up and says so
                error = f"the API cannot start: {exc}"
                listeners.api_start_error = error
                if error != last_error:
                    log.error("%s; retrying every %g s", error, LISTEN_RETRY)
                    if self.edge is not None:
                        self.edge.report_error("api", error)
                else:
                    log.debug("%s; still retrying", error)
                last_error = error
            if server_tls is not None:
                closing = server_tls
                await self._reads.run(closing.close, TLS_SETUP_DEADLINE, "closing a TLS credential not used")
            await asyncio.sleep(LISTEN_RETRY)

    def _restart_if_needed(self, state: HsmState, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """The token changed in a way only a new process can re-read: stop with EXIT_RESTART,
        once per change (the runtime restarts the module; a second exit would only loop)."""
        if state.ready:
            restart_done(self.state_dir)
            return
        if not state.restart_required or self.exit_code:
            return
        if not restart_once(self.state_dir, f"serial {state.token_serial}: {state.last_change}"):
            log.error("HSM: %s; already restarted once for this change, so staying degraded", state.reason)
            return
        log.error("HSM: %s; exiting with code %d so the runtime restarts the module", state.reason, EXIT_RESTART)
        self.exit_code = EXIT_RESTART
        loop.call_soon_threadsafe(stop.set)


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _port_taken(exc: ListenError, told: bool) -> bool:
    """Say once that a listener's port is taken, then retry quietly: the module stays up and
    not ready rather than crash-loop (edgeAgent gives up restarting a module that does), and
    serves as soon as the holder (an old instance still stopping, say) lets go."""
    if told:
        log.debug("%s; still retrying", exc)
    else:
        log.error("%s; retrying every %g s", exc, LISTEN_RETRY)
    return True


def _log_state(state: HsmState) -> None:
    if state.ready:
        log.info("HSM ready: token '%s' (serial %s)", state.token_label, state.token_serial)
    else:
        log.warning("HSM %s: %s", state.status, state.reason)


def _quiet_pkcs11_finalizers(hook: object = sys.unraisablehook, excepthook: object = sys.excepthook) -> None:
    """python-pkcs11's search iterators raise from __del__ after a device fault ("Exception
    ignored in OperationContext.__del__"); after an unplug that is expected, not news.

    Cython prints such an exception twice: its whole traceback first, through sys.excepthook
    (no "Exception ignored" header), then through the unraisable hook. Only a traceback made of
    python-pkcs11's own frames is dropped from the first; a crash through our code still shows."""

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        if "pkcs11" in repr(info.object) or "pkcs11" in type(info.exc_value).__module__:
            log.debug("ignored in a python-pkcs11 finalizer: %r", info.exc_value)
            return
        hook(info)  # type: ignore[operator]

    def uncaught(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        frames = traceback.extract_tb(tb)
        if kind.__module__.startswith("pkcs11") and frames and all(f.filename.endswith(".pyx") for f in frames):
            log.debug("printed by a python-pkcs11 finalizer: %r", value)
            return
        excepthook(kind, value, tb)  # type: ignore[operator]

    sys.unraisablehook = unraisable
    sys.excepthook = uncaught


def serve(cfg: Config, telemetry: Telemetry) -> int:
    _quiet_pkcs11_finalizers()
    module = Module(cfg, telemetry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, signum, stop)
        print("spyrus-hsm: serving; SIGTERM stops", flush=True)
        await module.run(stop)

    asyncio.run(main())
    telemetry.shutdown(deadline=module.shutdown.remaining(2.0) if module.shutdown else 2.0)
    left = threads.close_all(module.shutdown.remaining(1.0) if module.shutdown else 1.0)
    if left:  # daemon threads: they do not hold up the exit, but say what was cut off
        log.warning("stopped; abandoned at exit: %s", "; ".join(left))
    log.info("stopped; threads alive: %s", ", ".join(sorted(t.name for t in threading.enumerate())))
    return module.exit_code


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    log.info("signal %d: stopping", signum)
    stop.set()
