"""HTTP API cost: /v1/sas-tokens against a minimal aiohttp handler, and a slow serial USB token.

A load generator in a separate process (this file with --load) drives, for the same duration,
with the same TLS setup, keep-alive connections and request shape:

  a. baseline: a minimal aiohttp JSON handler (reads the body, answers a fixed JSON object);
  b. miss:     the real service, /v1/sas-tokens, every request a new device (one HSM signature
               per request; bearer auth, policy, audit log, telemetry spans on as in `serve`);
  c. hit:      the real service, the same device again and again (served from the token cache).

It prints requests/s, p50/p99 latency and the ratios b/a, c/a (targets: >= 0.6, >= 0.85) —
all measured in this run (shared machines are noisy; absolute numbers do not compare).

Then, in a child process whose PKCS#11 module is tests/p11shim as a USB token (serial=1: one
signature at a time, 20 ms each) and the service with hsm.serial: true:

  hit:      2000 known leaves asking again and again for their long-lived tokens (pure cache
            hits): the reference for the rollover case;
  storm:    2000 new leaves arriving within 1 s: every leaf has its token within
            1.1 x 2000 x 20 ms; nothing fails but 503 with Retry-After, and a leaf that waits
            as told gets its token; the event loop never lags 20 ms or more;
  rollover: the storm's leaves keep asking for --rollover-seconds (60) with a TTL short enough
            that every token passes its reuse point during the run: the p99 latency of these
            returning leaves is at most 3 x the hit case's (they never wait for the HSM), and
            the HSM signs at most 5 % more tokens than the leaves needed.

Two tokens (docs/two-tokens.md), in another child process on two such tokens (the shim slows
each token's slot on its own): the storm on one token (this run's baseline), on two (a
TokenPair: target <= 1.1 x 2000 x 20 ms / 2, about half the one-token time), and on two with the
first unplugged a quarter of the way through (every leaf served; the time and the window of
503s printed, target <= 1 s).

And in a third process (SoftHSM directly, no HTTP: 100,000 requests through Service.sas_token),
the memory case: RSS growth per cached token (target <= 2 KB) once the cache holds
service.cache_max_entries tokens, RSS after 100,000 distinct leaves (the bound evicting), and
after the cache is cleared.

Run: make bench   (or .venv/bin/python bench/api_throughput.py --seconds 2 --slow-leaves 500
--rollover-seconds 30 for a quicker look)
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

from common import SHIM, SOFTHSM, child_json, make_second_token, make_token, start_hsm, tick_lag

HOST = "127.0.0.1"
BENCH_KEY = "bench-key"
SECOND = "bench-b"  # the second token's label (two tokens)


# --- the load generator (separate process) ----------------------------------------------------

async def _load(url: str, ca: str, bearer: str, args: argparse.Namespace) -> dict[str, Any]:
    """Modes: hit / miss (throughput, for --seconds); fill (each leaf once); round (the leaves in
    turn for --seconds); storm (each leaf once, arriving spread over 1 s, honouring Retry-After).
    Leaves are named <prefix>-<n> and ask for --ttl seconds."""
    import aiohttp

    mode = args.mode
    ctx = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": f"Bearer {bearer}"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    expiries: dict[int, set[int]] = {}  # leaf -> expiresOn of the tokens it got (one per token)
    unavailable: list[float] = []  # when each 503 that is not the queue being full came (perf_counter)
    busy = 0  # 503 hsm-busy: the queue full, the service shedding load (not a fault)
    retried = 0
    # reconnect: every request on a new connection (a new TLS handshake), as most leaves do
    connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=ctx, force_close=mode == "reconnect")
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def post(device: str, n: int = -1) -> float | None:
            """None on success, else the Retry-After of a 503 (0 when there is none)."""
            t = time.perf_counter()
            async with session.post(url, json={"deviceId": device, "ttlSeconds": args.ttl}) as resp:
                body = await resp.read()
                if resp.status == 200:
                    if n >= 0:
                        expiries.setdefault(n, set()).add(json.loads(body)["expiresOn"])
                    latencies.append(time.perf_counter() - t)
                    return None
                retry_after = resp.headers.get("Retry-After")
                if resp.status == 503:
                    nonlocal busy
                    if json.loads(body).get("type", "").endswith("/hsm-busy"):
                        busy += 1
                    else:
                        unavailable.append(time.perf_counter())
                kind = f"{resp.status}" + (" with Retry-After" if retry_after else "")
                errors[kind] = errors.get(kind, 0) + 1
                return float(retry_after) if resp.status == 503 and retry_after else 0.0

        async def worker(k: int, stop: float) -> None:
            i = k
            while time.perf_counter() < stop:
                if mode == "round":
                    await post(f"{args.prefix}-{i % args.leaves}", i % args.leaves)
                    i += args.concurrency
                else:
                    await post(f"miss-{k}-{i}" if mode == "miss" else "hit-device")
                    i += 1

        async def storm_leaf(n: int, start: float) -> float:
            nonlocal retried
            await asyncio.sleep(max(0.0, start + n / args.leaves - time.perf_counter()))
            while (wait := await post(f"{args.prefix}-{n}", n)) is not None:
                if not wait:
                    return float("nan")  # failed without being told when to come back
                retried += 1
                await asyncio.sleep(wait)
            return time.perf_counter() - start

        if mode in ("hit", "miss"):  # warm-up: connections, and the cached token for mode "hit"
            await post("hit-device")
            latencies.clear()
        started = time.perf_counter()
        done: list[float] = []
        if mode == "fill":
            sem = asyncio.Semaphore(args.concurrency)

            async def once(n: int) -> None:
                async with sem:
                    await post(f"{args.prefix}-{n}", n)
            await asyncio.gather(*(once(n) for n in range(args.leaves)))
        elif mode in ("storm", "reconnect"):
            done = await asyncio.gather(*(storm_leaf(n, started) for n in range(args.leaves)))
        else:
            stop = started + args.seconds
            await asyncio.gather(*(worker(k, stop) for k in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": q[49] * 1e3,
            "p99_ms": q[98] * 1e3, "errors": errors, "retried": retried,
            "all_served_s": max(done) if done else None,
            "unserved": sum(1 for d in done if d != d),  # NaN: gave up
            "unavailable_s": [min(unavailable) - started, max(unavailable) - started] if unavailable else None,
            "unavailable": len(unavailable), "busy": busy,
            "expiries": {str(n): sorted(e) for n, e in expiries.items()} if mode in ("round", "storm", "fill") else {}}


async def run_load(url: str, ca: Path, bearer_file: Path, mode: str, args: argparse.Namespace,
                   **over: Any) -> dict[str, Any]:
    """The load generator in its own process; `over` overrides its options (leaves, ttl, ...)."""
    opts = {"seconds": args.seconds, "concurrency": args.concurrency, "leaves": 1, "ttl": 3600,
            "prefix": "leaf", **over}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    return await child_json(__file__, "--load", url, "--ca", str(ca), "--bearer-file", str(bearer_file),
                            "--mode", mode, *argv)


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


def service_config(cert: Path | None, key: Path | None, bearer: str, audit: Path, **extra: Any) -> Any:
    """The bench's service section; with cert and key None, `extra` names tls_key_label."""
    from spyrus_hsm.config import service_section

    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key)} if cert and key else {}
    return service_section({**extra, **tls,
        "host": HOST, "port": 0, "health_port": 0,
        "bearer_tokens": {"bench": hashlib.sha256(bearer.encode()).hexdigest()},
        "policy": [{"principals": ["bench"], "operations": ["sas-token"], "devices": ["*"]}],
        "sas_key": BENCH_KEY, "hub": "hub.example", "rate_limit_per_second": 0, "audit_file": str(audit),
        # every simulated leaf connects from this one address, as if behind one NAT
        "tls_per_source": 100_000,
    }, "bench")


