"""The long-running module (`spyrus-hsm serve`): HSM pool, OpenSSL provider, Azure identity.

Starts even when the HSM is missing or the PIN is wrong: it reports not-ready and recovers
when fixed rather than crash-looping (edgeAgent stops restarting a module that does). Stops
cleanly on SIGTERM/SIGINT with exit code 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .cloud.dps import DpsRequest, Provisioner
from .cloud.hub import HubClient, HubIdentity
from .config import Config
from .hsm import Hsm, HsmState, read_secret_file
from .identity import tls
from .identity import x509 as x509_id

log = logging.getLogger("spyrus_hsm")


class Module:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        pin_file = cfg.hsm.pin_file
        if not pin_file:
            raise ValueError("serve needs hsm.pin_file (or SPYRUS_HSM_PIN_FILE)")
        self.hsm = Hsm(cfg.hsm.pool_settings(), lambda: read_secret_file(pin_file))
        self.hub: HubClient | None = None
        self.stopping = threading.Event()
        self.state_dir = Path(cfg.state_dir)

    def load_provider(self) -> None:
        assert self.cfg.hsm.pin_file
        tls.load_provider(self.cfg.hsm.module, self.cfg.hsm.pin_file, self.state_dir / "openssl")

    def start(self) -> None:
        self.hsm.pool.add_listener(_log_state)
        self.hsm.start(wait=False)
        if self.cfg.cloud.enabled:
            threading.Thread(target=self._connect_cloud, name="cloud-connect", daemon=True).start()

    def _connect_cloud(self) -> None:
        """Waits for the HSM, registers (or reuses the registration) and connects to the hub."""
        c = self.cfg.cloud
        ca_pem = Path(c.server_ca_file).read_text() if c.server_ca_file else None
        while not self.stopping.is_set():
            if not self.hsm.state.ready:
                self.stopping.wait(0.5)
                continue
            try:
                if c.attestation == "x509":
                    self.load_provider()
                hub, device_id = c.hub, c.device_id
                if c.id_scope and c.registration_id:
                    a = Provisioner(self.hsm, self.state_dir, self.load_provider).register(DpsRequest(
                        c.id_scope, c.registration_id, c.provisioning_host,
                        "x509" if c.attestation == "x509" else "symmetricKey", c.key, group=c.group,
                        server_ca_pem=ca_pem), timeout=c.registration_timeout)
                    hub, device_id = a.assigned_hub, a.device_id
                    key = a.key
                else:
                    key = c.key
                assert hub and device_id and key
                files = None
                if c.attestation == "x509":
                    cred = x509_id.select(self.hsm, label=key)
                    files = x509_id.write_tls_files(cred, self.hsm.state.token_label or "", self.state_dir / "tls")
                identity = HubIdentity(hub, device_id, c.module_id, sas_key=None if files else key,
                                       x509=files, server_ca_pem=ca_pem)
                self.hub = HubClient(self.hsm, identity, sas_ttl=c.sas_ttl).connect()
                log.info("connected to IoT Hub %s as %s", hub, device_id)
                return
            except Exception as exc:
                log.warning("cloud connection failed: %s; retrying in 10 s", exc)
                self.stopping.wait(10)

    def stop(self) -> None:
        self.stopping.set()
        if self.hub is not None:
            self.hub.shutdown()
        self.hsm.close()


def _log_state(state: HsmState) -> None:
    if state.ready:
        log.info("HSM ready: token '%s' (serial %s)", state.token_label, state.token_serial)
    else:
        log.warning("HSM %s: %s", state.status, state.reason)


def _quiet_pkcs11_finalizers(hook: object = sys.unraisablehook) -> None:
    """python-pkcs11's search iterators raise from __del__ after a device fault ("Exception
    ignored in OperationContext.__del__"); after an unplug that is expected, not news."""

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        if "pkcs11" in repr(info.object) or "pkcs11" in type(info.exc_value).__module__:
            log.debug("ignored in a python-pkcs11 finalizer: %r", info.exc_value)
            return
        hook(info)  # type: ignore[operator]

    sys.unraisablehook = unraisable


def serve(cfg: Config) -> int:
    _quiet_pkcs11_finalizers()
    module = Module(cfg)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    module.start()
    print("spyrus-hsm: serving; SIGTERM stops", flush=True)
    while not done.wait(0.5):
        pass
    module.stop()
    log.info("stopped")
    return 0
