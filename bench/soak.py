"""Soak: `spyrus-hsm serve` renewing a short-lived operational certificate over and over, with a
fault drawn from a seed at each cycle, against the IoT Hub + DPS emulator of tests/emulator,
its PKCS#11 module the fault-injection shim of tests/p11shim over SoftHSM2.

Each cycle waits for one more `certificate-renewed` message from the module (a renewal that went
through its commit point). Faults, one per cycle (`--seed` makes a run repeatable): none; DPS
refuses the registration (401), throttles it (429, retry-after 2 s) or leaves it unanswered past
the registration deadline; the hub refuses the next connect (CONNACK 5) or drops the
connection; the process is killed (SIGKILL) at a random point of the cycle and started again;
the HSM is unplugged at a random point of the cycle for a random time (0.5 s to 0.6 of the
certificate's validity, so now and then past its expiry) and plugged back, one leaf request
made while it is away.

After each cycle: /readyz on the health port answers 200 again (within 60 s); a few leaf
SAS-token requests through the API are all answered with a token that verifies for the device
asked; the token (seen through a session of the soak's own, not through the shim) settles to
one complete generation, beside at most one incomplete one, within 30 s. Then the audit log is
checked: every line parses as one whole JSON record with the
documented fields, none contains a secret (PIN, bearer token, onboarding or device key, any
SAS token or signature handed out), and every leaf request the soak made has its record (by
its X-Request-Id) with the outcome and status it was answered with; a request answered 200
has no record saying otherwise.

Figures printed: cycles done, renewals, how long each took (median, worst), faults drawn, leaf
requests and audit lines checked, failures (each named); the module process's threads, open
fds and RSS, first quarter of the cycles against the last (of the longest-lived process: a kill
starts a new one), its fd count along the run and which fds it gained (by kind: a TCP socket by
its peer, a file by its path); certificate-renewed messages delivered twice; and the
invariants at the end: exactly one generation in the token, complete, valid; the twin's renewal
state `scheduled`; exit code 0 on SIGTERM; no traceback or secret in the module's log.

Run: .venv/bin/python bench/soak.py [--cycles 200] [--seed 1] [--validity 20] [--faults ...]
(`make shim` first; about validity/2 seconds a cycle: 200 cycles of a 20 s certificate take
about 40 minutes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import os
import random
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from common import LABEL, ROOT, SHIM, SOFTHSM, fd_kinds, make_token, start_hsm

sys.path.insert(0, str(ROOT / "tests"))
from service_harness import verify_sas

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
HUB = "hub.example"
PRINCIPAL = "soak"
LEAVES = 4                # leaf devices whose keys are in the token
REQUESTS_PER_CYCLE = 3    # leaf SAS-token requests after each cycle
FAULTS = ["none", "dps-refused", "dps-throttled", "dps-stalled", "hub-refused", "hub-dropped", "killed",
          "unplugged"]
CYCLE_DEADLINE = 120.0  # seconds for one renewal, faults and backoff included
READY_DEADLINE = 60.0   # seconds for /readyz to answer 200 again after a cycle
AUDIT_DEADLINE = 10.0   # seconds for a request's audit record to reach the file
TOKEN_DEADLINE = 30.0   # seconds for the token to settle to one complete generation after a renewal
AUDIT_FIELDS = {"time", "principal", "operation", "key", "device", "outcome", "reason", "status", "requestId",
                "remote"}
OUTCOMES = {"allowed", "denied", "unauthenticated", "rate-limited", "rejected", "error", "aborted", "withheld"}


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

    def sample(self) -> dict[str, Any]:
        """Threads, open fds (and what they are) and RSS (KiB) of the process now."""
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        kinds = fd_kinds(pid)
        return {"pid": pid, "threads": int(fields["Threads"]), "fds": sum(kinds.values()),
                "sockets": sum(n for k, n in kinds.items() if k.startswith(("tcp", "udp", "unix", "socket"))),
                "rss_kib": int(fields["VmRSS"].split()[0]), "kinds": kinds}


class Shim:
    """The shim's control file: the token plugged or not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set("plugged")

    def set(self, state: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"state={state}\n")
        os.replace(tmp, self.path)  # atomically: the shim never reads a half-written file


