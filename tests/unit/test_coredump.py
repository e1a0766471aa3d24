"""No core dump of `serve`, the process holding the API's in-memory TLS key, a logged-in token
session and the PIN: it is non-dumpable (prctl PR_SET_DUMPABLE 0) and its core size limit is 0,
soft and hard.

Whether another process is dumpable is not in /proc/<pid>/status, but the kernel shows it in
the owner of that file: a dumpable process's /proc files belong to its own uid and gid, a
non-dumpable one's to root. So `serve` runs here as uid 0 (it can still open the test token)
with gid 65534, and its /proc/<pid>/status must belong to gid 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_harness import wait_for_lines

from emulator.pki import EmulatorPki

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
NOBODY = 65534

PROBE = """
import json, resource, sys
from spyrus_hsm import coredump
before = [coredump.dumpable(), resource.getrlimit(resource.RLIMIT_CORE)]
if sys.argv[1] == "serve":  # the serve command's own entry, stopped by a usage error once it has begun
    from spyrus_hsm.cli.common import UsageError
    from spyrus_hsm.cli.parser import build_parser
    args = build_parser().parse_args(["--config", sys.argv[2], "serve"])
    try:
        args.func(args, None)
    except UsageError:
        pass
else:
    coredump.disable()
print(json.dumps({"before": before, "after": [coredump.dumpable(), resource.getrlimit(resource.RLIMIT_CORE)]}))
"""


def probe(*argv: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_disable_makes_the_process_non_dumpable_with_a_zero_core_limit() -> None:
    seen = probe("function")
    assert seen["before"][0] is True  # what the test would otherwise see
    assert seen["after"] == [False, [0, 0]]


def test_the_serve_command_disables_core_dumps_before_anything_else(tmp_path: Path) -> None:
    config = tmp_path / "no-pin.yaml"  # serve stops at once: it needs a PIN file
    config.write_text(yaml.safe_dump({"hsm": {"module": "/nonexistent.so", "token_label": "x"},
                                      "state_dir": str(tmp_path / "state")}))
    env_pin = os.environ.pop("SPYRUS_HSM_PIN_FILE", None)
    try:
        seen = probe("serve", str(config))
    finally:
        if env_pin is not None:
            os.environ["SPYRUS_HSM_PIN_FILE"] = env_pin
    assert seen["after"] == [False, [0, 0]]


def test_a_running_serve_is_non_dumpable_and_may_not_dump_core(
        token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run serve with another group")
    server = emulator_pki.server([HOST])
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "hsm": {"module": token_env.module, "token_label": token_env.label, "pin_file": str(token_env.pin_file)},
        "state_dir": str(tmp_path / "state"),
        "service": {"host": HOST, "port": 0, "health_port": 0, "tls_cert_file": str(server.cert_file),
                    "tls_key_file": str(server.key_file)},
    }))
    err_file = tmp_path / "serve.err"
    with err_file.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                                env=token_env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                group=NOBODY, extra_groups=[])
    try:
        try:
            wait_for_lines(proc, ("API on https://",), 60)
        except AssertionError:
            raise AssertionError(err_file.read_text()[-3000:]) from None
        status = Path(f"/proc/{proc.pid}/status")
        gids = next(line for line in status.read_text().splitlines() if line.startswith("Gid:")).split()[1:]
        assert gids[0] == str(NOBODY)  # the process's own group, not its /proc files' group:
        assert status.stat().st_gid == 0, "serve is dumpable: its /proc files belong to its own group"
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        core = next(line for line in limits if line.startswith("Max core file size")).split()
        assert core[4:6] == ["0", "0"], core  # soft and hard
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