async def start_service(hsm: Any, cfg: Any, root: Path, telemetry_off: bool = False) -> tuple[Any, int]:
    from spyrus_hsm.config import CloudConfig
    from spyrus_hsm.service import collector
    from spyrus_hsm.service.api_tls import ServerTls
    from spyrus_hsm.service.audit import AuditLog
    from spyrus_hsm.service.core import Deps, Service
    from spyrus_hsm.service.server import Listeners
    from spyrus_hsm.telemetry import disabled, hsm_instrument, setup

    # Default: as `serve` does with the OTEL_* variables of the bench's environment (none: spans
    # made but not exported).
    telemetry = disabled() if telemetry_off else setup("spyrus-hsm-bench")
    hsm.instrument(hsm_instrument(telemetry))
    deps = Deps(hsm, telemetry, root / "state", CloudConfig(), lambda: None, 3600, None)
    listeners = Listeners(Service(cfg, deps, AuditLog(cfg.audit_file, True)))
    await listeners.start_api(await asyncio.to_thread(ServerTls, cfg, hsm, root / "tls"))
    collector.pace()  # as `serve` does once its API listens
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

async def throughput(args: argparse.Namespace, root: Path, measure: bool = True) -> None:
    from spyrus_hsm.hsm import Secret

    pin = make_token(root)
    hsm = start_hsm(SOFTHSM, pin)
    await asyncio.to_thread(hsm.import_secret_key, BENCH_KEY, Secret(secrets.token_bytes(32)))
    cert, key, ca = write_pki(root)
    bearer = secrets.token_urlsafe(24)
    bearer_file = root / "bearer"
    bearer_file.write_text(bearer)
    os.chmod(bearer_file, 0o600)
    if not measure:
        hsm.close()
        return
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


