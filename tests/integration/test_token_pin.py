"""The user PIN's life. A PIN the token refused is remembered on the state volume, so no later
process — `serve` after a restart, `selftest`, any CLI command — spends another of the token's
PIN tries on it. `token change-pin` and `token unblock-pin` change the PIN, clear that record and
say what else holds the PIN.

Each test makes a token of its own, so the tries it spends never touch the session's token.
SoftHSM2 shows a wrong login in the token's flags (CKF_USER_PIN_COUNT_LOW, set by a refused
C_Login, cleared by a successful one): the tests clear it with a good login of their own, then
check that nothing since tried a wrong PIN.
"""

from __future__ import annotations

import queue
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from spyrus_hsm.hsm import Secret, TokenSelector, library
from spyrus_hsm.hsm.provision import init_token
from spyrus_hsm.hsm.refusals import RECORD_NAME

CKF_USER_PIN_COUNT_LOW = 0x10000
WRONG = "wrong-" + secrets.token_hex(4)


@dataclass
class OwnToken:
    module: str
    label: str
    pin: str
    pin_file: Path
    state_dir: Path
    config: Path
    env: dict[str, str]


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def own(token_env, tmp_path: Path) -> OwnToken:  # type: ignore[no-untyped-def]
    """A token of this test's own, its PIN file holding a wrong PIN, and a config for it."""
    label = "rp-" + secrets.token_hex(3)
    pin = "pin-" + secrets.token_hex(6)
    init_token(token_env.module, label, Secret(token_env.so_pin_file.read_bytes().strip()), Secret(pin.encode()))
    (tmp_path / "so").write_bytes(token_env.so_pin_file.read_bytes())
    (tmp_path / "so").chmod(0o600)
    pin_file = _secret_file(tmp_path / "pin", WRONG)
    state_dir = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"hsm:\n  module: {token_env.module}\n  token_label: {label}\n  pin_file: {pin_file}\n"
        f"  call_timeout: 5\nstate_dir: {state_dir}\n"
        "service: {enabled: false}\nmetrics: {enabled: false}\nevents: {enabled: false}\n")
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
    for var in ("SPYRUS_HSM_PIN_FILE", "SPYRUS_HSM_TOKEN_LABEL", "IOTEDGE_MODULEID"):
        env.pop(var, None)
    return OwnToken(token_env.module, label, pin, pin_file, state_dir, config, env)


def _token(own: OwnToken):  # type: ignore[no-untyped-def]
    return library.find_token(library.load_module(own.module), TokenSelector(own.label))


def wrong_login_seen(own: OwnToken) -> bool:
    """Whether the token's last login attempt was refused (SoftHSM2's COUNT_LOW flag)."""
    return bool(_token(own).flags & CKF_USER_PIN_COUNT_LOW)


def good_login(own: OwnToken) -> None:
    """A successful login from this process, which clears the token's COUNT_LOW flag."""
    with _token(own).open(user_pin=own.pin):
        pass
    assert not wrong_login_seen(own)


def cli(own: OwnToken, *args: str, stdin: bytes = b"", secrets_in: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    for s in (own.pin, WRONG, *secrets_in):
        assert s not in " ".join(args), "a PIN on the command line"
    proc = subprocess.run([sys.executable, "-m", "spyrus_hsm", *args], input=stdin.decode(),
                          capture_output=True, text=True, env=own.env, timeout=120, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    for s in (own.pin, WRONG, *secrets_in):
        assert s not in proc.stdout + proc.stderr
    return proc


def serve_until_degraded(own: OwnToken) -> str:
    """`serve` until it logs that the HSM is not ready, then SIGTERM: what it logged."""
    proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "serve"], env=own.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=60)
            if line is None:
                pytest.fail("serve exited before saying the HSM is not ready:\n" + "".join(seen))
            seen.append(line)
            if "HSM degraded" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = "".join(seen)
    assert "Traceback" not in text and own.pin not in text and WRONG not in text, text
    return text


