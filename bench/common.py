"""Shared by the benchmarks: a throw-away SoftHSM2 token, an HSM pool on it, event-loop lag, a
process's open fds by kind.

The PIN goes to child processes in a file (mode 0600), never on a command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
SHIM = ROOT / ".build" / "libp11shim.so"
LABEL = "bench"


def make_token(root: Path) -> Path:
    """Create the bench token under `root`; returns the PIN file."""
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    from spyrus_hsm.hsm import Secret
    from spyrus_hsm.hsm.provision import init_token

    pin_file = root / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("bench-" + secrets.token_hex(4))
    init_token(SOFTHSM, LABEL, Secret(b"so-" + secrets.token_hex(4).encode()), Secret(pin_file.read_bytes()))
    return pin_file


def make_second_token(root: Path, label: str) -> Path:
    """A second token `label` beside make_token's (same token directory); returns its PIN file."""
    from spyrus_hsm.hsm import Secret
    from spyrus_hsm.hsm.provision import init_token

    pin_file = root / f"user-{label}.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("bench-" + secrets.token_hex(4))
    init_token(SOFTHSM, label, Secret(b"so-" + secrets.token_hex(4).encode()), Secret(pin_file.read_bytes()))
    return pin_file


def start_hsm(module: str, pin_file: Path, workers: int = 4, serial: bool = False, label: str = LABEL) -> Any:
    from spyrus_hsm.hsm import Hsm, PoolSettings, TokenSelector, read_secret_file

    settings = PoolSettings(module, TokenSelector(label), workers=workers, serial=serial)
    return Hsm(settings, lambda: read_secret_file(str(pin_file))).start(wait=True)


async def tick_lag(duration: float, tick: float = 0.001) -> list[float]:
    """How late each `sleep(tick)` wakes up, over `duration` seconds."""
    lags = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        t = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append(time.perf_counter() - t - tick)
    return lags


async def child_json(script: str, *args: str) -> dict[str, Any]:
    """Run `script` in a child Python (a load generator); its last line of output is a JSON object."""
    proc = await asyncio.create_subprocess_exec(sys.executable, script, *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {args[0] if args else ''} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _sockets(pid: int) -> dict[str, tuple[str, str, str, str]]:
    """Socket inode -> (protocol, state, local address, peer address), from the process's view
    of /proc/net; a Unix socket as ("unix", "", its path, "")."""
    found: dict[str, tuple[str, str, str, str]] = {}
    states = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listening"}

    def addr(hexed: str) -> str:
        ip, port = hexed.split(":")
        host = ".".join(str(b) for b in reversed(bytes.fromhex(ip))) if len(ip) == 8 else f"[{ip}]"
        return f"{host}:{int(port, 16)}"

    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
                f = line.split()
                found[f[9]] = (proto, states.get(f[3], "state " + f[3]), addr(f[1]), addr(f[2]))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            found[f[6]] = ("unix", "", f[7] if len(f) > 7 else "(unnamed)", "")
    return found


def fd_kinds(pid: int) -> dict[str, int]:
    """The open fds of a process, counted by kind: a TCP socket by its state and peer (its own
    address when it listens; "pair within the process" when both ends are the process's), a Unix
    socket by its path, a pipe, an anonymous inode ([eventfd], [eventpoll], ...), a file by its path."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = _sockets(pid)
    own = [sockets.get(t[8:-1]) for t in targets if t.startswith("socket:[")]
    own_local = {s[2] for s in own if s is not None and s[0].startswith("tcp")}
    kinds: dict[str, int] = {}
    for target in targets:
        if target.startswith("socket:["):
            sock = sockets.get(target[8:-1])
            if sock is None:
                kind = "socket (other)"
            elif sock[0] == "unix":
                kind = f"unix {sock[2]}"
            elif sock[1] == "listening":
                kind = f"{sock[0]} listening {sock[2]}"
            elif sock[3] in own_local:
                kind = f"{sock[0]} {sock[1]} pair within the process ({sock[2].rsplit(':', 1)[0]})"
            else:
                kind = f"{sock[0]} {sock[1]} to {sock[3]}"
        elif target.startswith("pipe:"):
            kind = "pipe"
        else:
            kind = target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
