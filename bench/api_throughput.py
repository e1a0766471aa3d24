"""HTTP API throughput: /v1/sas-tokens against a minimal aiohttp handler, and the slow-USB case.

A load generator in a separate process (this file with --load) drives, for the same duration,
with the same TLS setup, keep-alive connections and request shape:

  a. baseline: a minimal aiohttp JSON handler (reads the body, answers a fixed JSON object);
  b. miss:     the real service, /v1/sas-tokens, every request a new device (one HSM signature
               per request; bearer auth, policy, audit log, telemetry spans on as in `serve`);
  c. hit:      the real service, the same device again and again (served from the token cache).

It prints requests/s, p50/p99 latency and the ratios b/a, c/a (targets: >= 0.6, >= 0.85) —
all measured in this run (shared machines are noisy; absolute numbers do not compare).

Then, in a child process whose PKCS#11 module is tests/p11shim adding 20 ms to each signature:
200 leaves x 10 requests each for their own token must cause at most 200 HSM signatures, and
the service's event loop must never lag 20 ms or more.

Run: make bench   (or .venv/bin/python bench/api_throughput.py --seconds 5)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SHIM, SOFTHSM, make_token, start_hsm, tick_lag

HOST = "127.0.0.1"
BENCH_KEY = "bench-key"


# --- the load generator (separate process) ----------------------------------------------------

async def _load(url: str, ca: str, bearer: str, mode: str, seconds: float, concurrency: int,
                leaves: int, per_leaf: int) -> dict[str, Any]:
    import aiohttp

    ctx = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": f"Bearer {bearer}"}
    latencies: list[float] = []
    errors: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def post(device: str) -> None:
            t = time.perf_counter()
            async with session.post(url, json={"deviceId": device, "ttlSeconds": 3600}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors[resp.status] = errors.get(resp.status, 0) + 1
            latencies.append(time.perf_counter() - t)

        async def worker(n: int, stop: float) -> None:
            i = 0
            while time.perf_counter() < stop:
                await post(f"miss-{n}-{i}" if mode == "miss" else "hit-device")
                i += 1

        async def leaf(n: int) -> None:
            for _ in range(per_leaf):
                await post(f"leaf-{n}")

        if mode != "leaves":  # warm-up: connections, and the cached token for mode "hit"
            await post("hit-device")
            latencies.clear()
        started = time.perf_counter()
        if mode == "leaves":
            await asyncio.gather(*(leaf(n) for n in range(leaves)))
        else:
            stop = started + seconds
            await asyncio.gather(*(worker(n, stop) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": q[49] * 1e3,
            "p99_ms": q[98] * 1e3, "errors": errors}


async def run_load(url: str, ca: Path, bearer_file: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load", url, "--ca", str(ca), "--bearer-file", str(bearer_file),
        "--mode", mode, "--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
        "--leaves", str(args.leaves), "--per-leaf", str(args.per_leaf), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# --- the servers under test -------------------------------------------------------------------

def write_pki(root: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = root / "server.pem", root / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return cert_file, key_file, cert_file  # self-signed: the certificate is its own CA


def service_config(cert: Path, key: Path, bearer: str, audit: Path) -> Any:
    from spyrus_hsm.config import service_section

    return service_section({
        "host": HOST, "port": 0, "health_port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key),
        "bearer_tokens": {"bench": hashlib.sha256(bearer.encode()).hexdigest()},
        "policy": [{"principals": ["bench"], "operations": ["sas-token"], "devices": ["*"]}],
        "sas_key": BENCH_KEY, "hub": "hub.example", "rate_limit_per_second": 0, "audit_file": str(audit),
    }, "bench")


async def start_service(hsm: Any, cfg: Any, root: Path, telemetry_off: bool = False) -> tuple[Any, int]:
    from spyrus_hsm.config import CloudConfig
    from spyrus_hsm.service.audit import AuditLog
    from spyrus_hsm.service.core import Deps, Service
    from spyrus_hsm.service.server import Listeners, ServerTls
    from spyrus_hsm.telemetry import disabled, hsm_instrument, setup

    # Default: as `serve` does with the OTEL_* variables of the bench's environment (none: spans
    # made but not exported).
    telemetry = disabled() if telemetry_off else setup("spyrus-hsm-bench")
    hsm.instrument(hsm_instrument(telemetry))
    deps = Deps(hsm, telemetry, root / "state", CloudConfig(), lambda: None, 3600, None)
    listeners = Listeners(Service(cfg, deps, AuditLog(cfg.audit_file, True)))
    await listeners.start_api(await asyncio.to_thread(ServerTls, cfg, hsm, root / "tls"))
    assert listeners.api_port
    return listeners, listeners.api_port


async def start_baseline(cert: Path, key: Path) -> tuple[Any, int]:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response({"token": "x" * 140, "resourceUri": "hub.example/devices/d", "expiresOn": 0})

    app = web.Application()
    app.router.add_post("/v1/sas-tokens", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    site = web.TCPSite(runner, HOST, 0, ssl_context=ctx)
    await site.start()
    return runner, runner.addresses[0][1]


# --- the two measurements ---------------------------------------------------------------------

async def throughput(args: argparse.Namespace, root: Path) -> None:
    from spyrus_hsm.hsm import Secret

    pin = make_token(root)
    hsm = start_hsm(SOFTHSM, pin)
    await asyncio.to_thread(hsm.import_secret_key, BENCH_KEY, Secret(secrets.token_bytes(32)))
    cert, key, ca = write_pki(root)
    bearer = secrets.token_urlsafe(24)
    bearer_file = root / "bearer"
    bearer_file.write_text(bearer)
    os.chmod(bearer_file, 0o600)
    baseline, base_port = await start_baseline(cert, key)
    listeners, port = await start_service(hsm, service_config(cert, key, bearer, root / "audit.log"), root)
    quiet, quiet_port = await start_service(hsm, service_config(cert, key, bearer, root / "audit2.log"), root,
                                            telemetry_off=True)
    rows: dict[str, list[dict[str, Any]]] = {"a. baseline": [], "b. miss": [], "c. hit": [], "c'. hit, no otel": []}
    for _ in range(args.rounds):  # interleaved rounds, median: drift on a shared machine hits all three
        rows["a. baseline"].append(await run_load(f"https://{HOST}:{base_port}/v1/sas-tokens", ca, bearer_file,
                                                  "hit", args))
        rows["b. miss"].append(await run_load(f"https://{HOST}:{port}/v1/sas-tokens", ca, bearer_file, "miss", args))
        rows["c. hit"].append(await run_load(f"https://{HOST}:{port}/v1/sas-tokens", ca, bearer_file, "hit", args))
        rows["c'. hit, no otel"].append(await run_load(f"https://{HOST}:{quiet_port}/v1/sas-tokens", ca, bearer_file,
                                                        "hit", args))
    await listeners.stop()
    await quiet.stop()
    await baseline.cleanup()
    hsm.close()
    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
           for name, runs in rows.items()}
    errors = {name: sum(sum(r["errors"].values()) for r in runs) for name, runs in rows.items()}
    print(f"POST /v1/sas-tokens, {args.concurrency} keep-alive connections, {args.seconds:g} s x {args.rounds} "
          "rounds (median), load generator in its own process")
    print(f"{'':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, m in med.items():
        print(f"{name:<18} {m['rps']:>8.0f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {errors[name]:>7}")
    a = med["a. baseline"]["rps"]
    for name, target in (("b. miss", 0.6), ("c. hit", 0.85)):
        ratio = med[name]["rps"] / a
        print(f"{name[0]}/a = {ratio:.2f}  target >= {target}  {'met' if ratio >= target else 'MISSED'}")
    no_otel = med["c'. hit, no otel"]["rps"] / a
    print(f"(without telemetry c'/a = {no_otel:.2f}: the difference is the cost of spans and metrics)")


async def slow_usb(args: argparse.Namespace, pin: Path, root: Path) -> dict[str, Any]:
    """In the child process: the service on the shim, 200 leaves x 10 requests."""
    Path(os.environ["P11SHIM_CONTROL"]).write_text(f"state=plugged\nsign_delay_ms={args.slow_usb_ms}\n")
    hsm = start_hsm(str(SHIM), pin)
    cert, key, ca = root / "server.pem", root / "server.key", root / "server.pem"
    bearer = (root / "bearer").read_text()
    cfg = service_config(cert, key, bearer, root / "audit-slow.log")
    listeners, port = await start_service(hsm, cfg, root)
    signatures = 0
    instrument: Any = None

    def counting(fn: Any, operation: str, label: str | None, mechanism: str | None) -> Any:
        nonlocal signatures
        if operation == "sign":
            signatures += 1
        return instrument(fn, operation, label, mechanism)

    instrument = hsm.instrument(counting)
    idle = await tick_lag(1.0)
    lag_task = asyncio.create_task(tick_lag(3600))
    load = asyncio.create_task(run_load(f"https://{HOST}:{port}/v1/sas-tokens", ca, root / "bearer", "leaves", args))
    lags: list[float] = []
    while not load.done():  # sample the lag only while the load runs
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)
    lag_task.cancel()
    result = await load
    await listeners.stop()
    hsm.close()
    return {**result, "signatures": signatures, "idle_worst_ms": max(idle) * 1e3,
            "load_worst_ms": max(lags) * 1e3, "load_p99_ms": statistics.quantiles(lags, n=100)[98] * 1e3}


async def slow_usb_parent(args: argparse.Namespace, root: Path) -> int:
    """The token, key, certificate and bearer made by `throughput` are reused."""
    if not SHIM.exists():
        print(f"slow USB: skipped ({SHIM} not built; run 'make shim')")
        return 0
    env = dict(os.environ, P11SHIM_TARGET=SOFTHSM, P11SHIM_CONTROL=str(root / "shim.control"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--slow-child", str(root), "--slow-usb-ms", str(args.slow_usb_ms),
        "--leaves", str(args.leaves), "--per-leaf", str(args.per_leaf), "--concurrency", str(args.concurrency),
        env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    s = json.loads(out.decode().strip().splitlines()[-1])
    n = args.leaves * args.per_leaf
    print(f"slow USB ({args.slow_usb_ms} ms per signature): {args.leaves} leaves x {args.per_leaf} requests = {n}, "
          f"{args.concurrency} connections")
    print(f"  HSM signatures: {s['signatures']} for {s['requests']} requests ({sum(s['errors'].values())} errors)  "
          f"target <= {args.leaves}  {'met' if s['signatures'] <= args.leaves else 'MISSED'}")
    print(f"  event-loop worst lag: {s['load_worst_ms']:.2f} ms under load vs {s['idle_worst_ms']:.2f} ms idle "
          f"(p99 {s['load_p99_ms']:.2f} ms)  target < 20 ms  {'met' if s['load_worst_ms'] < 20 else 'MISSED'}")
    print(f"  {s['rps']:.0f} req/s, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each load run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    ap.add_argument("--leaves", type=int, default=200)
    ap.add_argument("--per-leaf", type=int, default=10)
    ap.add_argument("--slow-usb-ms", type=int, default=20)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--bearer-file", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--slow-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        bearer = Path(args.bearer_file).read_text().strip()
        print(json.dumps(asyncio.run(_load(args.load, args.ca, bearer, args.mode, args.seconds, args.concurrency,
                                           args.leaves, args.per_leaf))))
        return 0
    if args.slow_child:
        root = Path(args.slow_child)
        os.environ["SOFTHSM2_CONF"] = str(root / "softhsm2.conf")
        print(json.dumps(asyncio.run(slow_usb(args, root / "user.pin", root))))
        return 0
    root = Path(tempfile.mkdtemp(prefix="spyrus-apibench-"))
    asyncio.run(throughput(args, root))
    return asyncio.run(slow_usb_parent(args, root))


if __name__ == "__main__":
    sys.exit(main())
