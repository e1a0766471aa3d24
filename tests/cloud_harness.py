"""`spyrus-hsm serve` as a subprocess with the module's own cloud identity, against the emulator:
a symmetric-key DPS enrollment whose key is in the test token, the config file, and the process
with its log lines read as they come (so a test can act on one, e.g. SIGKILL at a step)."""

from __future__ import annotations

import base64
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from spyrus_hsm.hsm import Hsm, Secret


def sas_enrollment(hsm: Hsm, emu: Any, reg: str, label: str, host: str) -> None:
    """A device key imported into the HSM under `label`, enrolled in DPS for `reg`."""
    raw = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(raw))
    emu.add_individual_enrollment(reg, symmetric_key=base64.b64encode(raw).decode(), assigned_hub=host)


def serve_config(path: Path, token_env: Any, state_dir: Path, ca_file: Path, **cloud: Any) -> Path:
    """A config with the test token and a `cloud` section (values as given, YAML-quoted)."""
    lines = [f"hsm:\n  module: {token_env.module}\n  token_label: {token_env.label}\n"
             f"  pin_file: {token_env.pin_file}\nstate_dir: {state_dir}\ncloud:\n  server_ca_file: {ca_file}\n"]
    lines += [f"  {key}: {value!r}\n" if isinstance(value, str) else f"  {key}: {value}\n"
              for key, value in cloud.items()]
    path.write_text("".join(lines))
    return path


class Serve:
    """`spyrus-hsm -v --config FILE serve`; stderr collected line by line."""

    def __init__(self, token_env: Any, config: Path, **env: str) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spyrus_hsm", "-v", "--config", str(config), "serve"],
            env=token_env.env(SPYRUS_HSM_CONFIG=str(config), **env), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()

    def wait_line(self, text: str, timeout: float, after: int = 0) -> int:
        """The index of the first line from `after` on that contains `text`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{self.output()}")
                self._changed.wait(min(remaining, 0.5))

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed if it does not stop within 15 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode
