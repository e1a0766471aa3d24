"""Soak: `spyrus-hsm serve` renewing a short-lived operational certificate over and over, with a
fault drawn from a seed at each cycle, against the IoT Hub + DPS emulator of tests/emulator.

Each cycle waits for one more `certificate-renewed` message from the module (a renewal that went
through its commit point). Faults, one per cycle (`--seed` makes a run repeatable): none; DPS
refuses the registration (401), throttles it (429, retry-after 2 s) or leaves it unanswered past
the registration deadline; the hub refuses the next connect (CONNACK 5) or drops the
connection; the process is killed (SIGKILL) and started again. (HSM unplugs need the PKCS#11
shim and are not drawn here; tests/integration/test_recovery*.py covers them.)

Figures printed: cycles done, renewals, how long each took (median, worst), faults drawn; the
module process's threads, open fds and RSS, first quarter of the cycles against the last (of the
longest-lived process: a kill starts a new one); certificate-renewed messages delivered twice;
and the invariants at the end: exactly one generation in the token, complete, valid; the twin's
renewal state `scheduled`; exit code 0 on SIGTERM.

Run: .venv/bin/python bench/soak.py [--cycles 200] [--seed 1] [--validity 20]
(about validity/2 seconds a cycle: 200 cycles of a 20 s certificate take about 35 minutes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import LABEL, ROOT, SOFTHSM, make_token, start_hsm

sys.path.insert(0, str(ROOT / "tests"))
from emulator.core import Emulator
from emulator.pki import EmulatorPki
from spyrus_hsm.cloud import renewal
from spyrus_hsm.edge.reported import twin_key
from spyrus_hsm.hsm import Secret
from spyrus_hsm.identity import x509 as x509_id

HOST = "127.0.0.191"
SCOPE = "0ne000S0A4"
REG = "soak-device"
ONBOARDING = "soak-onboarding"
BASE = "soak-op"
FAULTS = ["none", "dps-refused", "dps-throttled", "dps-stalled", "hub-refused", "hub-dropped", "killed"]
CYCLE_DEADLINE = 120.0  # seconds for one renewal, faults and backoff included


class Module:
    """`serve` as a child process, its stderr in a file."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config, self.env, self.log = config, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "-v", "--config", str(self.config),
                                          "serve"], env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def sample(self) -> dict[str, int]:
        """Threads, open fds and RSS (KiB) of the process now."""
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        fds = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since it was listed
                fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        return {"pid": pid, "threads": int(fields["Threads"]), "fds": len(fds),
                "sockets": sum(f.startswith("socket:") for f in fds), "rss_kib": int(fields["VmRSS"].split()[0])}


def renewed(emu: Emulator) -> list[dict[str, Any]]:
    return [t.json() for t in list(emu.received.telemetry)
            if t.device_id == REG and t.properties.get("type") == "certificate-renewed"]


def renewal_state(emu: Emulator) -> dict[str, Any]:
    reported = emu.twin(REG)["reported"]
    return dict(reported.get("credentials", {}).get(twin_key(BASE), {}).get("renewal") or {})


def inject(fault: str, emu: Emulator, module: Module, rng: random.Random) -> None:
    if fault == "dps-refused":
        emu.throttle_dps(1, status=401)
    elif fault == "dps-throttled":
        emu.throttle_dps(1, retry_after=2)
    elif fault == "dps-stalled":  # past the 5 s registration deadline, then answered again
        emu.stall_dps(True)
        threading.Timer(7.0, emu.stall_dps, args=(False,)).start()
    elif fault == "hub-refused":
        emu.refuse_hub(1)
    elif fault == "hub-dropped":
        emu.drop_connection(REG)
    elif fault == "killed":
        time.sleep(rng.uniform(0, 5))  # anywhere in the cycle
        module.kill()
        module.start()