class Api:
    """Leaf SAS-token requests to the module's API; the tokens it hands out are remembered as secrets."""

    def __init__(self, port: int, health_port: int, ca: Path, bearer: str, keys: dict[str, bytes]) -> None:
        self.port, self.health_port, self.bearer, self.keys = port, health_port, bearer, keys
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.handed_out: list[str] = []  # tokens and their signatures
        self.statuses: Counter[str] = Counter()

    def ready(self) -> bool:
        conn = http.client.HTTPConnection(HOST, self.health_port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def sas(self, device: str, request_id: str) -> tuple[int | None, str | None]:
        """(status, problem) of one request; None: no answer. A token that does not verify for the
        device asked is a problem."""
        conn = http.client.HTTPSConnection(HOST, self.port, context=self.ctx, timeout=30)
        try:
            conn.request("POST", "/v1/sas-tokens", body=json.dumps({"deviceId": device}),
                         headers={"Authorization": f"Bearer {self.bearer}", "Content-Type": "application/json",
                                  "X-Request-Id": request_id})
            resp = conn.getresponse()
            body = json.loads(resp.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.statuses["no answer"] += 1
            return None, f"{request_id}: no answer ({exc.__class__.__name__})"
        finally:
            conn.close()
        self.statuses[str(resp.status)] += 1
        if resp.status != 200:
            return resp.status, None
        token = str(body.get("token", ""))
        fields = {k: v[0] for k, v in parse_qs(token.removeprefix("SharedAccessSignature ")).items()}
        self.handed_out += [token, fields.get("sig", token)]
        try:
            assert verify_sas(token, self.keys[device])["sr"] == f"{HUB}/devices/{device}"
        except (AssertionError, KeyError):
            return 200, f"{request_id}: the token does not verify for {device}"
        return 200, None


class Audit:
    """The module's audit log, read as it grows: complete lines only, each checked once."""

    def __init__(self, path: Path, fixed_secrets: list[str]) -> None:
        self.path, self.fixed_secrets = path, fixed_secrets
        self.offset = 0
        self.lines = 0
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.problems: list[str] = []

    def read(self, handed_out: list[str]) -> None:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            whole = chunk[:chunk.rfind(b"\n") + 1]  # a batch being written is read once it ends
            self.offset += len(whole)
        for raw in whole.decode(errors="replace").splitlines():
            self.lines += 1
            where = f"audit line {self.lines}"
            if any(s in raw for s in (*self.fixed_secrets, *handed_out)):
                self.problems.append(f"{where}: contains a secret")
            try:
                record = json.loads(raw)
            except ValueError:
                self.problems.append(f"{where}: not JSON (partial?): {raw[:80]!r}")
                continue
            if not isinstance(record, dict) or set(record) != AUDIT_FIELDS or record["outcome"] not in OUTCOMES:
                self.problems.append(f"{where}: not a whole record: {raw[:120]!r}")
                continue
            self.records.setdefault(str(record["requestId"]), []).append(record)

    def expect(self, requests: list[tuple[str, str, int | None]], handed_out: list[str]) -> None:
        """Each request (id, device, status answered) has its record, saying what was answered."""
        end = time.monotonic() + AUDIT_DEADLINE
        while True:
            self.read(handed_out)
            missing = [r for r in requests if r[2] is not None and r[0] not in self.records]
            if not missing or time.monotonic() > end:
                break
            time.sleep(0.1)
        for rid, device, status in requests:
            if status is None:
                continue  # no answer (the module was being killed): nothing is promised
            records = self.records.get(rid, [])
            if not records:
                self.problems.append(f"{rid} (answered {status}): no audit record within {AUDIT_DEADLINE:g} s")
                continue
            first = records[0]
            outcome = "allowed" if status == 200 else "error"
            if (first["status"], first["outcome"], first["device"], first["principal"], first["operation"]) != (
                    status, outcome, device, PRINCIPAL, "sas-token"):
                self.problems.append(f"{rid} (answered {status}): recorded as {json.dumps(first)}")
            if status == 200 and len(records) > 1:
                self.problems.append(f"{rid} (answered 200): also recorded as {json.dumps(records[1:])}")

    def whole(self) -> bool:
        """The file ends with a newline: no record left half-written."""
        with self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def token_settled(hsm: Any) -> str | None:
    """None once the token holds one complete generation and at most one incomplete one (the next
    renewal's, begun); else what it holds when TOKEN_DEADLINE has passed."""
    end = time.monotonic() + TOKEN_DEADLINE
    while True:
        gens = renewal.generations(hsm, BASE)
        if sum(g.complete for g in gens) == 1 and len(gens) <= 2:
            return None
        if time.monotonic() > end:
            return f"the token holds {[(g.label, g.complete) for g in gens]} {TOKEN_DEADLINE:g} s after the renewal"
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def renewed(emu: Emulator) -> list[dict[str, Any]]:
    return [t.json() for t in list(emu.received.telemetry)
            if t.device_id == REG and t.properties.get("type") == "certificate-renewed"]


def renewal_state(emu: Emulator) -> dict[str, Any]:
    reported = emu.twin(REG)["reported"]
    return dict(reported.get("credentials", {}).get(twin_key(BASE), {}).get("renewal") or {})


def leaf_requests(api: Api, rng: random.Random, tag: str, n: int) -> tuple[list[tuple[str, str, int | None]],
                                                                           list[str]]:
    """n requests for random leaves: (request id, device, status) each, and the problems."""
    made, problems = [], []
    for i in range(n):
        device = f"leaf-{rng.randrange(LEAVES)}"
        rid = f"soak-{tag}-{i}"
        status, problem = api.sas(device, rid)
        made.append((rid, device, status))
        if problem:
            problems.append(problem)
    return made, problems


def inject(fault: str, emu: Emulator, module: Module, shim: Shim, api: Api, rng: random.Random,
           validity: float, tag: str) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """Inject the fault; the leaf requests made meanwhile and the problems seen."""
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
        time.sleep(rng.uniform(0, validity / 4))  # anywhere in the cycle
        module.kill()
        module.start()
    elif fault == "unplugged":
        time.sleep(rng.uniform(0, validity / 2))  # anywhere in the cycle
        away = rng.uniform(0.5, 0.6 * validity)  # now and then past the certificate's expiry
        back = time.monotonic() + away
        shim.set("unplugged")
        made, problems = leaf_requests(api, rng, tag + "-away", 1)
        answered_away = time.monotonic() < back
        time.sleep(max(0.0, back - time.monotonic()))
        shim.set("plugged")
        # Nothing can be signed while the token is away: a token answered then came from elsewhere.
        problems += [f"{rid}: answered 200 while the token was away" for rid, _, status in made
                     if status == 200 and answered_away]
        return made, problems
    return [], []


def quarter(samples: list[dict[str, Any]], key: str, last: bool) -> float:
    n = max(1, len(samples) // 4)
    part = samples[-n:] if last else samples[:n]
    return statistics.median(s[key] for s in part)


def fd_report(longest: list[dict[str, Any]]) -> None:
    """The longest-lived process's fd count along the run, and what it gained first to last."""
    step = max(1, len(longest) // 10)
    print(f"  fds along the process's {len(longest)} samples (every {step}): "
          f"{' '.join(str(s['fds']) for s in longest[::step])} ... {longest[-1]['fds']}")
    first, last = Counter(longest[0]["kinds"]), Counter(longest[-1]["kinds"])
    gained, lost = last - first, first - last
    for what, diff in (("gained", gained), ("closed", lost)):
        if diff:
            print(f"  fds {what} first sample -> last: " + "; ".join(f"{n} x {k}" for k, n in diff.most_common()))


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
    if not SHIM.exists():
        parser.error(f"{SHIM} is not built; run 'make shim'")
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
    keys = {f"leaf-{i}": secrets.token_bytes(32) for i in range(LEAVES)}
    for name, key in keys.items():
        hsm.import_secret_key(name, Secret(key))
    emu.add_individual_enrollment(REG, symmetric_key=base64.b64encode(raw).decode(), assigned_hub=HOST)
    bearer = secrets.token_urlsafe(24)
    port, health_port = free_port(), free_port()
    audit_file = root / "audit.log"
    config = root / "serve.yaml"
    config.write_text(
        f"hsm:\n  module: {SHIM}\n  token_label: {LABEL}\n  pin_file: {pin_file}\nstate_dir: {root / 'state'}\n"
        f"metrics:\n  enabled: false\ncloud:\n  server_ca_file: {pki.ca_file}\n  id_scope: {SCOPE}\n"
        f"  registration_id: {REG}\n  provisioning_host: {HOST}\n  attestation: symmetricKey\n"
        f"  key: {ONBOARDING}\n  issue_cert: {BASE}\n  renew_at: 0.5\n  renew_retry_initial: 1\n"
        f"  renew_retry_max: 4\n  registration_timeout: 5\n"
        f"service:\n  host: {HOST}\n  port: {port}\n  health_host: {HOST}\n  health_port: {health_port}\n"
        f"  tls_cert_file: {server.cert_file}\n  tls_key_file: {server.key_file}\n  hub: {HUB}\n"
        f"  bearer_tokens:\n    {PRINCIPAL}: {hashlib.sha256(bearer.encode()).hexdigest()}\n"
        f"  policy:\n    - principals: [{PRINCIPAL}]\n      operations: [sas-token]\n      devices: ['leaf-*']\n"
        f"  cache_reuse_fraction: 0\n  rate_limit_per_second: 0\n  audit_file: {audit_file}\n")
    shim = Shim(root / "shim.ctl")
    env = dict(os.environ, P11SHIM_CONTROL=str(shim.path), P11SHIM_TARGET=SOFTHSM)
    module = Module(config, env, root / "serve.log")
    api = Api(port, health_port, pki.ca_file, bearer, keys)
    pin = pin_file.read_text().strip()
    fixed_secrets = [pin, bearer, base64.b64encode(raw).decode(), raw.hex(),
                     *(base64.b64encode(k).decode() for k in keys.values()), *(k.hex() for k in keys.values())]
    audit = Audit(audit_file, fixed_secrets)
    module.start()
    drawn: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    durations: list[float] = []
    failures: list[str] = []
    stuck = None
    try:
        emu.wait_for(lambda: any(c.accepted for c in list(emu.received.connects) if c.client_id == REG), 60)
        for cycle in range(args.cycles):
            fault = rng.choice(faults)
            drawn[fault] = drawn.get(fault, 0) + 1
            target = len(renewed(emu)) + 1
            began = time.monotonic()
            made, problems = inject(fault, emu, module, shim, api, rng, args.validity, str(cycle + 1))
            try:
                emu.wait_for(lambda target=target: len(renewed(emu)) >= target, CYCLE_DEADLINE, interval=0.2)
            except Exception:
                stuck = f"cycle {cycle + 1} ({fault}): no renewal within {CYCLE_DEADLINE:g} s"
                break
            durations.append(time.monotonic() - began)
            ready_by = time.monotonic() + READY_DEADLINE
            while not api.ready() and time.monotonic() < ready_by:
                time.sleep(0.2)
            if not api.ready():
                problems.append(f"/readyz not 200 within {READY_DEADLINE:g} s of the renewal")
            after, after_problems = leaf_requests(api, rng, str(cycle + 1), REQUESTS_PER_CYCLE)
            problems += after_problems + [f"{rid}: answered {status} after the cycle" for rid, _, status in after
                                          if status not in (200, None)]
            made += after
            settled = token_settled(hsm)  # the soak's own session on the token, not through the shim
            if settled:
                problems.append(settled)
            audit.expect(made, api.handed_out)
            failures += [f"cycle {cycle + 1} ({fault}): {p}" for p in problems + audit.problems]
            audit.problems.clear()
            samples.append(module.sample())
            if (cycle + 1) % 10 == 0:
                last = {k: v for k, v in samples[-1].items() if k != "kinds"}
                print(f"  {cycle + 1} cycles, {module.starts - 1} restarts, {len(failures)} failures, "
                      f"last sample {last}", flush=True)
        emu.wait_for(lambda: renewal_state(emu).get("state") == "scheduled", 60, interval=0.2)
        state = renewal_state(emu)
    finally:
        code = module.stop()
        emu.stall_dps(False)
        shim.set("plugged")
    audit.read(api.handed_out)
    if not audit.whole():
        audit.problems.append("the audit log ends inside a record")
    failures += [f"at the end: {p}" for p in audit.problems]
    gens = renewal.generations(hsm, BASE)
    cred = x509_id.select(hsm, label=gens[-1].label) if gens and gens[-1].complete else None
    hsm.close()
    emu.stop()
    messages = renewed(emu)
    keys_seen = [m["publicKeySha256"] for m in messages]
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    longest = max(by_pid.values(), key=len) if by_pid else []
    log_text = (root / "serve.log").read_text(errors="replace")
    log_secrets = sum(s in log_text for s in (*fixed_secrets, *api.handed_out))

    print(f"soak: {len(durations)} of {args.cycles} cycles (seed {args.seed}, {args.validity:g} s certificates), "
          f"{module.starts - 1} restarts" + (f"; STOPPED: {stuck}" if stuck else ""))
    print(f"  faults drawn: {', '.join(f'{k} {v}' for k, v in sorted(drawn.items()))}")
    if durations:
        print(f"  seconds per cycle: median {statistics.median(durations):.1f}, worst {max(durations):.1f}")
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(api.statuses.items()))
    print(f"  leaf requests: {sum(api.statuses.values())} ({answers}); audit lines checked: {audit.lines}")
    if len(longest) >= 4:
        for key in ("threads", "fds", "sockets", "rss_kib"):
            print(f"  {key} (process with {len(longest)} samples): first quarter median "
                  f"{quarter(longest, key, False):g}, last quarter median {quarter(longest, key, True):g}")
        fd_report(longest)
    if samples:
        print(f"  fds first/last sample of the run: {samples[0]['fds']}/{samples[-1]['fds']}")
    print(f"  certificate-renewed messages: {len(messages)}, delivered twice: {len(keys_seen) - len(set(keys_seen))}")
    now = dt.datetime.now(dt.UTC)
    valid = cred is not None and cred.leaf.not_valid_after_utc > now
    print(f"  token at the end: {[(g.label, g.complete) for g in gens]}; in use valid: {valid}")
    print(f"  renewal state at the end: {json.dumps({k: state.get(k) for k in ('state', 'label', 'failures')})}")
    print(f"  exit code on SIGTERM: {code}; tracebacks in the log: {log_text.count('Traceback')}; "
          f"secrets in the log: {log_secrets}")
    print(f"  failures: {len(failures)}")
    for failure in failures[:20]:
        print(f"    {failure}")
    ok = (not stuck and len(gens) == 1 and gens[0].complete and valid and len(keys_seen) == len(set(keys_seen))
          and state.get("state") == "scheduled" and code == 0 and "Traceback" not in log_text
          and not failures and not log_secrets)
    print("  invariants: " + ("hold" if ok else f"BROKEN (log: {root / 'serve.log'})"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
