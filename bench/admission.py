"""Handshake admission under attack: a leaf's TLS handshake latency while one address holds a
thousand connections that will never finish a handshake, against the same leaf with nobody
else connected, both measured in this run.

The real service (file TLS key, SoftHSM2 token, settings as shipped: 16 handshake slots,
tls_per_source 32, a 10 s handshake timeout) listens on 127.0.0.1. A leaf in a child process,
bound to 127.0.0.3, makes --handshakes sequential connections, each a TCP connect and a full
TLS handshake (then closed), and reports their latencies. Three cases, in interleaved rounds:

  baseline:  nobody else connected;
  held:      another child, from 127.0.0.2, opens 500 idle connections (nothing sent) and 500
             stalled ones (the first 20 bytes of a ClientHello, a record cut short), then holds
             them while the leaf measures;
  reopening: the same, but every connection the service closes is opened again at once, so
             the service keeps accepting and refusing the address's connections while the
             leaf measures.

It prints p50/p99 per case (median over rounds), the ratios attacked/baseline and whether the
p99 delay (attacked minus baseline) is at most 100 ms, and how many of the attacker's
connections the service refused.

Run: make bench   (or .venv/bin/python bench/admission.py --rounds 1 --handshakes 100)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import select
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api_throughput import HOST, service_config, start_service, write_pki
from common import SOFTHSM, child_json, make_token, start_hsm

ATTACKER = "127.0.0.2"
LEAF = "127.0.0.3"
IDLE = STALLED = 500
DELAY_TARGET_MS = 100.0


# --- the leaf (child process) ------------------------------------------------------------------

def leaf(port: int, ca: str, count: int) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=ca)
    latencies = []
    failures = 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            raw = socket.socket()
            raw.settimeout(30)
            raw.bind((LEAF, 0))
            raw.connect((HOST, port))
            with ctx.wrap_socket(raw, server_hostname=HOST):
                latencies.append(time.perf_counter() - started)
        except OSError:
            failures += 1
    return {"latencies": latencies, "failures": failures}


# --- the attacker (child process) --------------------------------------------------------------

def hello_prefix(ca: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context(cafile=ca).wrap_bio(incoming, outgoing, server_hostname=HOST)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()[:20]


def attacker(port: int, ca: str, reopen: bool) -> None:
    """Opens IDLE + STALLED connections, prints "ready", then holds them (reopening the closed
    ones with `reopen`) until its standard input closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    prefix = hello_prefix(ca)

    def open_one(stalled: bool) -> socket.socket | None:
        s = socket.socket()
        s.bind((ATTACKER, 0))
        try:
            s.connect((HOST, port))
            if stalled:
                s.sendall(prefix)
        except OSError:  # refused at once
            s.close()
            return None
        s.setblocking(False)
        return s

    held: dict[socket.socket, bool] = {}
    opened = 0
    for i in range(IDLE + STALLED):
        s = open_one(i % 2 == 1)
        opened += 1
        if s is not None:
            held[s] = i % 2 == 1
    print("ready", flush=True)
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    for s in held:
        poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    by_fd = {s.fileno(): s for s in held}
    missing = IDLE + STALLED - len(held)
    while True:
        events = poller.poll(50 if reopen and missing else None)
        if any(fd == sys.stdin.fileno() for fd, _ in events):
            break
        for fd, _ in events:
            s = by_fd.pop(fd)
            poller.unregister(fd)
            held.pop(s)
            s.close()
            missing += 1
        while reopen and missing:
            stalled = missing % 2 == 1
            opened += 1
            s = open_one(stalled)
            if s is None:
                break  # refused: try again at the next turn
            missing -= 1
            held[s] = stalled
            by_fd[s.fileno()] = s
            poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    print(json.dumps({"opened": opened, "held": len(held)}), flush=True)


# --- the measurement ---------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(port: int, ca: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = await child_json(__file__, "--leaf", str(port), "--ca", str(ca), "--handshakes", str(args.handshakes))
    lat = [x * 1000 for x in result["latencies"]]
    return {"p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "failures": result["failures"]}


async def attacked(port: int, ca: Path, args: argparse.Namespace, reopen: bool) -> dict[str, Any]:
    argv = ["--attacker", str(port), "--ca", str(ca)] + (["--reopen"] if reopen else [])
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, *argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    line = await proc.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"the attacker did not start: {line!r}")
    try:
        row = await measure(port, ca, args)
    finally:
        proc.stdin.close()
        out = await proc.stdout.read()
        await proc.wait()
    row.update(json.loads(out.decode().strip().splitlines()[-1]))
    return row


async def main_async(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="spyrus-admissionbench-"))
    pin = make_token(root)
    hsm = start_hsm(SOFTHSM, pin)
    cert, key, ca = write_pki(root)
    bearer = secrets.token_urlsafe(24)
    listeners, port = await start_service(hsm, service_config(cert, key, bearer, root / "audit.log"), root,
                                          telemetry_off=True)
    listener = listeners.api_listener
    cfg = listeners.service.cfg
    print(f"service: {cfg.tls_handshakes} handshake slots, tls_per_source {cfg.tls_per_source}, "
          f"timeout {cfg.tls_handshake_timeout:g} s; attacker {ATTACKER}: {IDLE} idle + {STALLED} stalled; "
          f"leaf {LEAF}: {args.handshakes} sequential handshakes x {args.rounds} rounds")
    rows: dict[str, list[dict[str, Any]]] = {"baseline": [], "held": [], "reopening": []}
    refused: dict[str, int] = {"held": 0, "reopening": 0}
    for _ in range(args.rounds):
        rows["baseline"].append(await measure(port, ca, args))
        for case in ("held", "reopening"):
            before = listener.refused["per-source"]
            rows[case].append(await attacked(port, ca, args, reopen=case == "reopening"))
            refused[case] += listener.refused["per-source"] - before
            # the attacker's connections are gone before the next case
            while listener.waiting(ATTACKER):
                await asyncio.sleep(0.05)
    await listeners.stop()
    listeners.service.close()
    hsm.close()
    med = {case: {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms")}
           for case, runs in rows.items()}
    base = med["baseline"]
    print(f"{'case':<10} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>7} {'p99 x':>7} {'p99 delay ms':>13} {'failed':>7}")
    for case, m in med.items():
        failed = sum(r["failures"] for r in rows[case])
        delay = m["p99_ms"] - base["p99_ms"]
        print(f"{case:<10} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['p50_ms'] / base['p50_ms']:7.2f} "
              f"{m['p99_ms'] / base['p99_ms']:7.2f} {delay:13.2f} {failed:7d}")
    for case in ("held", "reopening"):
        delay = med[case]["p99_ms"] - base["p99_ms"]
        opened = sum(r["opened"] for r in rows[case])
        verdict = "met" if delay <= DELAY_TARGET_MS else "NOT met"
        print(f"{case}: p99 delay {delay:.1f} ms <= {DELAY_TARGET_MS:g} ms: {verdict} "
              f"(attacker opened {opened} connections, the service refused {refused[case]} at once)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=200, help="sequential handshakes of the leaf per case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--leaf", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--attacker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reopen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leaf:
        print(json.dumps(leaf(args.leaf, args.ca, args.handshakes)))
        return 0
    if args.attacker:
        attacker(args.attacker, args.ca, args.reopen)
        return 0
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