def quarter(samples: list[dict[str, int]], key: str, last: bool) -> float:
    n = max(1, len(samples) // 4)
    part = samples[-n:] if last else samples[:n]
    return statistics.median(s[key] for s in part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--validity", type=float, default=20.0, help="seconds each issued certificate lives")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"drawn from (default: all of {','.join(FAULTS)})")
    args = parser.parse_args()
    faults = args.faults.split(",")
    if not set(faults) <= set(FAULTS):
        parser.error(f"--faults: unknown {', '.join(sorted(set(faults) - set(FAULTS)))}")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="spyrus-soak-"))
    pin_file = make_token(root)
    pki = EmulatorPki(root / "pki")
    server = pki.server([HOST])
    emu = Emulator(HOST, server_cert=server.cert_file, server_key=server.key_file, id_scope=SCOPE).start()
    emu.polls_before_assigned = 1
    emu.issued_validity = args.validity
    hsm = start_hsm(SOFTHSM, pin_file, workers=1)
    raw = secrets.token_bytes(32)
    hsm.import_secret_key(ONBOARDING, Secret(raw))
    hsm.close()
    emu.add_individual_enrollment(REG, symmetric_key=base64.b64encode(raw).decode(), assigned_hub=HOST)
    config = root / "serve.yaml"
    config.write_text(
        f"hsm:\n  module: {SOFTHSM}\n  token_label: {LABEL}\n  pin_file: {pin_file}\nstate_dir: {root / 'state'}\n"
        f"metrics:\n  enabled: false\ncloud:\n  server_ca_file: {pki.ca_file}\n  id_scope: {SCOPE}\n"
        f"  registration_id: {REG}\n  provisioning_host: {HOST}\n  attestation: symmetricKey\n"
        f"  key: {ONBOARDING}\n  issue_cert: {BASE}\n  renew_at: 0.5\n  renew_retry_initial: 1\n"
        f"  renew_retry_max: 4\n  registration_timeout: 5\n")
    module = Module(config, dict(os.environ), root / "serve.log")
    module.start()
    drawn: dict[str, int] = {}
    samples: list[dict[str, int]] = []
    durations: list[float] = []
    stuck = None
    try:
        emu.wait_for(lambda: any(c.accepted for c in list(emu.received.connects) if c.client_id == REG), 60)
        for cycle in range(args.cycles):
            fault = rng.choice(faults)
            drawn[fault] = drawn.get(fault, 0) + 1
            target = len(renewed(emu)) + 1
            began = time.monotonic()
            inject(fault, emu, module, rng)
            try:
                emu.wait_for(lambda target=target: len(renewed(emu)) >= target, CYCLE_DEADLINE, interval=0.2)
            except Exception:
                stuck = f"cycle {cycle + 1} ({fault}): no renewal within {CYCLE_DEADLINE:g} s"
                break
            durations.append(time.monotonic() - began)
            samples.append(module.sample())
            if (cycle + 1) % 10 == 0:
                print(f"  {cycle + 1} cycles, {module.starts - 1} restarts, last sample {samples[-1]}", flush=True)
        emu.wait_for(lambda: renewal_state(emu).get("state") == "scheduled", 60, interval=0.2)
        state = renewal_state(emu)
    finally:
        code = module.stop()
        emu.stall_dps(False)
    hsm = start_hsm(SOFTHSM, pin_file, workers=1)
    gens = renewal.generations(hsm, BASE)
    cred = x509_id.select(hsm, label=gens[-1].label) if gens and gens[-1].complete else None
    hsm.close()
    emu.stop()
    messages = renewed(emu)
    keys = [m["publicKeySha256"] for m in messages]
    by_pid: dict[int, list[dict[str, int]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    longest = max(by_pid.values(), key=len) if by_pid else []
    log_text = (root / "serve.log").read_text(errors="replace")

    print(f"soak: {len(durations)} of {args.cycles} cycles (seed {args.seed}, {args.validity:g} s certificates), "
          f"{module.starts - 1} restarts" + (f"; STOPPED: {stuck}" if stuck else ""))
    print(f"  faults drawn: {', '.join(f'{k} {v}' for k, v in sorted(drawn.items()))}")
    if durations:
        print(f"  seconds per cycle: median {statistics.median(durations):.1f}, worst {max(durations):.1f}")
    if len(longest) >= 4:
        for key in ("threads", "fds", "sockets", "rss_kib"):
            print(f"  {key} (process with {len(longest)} samples): first quarter median "
                  f"{quarter(longest, key, False):g}, last quarter median {quarter(longest, key, True):g}")
    print(f"  certificate-renewed messages: {len(messages)}, delivered twice: {len(keys) - len(set(keys))}")
    now = dt.datetime.now(dt.UTC)
    valid = cred is not None and cred.leaf.not_valid_after_utc > now
    print(f"  token at the end: {[(g.label, g.complete) for g in gens]}; in use valid: {valid}")
    print(f"  renewal state at the end: {json.dumps({k: state.get(k) for k in ('state', 'label', 'failures')})}")
    print(f"  exit code on SIGTERM: {code}; tracebacks in the log: {log_text.count('Traceback')}")
    ok = (not stuck and len(gens) == 1 and gens[0].complete and valid and len(keys) == len(set(keys))
          and state.get("state") == "scheduled" and code == 0 and "Traceback" not in log_text)
    print("  invariants: " + ("hold" if ok else f"BROKEN (log: {root / 'serve.log'})"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