def _shim(control: Path, delay_ms: int) -> None:
    """The shim as a USB token: one signature at a time, `delay_ms` each."""
    tmp = control.with_suffix(".tmp")
    tmp.write_text(f"state=plugged\nserial=1\nsign_delay_ms={delay_ms}\n")
    os.replace(tmp, control)


def lag_summary(lags: list[float]) -> dict[str, float]:
    """Worst, 99.9th percentile and the number of ticks 20 ms or more late (ms, count)."""
    ordered = sorted(lags)
    return {"worst_lag_ms": ordered[-1] * 1e3, "p999_lag_ms": ordered[int(len(ordered) * 0.999)] * 1e3,
            "late_ticks": sum(1 for x in ordered if x >= 0.02), "ticks": len(ordered)}


async def _lag_while(task: asyncio.Task[Any]) -> list[float]:
    """How late 1 ms sleeps wake up while `task` runs."""
    lags: list[float] = []
    while not task.done():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)
    return lags


def token_service_key(hsm: Any, root: Path) -> tuple[str, Path]:
    """The API's key generated in the token, with an issuing certificate (a path-length-0 CA for
    127.0.0.1, extendedKeyUsage serverAuth, as `make run` makes it) from a bench CA; (its label,
    the CA file leaves trust)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from spyrus_hsm.hsm import KeyAlgorithm

    label = "bench-api-tls"
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = {k: False for k in ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                                "key_agreement", "crl_sign", "encipher_only", "decipher_only")}

    def cert(subject: str, public_key: Any, path_length: int | None, **extensions: Any) -> Any:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                   .add_extension(x509.KeyUsage(**{**usage, "digital_signature": path_length == 0},
                                                key_cert_sign=True), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        for ext in extensions.values():
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca = cert("bench CA", ca_key.public_key(), None)
    address = ipaddress.ip_address(HOST)
    service = cert("bench service", hsm.public_key(label), 0,
                   san=x509.SubjectAlternativeName([x509.IPAddress(address)]),
                   eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    hsm.import_certificates(label, [service, ca])
    ca_file = root / "token-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return label, ca_file


async def slow_usb(args: argparse.Namespace, pin: Path, root: Path) -> dict[str, Any]:
    """In the child process: the service (hsm.serial) on the shim as a serial USB token, its TLS
    key in a file or (args.tls_key == "token") in that token."""
    control = Path(os.environ["P11SHIM_CONTROL"])
    _shim(control, 0)
    hsm = start_hsm(str(SHIM), pin, serial=True)
    bearer_file = root / "bearer"
    audit = root / f"audit-slow-{args.tls_key}.log"
    if args.tls_key == "token":
        label, ca = await asyncio.to_thread(token_service_key, hsm, root)
        cfg = service_config(None, None, bearer_file.read_text(), audit, min_ttl=60, tls_key_label=label)
    else:
        ca = root / "server.pem"
        cfg = service_config(root / "server.pem", root / "server.key", bearer_file.read_text(), audit, min_ttl=60)
    listeners, port = await start_service(hsm, cfg, root)
    url = f"https://{HOST}:{port}/v1/sas-tokens"
    signatures = 0
    instrument: Any = None

    def counting(fn: Any, operation: str, label: str | None, mechanism: str | None) -> Any:
        inner = instrument(fn, operation, label, mechanism)
        if operation != "sign":
            return inner

        def counted(session: Any) -> Any:  # on the worker: only signatures actually made
            nonlocal signatures
            signatures += 1
            return inner(session)
        return counted

    instrument = hsm.instrument(counting)
    n, roll_ttl = args.slow_leaves, rollover_ttl(args.rollover_seconds)
    out: dict[str, Any] = {"idle_worst_ms": max(await tick_lag(1.0)) * 1e3}
    cache = listeners.service.cache

    def counters() -> dict[str, int]:
        return {k: getattr(cache, k) for k in ("minted", "refreshed", "refresh_failures", "withdrawn")}
    # hit: known leaves with long-lived tokens (filled on a fast token), asked again and again
    await run_load(url, ca, bearer_file, "fill", args, leaves=n, prefix="hit", concurrency=64)
    _shim(control, args.slow_usb_ms)
    out["hit"] = await run_load(url, ca, bearer_file, "round", args, leaves=n, prefix="hit",
                                seconds=args.hit_seconds)
    # storm: n new leaves within 1 s, while known leaves keep asking on open connections
    before, seen = signatures, counters()
    load = asyncio.create_task(run_load(url, ca, bearer_file, "storm", args, leaves=n, prefix="storm",
                                        ttl=roll_ttl, concurrency=args.storm_connections))
    hits = asyncio.create_task(run_load(url, ca, bearer_file, "round", args, leaves=n, prefix="hit",
                                        concurrency=4, seconds=n * args.slow_usb_ms / 1000))
    lags = await _lag_while(load)
    out["storm"] = {**await load, "signatures": signatures - before, **lag_summary(lags),
                    "cache": {k: v - seen[k] for k, v in counters().items()}, "hits": await hits}
    # rollover: the storm's leaves come back while their tokens pass the reuse point
    before, seen = signatures, counters()
    load = asyncio.create_task(run_load(url, ca, bearer_file, "round", args, leaves=n, prefix="storm",
                                        ttl=roll_ttl, seconds=args.rollover_seconds))
    lags = await _lag_while(load)
    roll = await load
    while hsm.queue_depth():  # refreshes still queued: their tokens are collected by the sweep
        await asyncio.sleep(0.05)
    roll_signatures = signatures - before
    roll_cache = {k: v - seen[k] for k, v in counters().items()}
    minted = cache.minted
    sweep = await run_load(url, ca, bearer_file, "fill", args, leaves=n, prefix="storm", ttl=roll_ttl,
                           concurrency=64)
    storm_tokens = out["storm"]["expiries"]
    needed = rolled = 0
    for leaf, seen in roll["expiries"].items():
        new = (set(seen) | set(sweep["expiries"].get(leaf, ()))) - set(storm_tokens.get(leaf, ()))
        needed += len(new)
        rolled += bool(new)
    needed -= cache.minted - minted  # tokens the sweep itself waited for were not signed in the run
    out["rollover"] = {**roll, "expiries": {}, "signatures": roll_signatures, "needed": needed, "rolled": rolled,
                       **lag_summary(lags), "ttl": roll_ttl, "cache": roll_cache}
    out["storm"]["expiries"] = {}
    # reconnect storm: the known leaves each open a new connection for their cached token (once
    # the refreshes the sweep started are done: they are not this case's)
    while True:
        settled = signatures
        await asyncio.sleep(0.5)
        if settled == signatures and not hsm.queue_depth():
            break
    before = signatures
    load = asyncio.create_task(run_load(url, ca, bearer_file, "reconnect", args, leaves=n, prefix="hit",
                                        concurrency=args.storm_connections))
    lags = await _lag_while(load)
    out["reconnect"] = {**await load, "signatures": signatures - before, **lag_summary(lags)}
    from spyrus_hsm.service import collector

    gc = collector.pace()  # the schedule start_service started
    out["collector"] = {"freezes": gc.freezes, "collections": gc.collections, "longest_ms": gc.longest * 1e3}
    await listeners.stop()
    hsm.close()
    return out


def rollover_ttl(seconds: float) -> int:
    """Short enough that every storm token (minted over the storm) passes its reuse point (half
    its life) during the rollover run that follows; never below the minter's 60 s."""
    return max(60, int(2 * (seconds - 10)))


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def _slow_usb_child(args: argparse.Namespace, root: Path, tls_key: str) -> dict[str, Any]:
    env = dict(os.environ, P11SHIM_TARGET=SOFTHSM, P11SHIM_CONTROL=str(root / f"shim-{tls_key}.control"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--slow-child", str(root), f"--tls-key={tls_key}", *_passthrough(args), env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def slow_usb_parent(args: argparse.Namespace, root: Path) -> None:
    """The token, key, certificate and bearer made by `throughput` are reused. Each case runs
    twice, the API's TLS key in a file and in the slowed token, printed side by side."""
    if not SHIM.exists():
        print(f"slow USB: skipped ({SHIM} not built; run 'make shim')")
        return
    runs = {name: await _slow_usb_child(args, root, name) for name in ("file", "token")}
    n, ms = args.slow_leaves, args.slow_usb_ms
    print(f"\nserial USB token ({ms} ms per signature, one at a time; hsm.serial: true), {n} leaves; "
          f"the API's TLS key in a file | in the token")

    def row(what: str, values: dict[str, str], ok: dict[str, bool] | None = None, target: str = "") -> None:
        cells = " | ".join(f"{values[k]:>10}" + (f" {met(ok[k]):<6}" if ok else "") for k in runs)
        print(f"  {what:<58} {cells}  {target}")

    def each(fmt: Any) -> dict[str, str]:
        return {k: fmt(r) for k, r in runs.items()}

    def check(test: Any) -> dict[str, bool]:
        return {k: bool(test(r)) for k, r in runs.items()}

    limit = 1.1 * n * ms / 1000
    row("event-loop worst lag idle (ms)", each(lambda r: f"{r['idle_worst_ms']:.2f}"))
    row("hit: req/s", each(lambda r: f"{r['hit']['rps']:.0f}"))
    row("hit: p99 (ms)", each(lambda r: f"{r['hit']['p99_ms']:.1f}"))
    print(f"storm: {n} new leaves within 1 s over {args.storm_connections} new connections")
    row("every leaf has its token after (s)", each(lambda r: f"{r['storm']['all_served_s']:.1f}"),
        check(lambda r: r["storm"]["all_served_s"] <= limit), f"target <= {limit:.1f} s")
    row("failures other than 503 + Retry-After, unserved leaves",
        each(lambda r: f"{sum(v for k, v in r['storm']['errors'].items() if k != '503 with Retry-After')}, "
                       f"{r['storm']['unserved']}"),
        check(lambda r: not r["storm"]["unserved"]
              and not any(k != "503 with Retry-After" for k in r["storm"]["errors"])),
        "target none")
    row("event-loop worst lag (ms)", each(lambda r: f"{r['storm']['worst_lag_ms']:.2f}"),
        check(lambda r: r["storm"]["worst_lag_ms"] < 20), "target < 20 ms")
    late(runs, "storm", row, each)
    row("HSM signatures (tokens signed)", each(lambda r: f"{r['storm']['signatures']}"))
    row("a hit's p99 during the storm (ms), 4 keep-alive connections",
        each(lambda r: f"{r['storm']['hits']['p99_ms']:.1f}"))
    print(f"rollover: the storm's leaves for {args.rollover_seconds:g} s, TTL {runs['file']['rollover']['ttl']} s")
    row("leaves that got a new token", each(lambda r: f"{r['rollover']['rolled']}"))
    row("p99 / the hit case's p99", each(lambda r: f"{r['rollover']['p99_ms'] / r['hit']['p99_ms']:.2f}"),
        check(lambda r: r["rollover"]["p99_ms"] <= 3 * r["hit"]["p99_ms"]), "target <= 3")
    row("HSM signatures / tokens needed", each(lambda r: f"{r['rollover']['signatures']}/{r['rollover']['needed']}"),
        check(lambda r: r["rollover"]["signatures"] <= r["rollover"]["needed"] * 1.05), "target <= +5 %")
    row("event-loop worst lag (ms)", each(lambda r: f"{r['rollover']['worst_lag_ms']:.2f}"))
    late(runs, "rollover", row, each)
    print(f"reconnect storm: {n} known leaves, each on a new connection, {args.storm_connections} at a time")
    row("HSM signatures", each(lambda r: f"{r['reconnect']['signatures']}"),
        check(lambda r: r["reconnect"]["signatures"] == 0), "target 0")
    row("event-loop worst lag (ms)", each(lambda r: f"{r['reconnect']['worst_lag_ms']:.2f}"),
        check(lambda r: r["reconnect"]["worst_lag_ms"] < 20), "target < 20 ms")
    late(runs, "reconnect", row, each)
    row("served, errors", each(lambda r: f"{r['reconnect']['requests']}, {sum(r['reconnect']['errors'].values())}"))
    row("collector: busy ticks frozen; deferred collections, the longest (ms)",
        each(lambda r: f"{r['collector']['freezes']}; {r['collector']['collections']}, "
                       f"{r['collector']['longest_ms']:.0f}"))
    for name, r in runs.items():
        for case in ("storm", "rollover"):
            c = r[case]["cache"]
            print(f"  (key in {name}, {case}: {c['minted']} tokens signed while a request waited, {c['refreshed']} "
                  f"refreshed ahead, {c['refresh_failures']} refreshes refused or failed, {c['withdrawn']} withdrawn "
                  "for a waiting request)")


# --- two tokens ---------------------------------------------------------------------------------

def _slot_of(label: str) -> int:
    from spyrus_hsm.hsm import library

    for slot in library.load_module(str(SHIM)).get_slots(token_present=True):
        if slot.get_token().label == label:
            return int(slot.slot_id)
    raise RuntimeError(f"no slot holds token '{label}'")


async def two_tokens(args: argparse.Namespace, pin: Path, root: Path) -> dict[str, Any]:
    """In a child process: the storm on one serial USB token (the baseline), on two (a TokenPair:
    the work shared), and on two with the first unplugged half-way through (failover)."""
    from spyrus_hsm.hsm import Secret, TokenPair, mark_shared

    control = Path(os.environ["P11SHIM_CONTROL"])
    mark_shared(str(SHIM))  # two pools on one module: no C_Finalize under the other's sessions
    a = start_hsm(str(SHIM), pin, serial=True)
    b = start_hsm(str(SHIM), root / f"user-{SECOND}.pin", serial=True, label=SECOND)
    if not await asyncio.to_thread(b.find, BENCH_KEY, "secret-key"):  # the secondary key of the same label
        await asyncio.to_thread(b.import_secret_key, BENCH_KEY, Secret(secrets.token_bytes(32)))
    slot_a = _slot_of("bench")
    bearer_file = root / "bearer"
    out: dict[str, Any] = {}
    n, ms = args.slow_leaves, args.slow_usb_ms
    for case, hsm in (("one", a), ("two", TokenPair([a, b])), ("failover", TokenPair([a, b]))):
        _shim(control, 0)
        cfg = service_config(root / "server.pem", root / "server.key", bearer_file.read_text(),
                             root / f"audit-{case}.log", min_ttl=60)
        listeners, port = await start_service(hsm, cfg, root)
        url = f"https://{HOST}:{port}/v1/sas-tokens"
        _shim(control, ms)
        load = asyncio.create_task(run_load(url, root / "server.pem", bearer_file, "storm", args, leaves=n,
                                            prefix=f"two-{case}", concurrency=args.storm_connections))
        if case == "failover":  # half-way through what two tokens take
            await asyncio.sleep(n * ms / 1000 / 4)
            tmp = control.with_suffix(".tmp")
            tmp.write_text(f"serial=1\nsign_delay_ms={ms}\nunplug_slot={slot_a}\n")
            os.replace(tmp, control)
            out["unplugged_at_s"] = n * ms / 1000 / 4
        out[case] = await load
        await listeners.stop()
        _shim(control, 0)  # plugged again for the next case
        if case == "failover":
            break
    a.close()
    b.close()
    return out


async def two_tokens_parent(args: argparse.Namespace, root: Path) -> None:
    if not SHIM.exists():
        print(f"two tokens: skipped ({SHIM} not built; run 'make shim')")
        return
    if not (root / f"user-{SECOND}.pin").exists():
        make_second_token(root, SECOND)
    env = dict(os.environ, P11SHIM_TARGET=SOFTHSM, P11SHIM_CONTROL=str(root / "shim-two.control"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--two-child", str(root), *_passthrough(args), env=env,
        stdout=asyncio.subprocess.PIPE)
    raw, _ = await proc.communicate()
    r = json.loads(raw.decode().strip().splitlines()[-1])
    n, ms = args.slow_leaves, args.slow_usb_ms
    one, two, fail = r["one"], r["two"], r["failover"]
    limit = 1.1 * n * ms / 1000 / 2
    print(f"\ntwo serial USB tokens ({ms} ms per signature, one at a time each; hsm.serial: true), storm of {n} new "
          f"leaves within 1 s over {args.storm_connections} connections")
    print(f"  one token: every leaf has its token after {one['all_served_s']:.1f} s (the baseline, this run)")
    print(f"  two tokens: after {two['all_served_s']:.1f} s  target <= {limit:.1f} s  "
          f"{met(two['all_served_s'] <= limit)}; one / two = {one['all_served_s'] / two['all_served_s']:.2f} "
          "(2 would be perfect sharing)")
    for name, res in (("one token", one), ("two tokens", two), ("failover", fail)):
        bad = {k: v for k, v in res["errors"].items() if k != "503 with Retry-After"}
        print(f"  {name}: unserved {res['unserved']}, failures other than 503 + Retry-After {bad or 'none'}; "
              f"503 hsm-busy (the queue full: load shed, retried as told) {res['busy']}, other 503s "
              f"{res['unavailable']}")
    window = fail["unavailable_s"]
    span = 0.0 if window is None else window[1] - window[0]
    print(f"  failover: the first token unplugged at {r['unplugged_at_s']:.1f} s; every leaf has its token after "
          f"{fail['all_served_s']:.1f} s (one token alone: {one['all_served_s']:.1f} s); 503s other than hsm-busy "
          + ("none" if window is None else f"from {window[0]:.1f} s to {window[1]:.1f} s")
          + f": a window of {span:.1f} s  target <= 1 s  {met(span <= 1.0)}")


def late(runs: dict[str, Any], case: str, row: Any, each: Any) -> None:
    row("  lag p99.9 (ms); 1 ms ticks 20 ms or more late",
        each(lambda r: f"{r[case]['p999_lag_ms']:.1f}; {r[case]['late_ticks']}/{r[case]['ticks']}"))


def _passthrough(args: argparse.Namespace) -> list[str]:
    names = ("seconds", "concurrency", "slow_usb_ms", "slow_leaves", "storm_connections", "hit_seconds",
             "rollover_seconds", "memory_leaves", "memory_bound")
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in names]


# --- memory -------------------------------------------------------------------------------------

def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def memory(args: argparse.Namespace, pin: Path, root: Path) -> dict[str, Any]:
    """In a child process: distinct leaves through Service.sas_token (the HTTP layer left out:
    100,000 TLS requests would take minutes and measure aiohttp, not the cache)."""
    import gc

    from spyrus_hsm.config import CloudConfig
    from spyrus_hsm.service.audit import AuditLog
    from spyrus_hsm.service.core import Deps, Service
    from spyrus_hsm.telemetry import disabled

    hsm = start_hsm(SOFTHSM, pin)
    cert, key = root / "server.pem", root / "server.key"
    cfg = service_config(cert, key, "unused", root / "audit-mem.log", cache_max_entries=args.memory_bound)
    svc = Service(cfg, Deps(hsm, disabled(), root / "state", CloudConfig(), lambda: None, 3600, None),
                  AuditLog(cfg.audit_file, True))

    async def serve(first: int, last: int) -> None:
        for i in range(first, last, 200):  # within the HSM queue (256)
            await asyncio.gather(*(svc.sas_token(BENCH_KEY, f"hub.example/devices/memory-leaf-{j:06d}", 3600)
                                   for j in range(i, min(i + 200, last))))

    await serve(0, 2000)  # warm-up (threads, allocator arenas), then forget
    svc.cache.clear()
    gc.collect()
    base = rss()
    bound = args.memory_bound
    await serve(0, bound)
    gc.collect()
    full = rss()
    assert len(svc.cache) == bound
    await serve(bound, args.memory_leaves)
    gc.collect()
    after = rss()
    entries = len(svc.cache)
    svc.cache.clear()
    gc.collect()
    cleared = rss()
    svc.close()
    hsm.close()
    return {"base": base, "full": full, "after": after, "cleared": cleared, "entries": entries}


async def memory_parent(args: argparse.Namespace, root: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--memory-child", str(root), *_passthrough(args), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    m = json.loads(out.decode().strip().splitlines()[-1])
    per = (m["full"] - m["base"]) / args.memory_bound
    mib = 1 / (1 << 20)
    print(f"\nmemory (in-process through Service.sas_token, SoftHSM): cache bound {args.memory_bound} tokens")
    print(f"  RSS {m['base'] * mib:.1f} MiB empty, {m['full'] * mib:.1f} MiB holding {args.memory_bound}: "
          f"{per:.0f} bytes per cached token  target <= 2048  {met(per <= 2048)}")
    print(f"  after {args.memory_leaves} distinct leaves ({m['entries']} kept, the rest evicted): "
          f"{m['after'] * mib:.1f} MiB; after the cache is cleared: {m['cleared'] * mib:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each throughput run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    ap.add_argument("--slow-usb-ms", type=int, default=20, help="the USB token's time per signature")
    ap.add_argument("--slow-leaves", type=int, default=2000, help="leaves in the hit, storm and rollover cases")
    ap.add_argument("--storm-connections", type=int, default=512)
    ap.add_argument("--hit-seconds", type=float, default=20.0)
    ap.add_argument("--rollover-seconds", type=float, default=60.0)
    ap.add_argument("--memory-leaves", type=int, default=100_000)
    ap.add_argument("--memory-bound", type=int, default=50_000, help="service.cache_max_entries")
    ap.add_argument("--only", choices=("throughput", "usb", "two", "memory"),
                    help="run one part (after throughput's setup)")
    for hidden in ("--load", "--ca", "--bearer-file", "--mode", "--slow-child", "--two-child", "--memory-child",
                   "--prefix"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--leaves", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--tls-key", choices=("file", "token"), default="file", help=argparse.SUPPRESS)
    ap.add_argument("--ttl", type=int, default=3600, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        bearer = Path(args.bearer_file).read_text().strip()
        print(json.dumps(asyncio.run(_load(args.load, args.ca, bearer, args))))
        return 0
    for child, run in ((args.slow_child, slow_usb), (args.two_child, two_tokens), (args.memory_child, memory)):
        if child:
            root = Path(child)
            os.environ["SOFTHSM2_CONF"] = str(root / "softhsm2.conf")
            print(json.dumps(asyncio.run(run(args, root / "user.pin", root))))
            return 0
    root = Path(tempfile.mkdtemp(prefix="spyrus-apibench-"))
    asyncio.run(throughput(args, root, measure=args.only in (None, "throughput")))
    if args.only in (None, "usb"):
        asyncio.run(slow_usb_parent(args, root))
    if args.only in (None, "two"):
        asyncio.run(two_tokens_parent(args, root))
    if args.only in (None, "memory"):
        asyncio.run(memory_parent(args, root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
