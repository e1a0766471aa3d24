"""A tpm2-pkcs11 token over a software TPM, made for one test run in a temporary directory.

tpm2-pkcs11 keeps its objects in a SQLite store (TPM2_PKCS11_STORE) and its keys under a
primary key of a TPM, which it reaches through a TCTI (TPM2_PKCS11_TCTI). The TPM here is
`swtpm` listening on a loopback address of the test session; between the two sits the access
broker and resource manager `tpm2-abrmd` (without it tpm2-pkcs11 soon runs out of TPM object
contexts), which is reached over D-Bus, so the rig runs a private session bus of its own too:

    tpm2-pkcs11 (in every test process) --tabrmd TCTI--> D-Bus --> tpm2-abrmd --> swtpm (TCP)

Tokens are made with `tpm2_ptool init` / `tpm2_ptool addtoken` (tpm2-pkcs11 has no
C_InitToken). `env` holds the variables every process that loads the module needs; `stop()`
ends what `start()` started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from waiting import wait_for

PACKAGE = "libtpm2-pkcs11-1"
DEBIAN_PACKAGES = "swtpm swtpm-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools tpm2-abrmd dbus"
ABRMD_NAME = "com.intel.tss2.Tabrmd"
MAX_TRANSIENTS = MAX_CONNECTIONS = 100  # tpm2-abrmd's largest values
START_WITHIN = 30.0  # seconds, for each daemon to answer: generous on a loaded machine


class RigError(RuntimeError):
    pass


def module_path() -> str:
    """The PKCS#11 module of tpm2-pkcs11, as its Debian package installed it (the multiarch
    directory differs between amd64 and arm64, so ask dpkg rather than guess)."""
    try:
        listing = subprocess.run(["dpkg-query", "-L", PACKAGE], capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise RigError(f"{PACKAGE} is not installed; run 'make deps' ({DEBIAN_PACKAGES})") from e
    for path in listing:
        if path.endswith("/pkcs11/libtpm2_pkcs11.so") and os.path.exists(path):
            return path
    raise RigError(f"{PACKAGE} lists no pkcs11/libtpm2_pkcs11.so; reinstall it")


def _missing_tools() -> list[str]:
    return [t for t in ("swtpm", "dbus-daemon", "dbus-send", "tpm2-abrmd", "tpm2_ptool")
            if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class TpmRig:
    """swtpm + a private D-Bus session bus + tpm2-abrmd, all under `root`."""

    def __init__(self, root: Path, host: str, port: int, ctrl_port: int) -> None:
        self.root = root
        self.host, self.port, self.ctrl_port = host, port, ctrl_port
        self.store = root / "store"
        self.module = module_path()
        self.env: dict[str, str] = {}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._dbus_pid: int | None = None

    def _log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self._log(name), "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        self._procs.append((name, proc))
        return proc

    def _alive(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            raise RigError(f"{name} exited with {proc.returncode}: {self._log(name).read_text()[-2000:]}")

    def start(self) -> TpmRig:
        missing = _missing_tools()
        if missing:
            raise RigError(f"missing {' '.join(missing)}; run 'make deps' ({DEBIAN_PACKAGES})")
        (self.root / "tpmstate").mkdir(parents=True)
        self.store.mkdir()
        swtpm = self._spawn("swtpm", [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={self.port},bindaddr={self.host}",
            "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self.root / 'tpmstate'}"])
        wait_for(lambda: _listens(self.host, self.port), START_WITHIN, "swtpm listening",
                 every=0.05, alive=lambda: self._alive("swtpm", swtpm))

        # A bus of the rig's own (never the machine's): its socket lives in the rig's directory.
        out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1",
                              f"--address=unix:path={self.root / 'bus'}"],
                             capture_output=True, text=True, timeout=START_WITHIN, check=False)
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) < 2:
            raise RigError(f"dbus-daemon did not start ({out.returncode}): {out.stderr}")
        address, self._dbus_pid = lines[0], int(lines[1])

        tcti = "tabrmd:bus_type=session"
        self.env = {"DBUS_SESSION_BUS_ADDRESS": address, "TPM2_PKCS11_STORE": str(self.store),
                    "TPM2_PKCS11_TCTI": tcti, "TPM2TOOLS_TCTI": tcti}
        env = {**os.environ, **self.env}
        # tpm2-pkcs11 keeps every key it used loaded for as long as its process runs, and abrmd
        # allows each client 27 loaded objects unless told otherwise (100 at most): one test
        # process uses more than 27 keys.
        abrmd = self._spawn("tpm2-abrmd", [
            _tool("tpm2-abrmd"), "--session", "--allow-root",
            f"--max-transients={MAX_TRANSIENTS}", f"--max-connections={MAX_CONNECTIONS}",
            f"--tcti=swtpm:host={self.host},port={self.port}"], env=env)
        wait_for(self._abrmd_on_the_bus, START_WITHIN, "tpm2-abrmd on the rig's bus", every=0.05,
                 alive=lambda: self._alive("tpm2-abrmd", abrmd))
        self._ptool("init")
        return self

    def _abrmd_on_the_bus(self) -> bool:
        out = subprocess.run(
            ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus.NameHasOwner", f"string:{ABRMD_NAME}"],
            capture_output=True, text=True, env={**os.environ, **self.env}, timeout=10, check=False)
        return "boolean true" in out.stdout

    def _ptool(self, *args: str) -> str:
        out = subprocess.run(["tpm2_ptool", *args], capture_output=True, text=True,
                             env={**os.environ, **self.env}, timeout=120, check=False)
        if out.returncode != 0:
            raise RigError(f"tpm2_ptool {args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def add_token(self, label: str, user_pin: str, so_pin: str) -> None:
        """A token named `label` under the store's first primary key (made by `init`)."""
        self._ptool("addtoken", "--pid=1", f"--label={label}", f"--userpin={user_pin}", f"--sopin={so_pin}")

    def stop(self) -> None:
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self._dbus_pid is not None:
            try:
                os.kill(self._dbus_pid, 15)
            except ProcessLookupError:
                pass
            self._dbus_pid = None