def test_a_refused_pin_is_not_tried_again_by_later_processes_until_the_pin_file_changes(own: OwnToken) -> None:
    first = cli(own, "selftest")
    assert first.returncode == 1 and "refused the PIN" in first.stdout, first.stdout + first.stderr
    assert wrong_login_seen(own)

    good_login(own)  # the token's flag now tells whether anyone tries the wrong PIN again
    outputs = []
    for args in (("selftest",), ("list",), ("sas", "--key", "k", "--uri", "h/devices/d"), ("selftest",)):
        res = cli(own, *args)
        assert res.returncode != 0
        outputs.append(res.stdout + res.stderr)
    outputs.append(serve_until_degraded(own))
    outputs.append(serve_until_degraded(own))  # a restart, as a crash loop would do
    assert not wrong_login_seen(own), "a later process tried the refused PIN"
    for out in outputs:
        assert f"refused the PIN in {own.pin_file} on " in out and "no PIN try was spent" in out, out

    _secret_file(own.pin_file, own.pin)  # the operator fixes the PIN file
    res = cli(own, "list")
    assert res.returncode == 0, res.stderr
    assert not (own.state_dir / RECORD_NAME).exists(), "a successful login clears the record"


def test_the_record_holds_no_pin_and_only_its_owner_may_read_it(own: OwnToken) -> None:
    assert cli(own, "list").returncode == 1
    record = own.state_dir / RECORD_NAME
    assert record.stat().st_mode & 0o777 == 0o600
    text = record.read_text()
    assert WRONG not in text and WRONG.encode().hex() not in text and own.label not in text


def test_a_pin_file_with_new_content_is_tried(own: OwnToken) -> None:
    assert cli(own, "list").returncode == 1
    good_login(own)
    _secret_file(own.pin_file, WRONG + "x")  # another PIN, wrong too: the token judges it
    res = cli(own, "list")
    assert res.returncode == 1 and "check the PIN file" in res.stderr, res.stderr
    assert wrong_login_seen(own)


def test_a_pin_on_standard_input_is_remembered_too(own: OwnToken) -> None:
    own.config.write_text(own.config.read_text().replace(f"  pin_file: {own.pin_file}\n", ""))
    assert cli(own, "list", stdin=f"{WRONG}\n".encode()).returncode == 1
    good_login(own)
    res = cli(own, "list", stdin=f"{WRONG}\n".encode())
    assert res.returncode == 1 and "refused the PIN given on standard input" in res.stderr, res.stderr
    assert not wrong_login_seen(own)


