"""HSM layer throughput against raw python-pkcs11, and event-loop lag on a slow token.

Everything is measured in this run, on this machine, and reported as ratios to a baseline
from the same run (shared machines are noisy; absolute numbers do not compare across runs):

  1. raw:     python-pkcs11 C_Sign(CKM_SHA256_HMAC) in a loop on one session (the baseline)
  2. sync:    Hsm.hmac_sha256 from one thread (worker hand-off with a per-call timeout)
  3. async:   Hsm.asign (HMAC-SHA256) from 1 and from 16 concurrent asyncio callers
  4. slow USB (a child process through tests/p11shim with sign_delay_ms): the event loop's
     worst tick lag while 16 callers sign, against its lag with no HSM work.

Targets: sync >= 0.8x raw, async(16) >= 0.5x raw, slow-USB worst lag < 20 ms.
Run: make bench   (or .venv/bin/python bench/hsm_throughput.py --ops 5000)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LABEL, SHIM, SOFTHSM, make_token, start_hsm, tick_lag

from spyrus_hsm.hsm import SignAlgorithm

DATA = b"x" * 64
HMAC = SignAlgorithm.HMAC_SHA256


def raw_rate(n: int) -> float:
    """python-pkcs11 alone, on a session of its own (the module is already initialised)."""
    from pkcs11 import Attribute, Mechanism, ObjectClass
    from pkcs11.types import SecretKey

    from spyrus_hsm.hsm import TokenSelector, library

    token = library.find_token(library.load_module(SOFTHSM), TokenSelector(LABEL))
    session = library.open_session(token)
    key = next(iter(session.get_objects({Attribute.LABEL: "k", Attribute.CLASS: ObjectClass.SECRET_KEY})))
    assert isinstance(key, SecretKey)
    t = time.perf_counter()
    for _ in range(n):
        key.sign(DATA, mechanism=Mechanism.SHA256_HMAC)
    return n / (time.perf_counter() - t)


def sync_rate(hsm: object, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        hsm.hmac_sha256("k", DATA)  # type: ignore[attr-defined]
    return n / (time.perf_counter() - t)


def async_rate(hsm: object, n: int, callers: int) -> float:
    per = max(1, n // callers)

    async def caller() -> None:
        for _ in range(per):
            await hsm.asign("k", HMAC, DATA)  # type: ignore[attr-defined]

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*[caller() for _ in range(callers)])
        return per * callers / (time.perf_counter() - t)

    return asyncio.run(main())


def slow_usb_child(pin_file: Path, delay_ms: int, seconds: float) -> dict[str, float]:
    """Runs in a child process whose PKCS#11 module is the shim adding `delay_ms` to signing."""
    control = Path(os.environ["P11SHIM_CONTROL"])
    control.write_text(f"state=plugged\nsign_delay_ms={delay_ms}\n")
    hsm = start_hsm(str(SHIM), pin_file)
    done = 0

    async def caller(stop: float) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await hsm.asign("k", HMAC, DATA)  # type: ignore[attr-defined]
            done += 1

    async def main() -> dict[str, float]:
        idle = await tick_lag(seconds / 2)
        stop = time.perf_counter() + seconds
        lags, *_ = await asyncio.gather(tick_lag(seconds), *[caller(stop) for _ in range(16)])
        return {"idle_worst_ms": max(idle) * 1e3, "load_worst_ms": max(lags) * 1e3,
                "load_p99_ms": statistics.quantiles(lags, n=100)[98] * 1e3,
                "ops_per_s": done / seconds, "ideal_ops_per_s": 4 * 1000 / delay_ms}

    return asyncio.run(main())


def median_of(rounds: int, fn: object) -> float:
    return statistics.median(fn() for _ in range(rounds))  # type: ignore[operator]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=5000, help="signatures per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per measurement (median reported)")
    ap.add_argument("--slow-usb-ms", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0, help="slow-USB load duration")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(slow_usb_child(Path(args.child), args.slow_usb_ms, args.seconds)))
        return 0

    from spyrus_hsm.hsm import Secret

    root = Path(tempfile.mkdtemp(prefix="spyrus-bench-"))
    pin = make_token(root)
    hsm = start_hsm(SOFTHSM, pin)
    hsm.import_secret_key("k", Secret(secrets.token_bytes(32)))  # type: ignore[attr-defined]
    n, r = args.ops, args.rounds
    async_rate(hsm, n, 16)  # warm-up: workers open sessions, the batcher learns the op time
    rows = {
        "raw python-pkcs11": median_of(r, lambda: raw_rate(n)),
        "sync (worker)": median_of(r, lambda: sync_rate(hsm, n)),
        "async, 1 caller": median_of(r, lambda: async_rate(hsm, n, 1)),
        "async, 16 callers": median_of(r, lambda: async_rate(hsm, n, 16)),
    }
    raw = rows["raw python-pkcs11"]
    targets = {"sync (worker)": 0.8, "async, 16 callers": 0.5}
    print(f"HMAC-SHA256 on SoftHSM2, {n} signatures x {r} rounds (median), 4 workers")
    print(f"{'path':<20} {'ops/s':>9} {'x raw':>7}  target")
    for name, rate in rows.items():
        t = targets.get(name)
        verdict = "" if t is None else f">= {t}  {'met' if rate / raw >= t else 'MISSED'}"
        print(f"{name:<20} {rate:>9.0f} {rate / raw:>7.2f}  {verdict}")

    if not SHIM.exists():
        print(f"slow USB: skipped ({SHIM} not built; run 'make shim')")
        return 0
    env = dict(os.environ, P11SHIM_TARGET=SOFTHSM, P11SHIM_CONTROL=str(root / "shim.control"))
    out = subprocess.run([sys.executable, __file__, "--child", str(pin), "--slow-usb-ms", str(args.slow_usb_ms),
                          "--seconds", str(args.seconds)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    s = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"slow USB ({args.slow_usb_ms} ms per signature, 16 async callers, {args.seconds:g} s):")
    print(f"  event-loop worst tick lag: {s['load_worst_ms']:.2f} ms under load vs {s['idle_worst_ms']:.2f} ms idle "
          f"(p99 {s['load_p99_ms']:.2f} ms)  target < 20 ms  {'met' if s['load_worst_ms'] < 20 else 'MISSED'}")
    print(f"  throughput {s['ops_per_s']:.0f} ops/s = {s['ops_per_s'] / s['ideal_ops_per_s']:.2f}x "
          f"the 4-session ideal of {s['ideal_ops_per_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