def test_an_unwritable_state_dir_is_said_once_and_the_login_goes_on_as_before(own: OwnToken, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    own.config.write_text(own.config.read_text().replace(str(own.state_dir), str(blocker / "state")))
    res = cli(own, "list")
    assert res.returncode == 1 and "check the PIN file" in res.stderr, res.stderr
    assert res.stderr.count("record of refused PINs") == 1, res.stderr
    _secret_file(own.pin_file, own.pin)
    assert cli(own, "list").returncode == 0


# --- token change-pin / unblock-pin ---------------------------------------------------------

def test_change_pin_takes_the_new_pin_from_a_file_and_names_what_else_holds_the_old_one(
        own: OwnToken, tmp_path: Path) -> None:
    _secret_file(own.pin_file, own.pin)
    new = "new-" + secrets.token_hex(6)
    new_file = _secret_file(tmp_path / "new", new)
    res = cli(own, "token", "change-pin", "--new-pin-file", str(new_file), secrets_in=(new,))
    assert res.returncode == 0, res.stderr
    assert f"changed the user PIN of token '{own.label}'" in res.stdout
    assert f"the PIN file {own.pin_file} still holds the old PIN" in res.stdout
    assert "/etc/aziot/config.toml" in res.stdout and "spyrus-hsm aziot-config" in res.stdout
    assert str(own.state_dir / RECORD_NAME) in res.stdout
    old = cli(own, "list", secrets_in=(new,))
    assert old.returncode == 1 and "refused the PIN" in old.stderr, "the old PIN is refused"
    assert cli(own, "list", "--pin-file", str(new_file), secrets_in=(new,)).returncode == 0


def test_change_pin_with_update_pin_file_rewrites_it_keeping_mode_0400(own: OwnToken) -> None:
    _secret_file(own.pin_file, own.pin)
    own.pin_file.chmod(0o400)
    new = "new-" + secrets.token_hex(6)
    res = cli(own, "token", "change-pin", "--update-pin-file", stdin=f"{new}\n".encode(), secrets_in=(new,))
    assert res.returncode == 0, res.stderr
    assert f"the PIN file {own.pin_file}: now holds the new PIN (mode 0400" in res.stdout
    assert own.pin_file.read_text() == new + "\n" and own.pin_file.stat().st_mode & 0o777 == 0o400
    assert cli(own, "list", secrets_in=(new,)).returncode == 0


def test_change_pin_clears_the_record_of_refused_pins(own: OwnToken, tmp_path: Path) -> None:
    assert cli(own, "list").returncode == 1  # the wrong PIN is recorded
    right = _secret_file(tmp_path / "right", own.pin)
    new = "new-" + secrets.token_hex(6)
    res = cli(own, "token", "change-pin", "--pin-file", str(right), stdin=f"{new}\n".encode(), secrets_in=(new,))
    assert res.returncode == 0, res.stderr
    assert "cleared" in res.stdout and not (own.state_dir / RECORD_NAME).exists()


def test_change_pin_does_not_try_an_old_pin_the_token_refused(own: OwnToken) -> None:
    new = "new-" + secrets.token_hex(6)
    first = cli(own, "token", "change-pin", stdin=f"{new}\n".encode(), secrets_in=(new,))
    assert first.returncode == 1 and "refused the PIN" in first.stderr, first.stderr
    good_login(own)
    again = cli(own, "token", "change-pin", stdin=f"{new}\n".encode(), secrets_in=(new,))
    assert again.returncode == 1 and "no PIN try was spent" in again.stderr, again.stderr
    assert not wrong_login_seen(own)


def test_update_pin_file_without_a_pin_file_is_a_usage_error(own: OwnToken) -> None:
    own.config.write_text(own.config.read_text().replace(f"  pin_file: {own.pin_file}\n", ""))
    res = cli(own, "token", "change-pin", "--update-pin-file", stdin=f"{own.pin}\nnew-1234\n".encode())
    assert res.returncode == 2 and "--update-pin-file needs the PIN file" in res.stderr, res.stderr


def test_unblock_pin_sets_a_new_pin_with_the_so_pin_and_clears_the_record(own: OwnToken, tmp_path: Path) -> None:
    assert cli(own, "list").returncode == 1  # the wrong PIN is recorded
    so = tmp_path / "so"
    new = "new-" + secrets.token_hex(6)
    res = cli(own, "token", "unblock-pin", "--so-pin-file", str(so), "--update-pin-file",
              stdin=f"{new}\n".encode(), secrets_in=(new, so.read_text().strip()))
    assert res.returncode == 0, res.stderr
    assert "tries are restored" in res.stdout and "cleared" in res.stdout
    assert own.pin_file.read_text() == new + "\n" and own.pin_file.stat().st_mode & 0o777 == 0o600
    assert cli(own, "list", secrets_in=(new,)).returncode == 0


def test_unblock_pin_with_a_wrong_so_pin_says_so(own: OwnToken, tmp_path: Path) -> None:
    so = _secret_file(tmp_path / "wrong-so", "so-wrong-" + secrets.token_hex(4))
    res = cli(own, "token", "unblock-pin", "--so-pin-file", str(so), stdin=b"new-12345678\n",
              secrets_in=(so.read_text().strip(),))
    assert res.returncode == 1 and "refused the SO PIN" in res.stderr, res.stderr
