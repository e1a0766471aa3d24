"""Shared fixtures: a real SoftHSM2 token created for this test run in a temporary directory.

A PKCS#11 module is loaded once per process and SoftHSM reads SOFTHSM2_CONF when it is
initialised, so one token directory serves the whole pytest process; tests use unique labels.
Tests marked `shim` run in a second pytest process (see the Makefile) in which every PKCS#11
access goes through tests/p11shim (fault injection) instead of SoftHSM directly. Tests marked
`token_matrix` run once more in a third process with SPYRUS_TEST_TOKEN=tpm2, on a tpm2-pkcs11
token over a software TPM (tests/tpm_rig.py, tests/token_matrix.py) instead of SoftHSM2.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import addresses
import pytest
import token_matrix

from emulator.fixtures import emulator_pki, make_emulator, sdk_clients  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
# SPYRUS_SHIM_LIBRARY: a shim built elsewhere than the Makefile's .build/ (e.g. a private build).
SHIM = Path(os.environ.get("SPYRUS_SHIM_LIBRARY") or ROOT / ".build" / "libp11shim.so")
VIA_SHIM = os.environ.get("SPYRUS_TEST_VIA_SHIM") == "1"


@dataclass
class TokenEnv:
    root: Path
    conf: Path
    module: str
    label: str
    so_pin_file: Path
    pin_file: Path
    config_file: Path
    control_file: Path | None
    token: str = "softhsm2"  # which kind of token (tests/token_matrix.py)

    @property
    def pin(self) -> bytes:
        return self.pin_file.read_bytes().strip()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"SOFTHSM2_CONF": str(self.conf), "SPYRUS_HSM_CONFIG": str(self.config_file)})
        env.update(extra)
        return env

    def set_shim(self, **settings: object) -> None:
        """Write the shim's control file (state=unplugged|plugged, sign_delay_ms=N)."""
        assert self.control_file is not None, "this test needs the shim (mark it 'shim')"
        text = "".join(f"{k}={v}\n" for k, v in settings.items())
        tmp = self.control_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.control_file)


def _write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shim: runs with the PKCS#11 fault-injection shim")
    config.addinivalue_line("markers", "token_matrix: runs on every token of tests/token_matrix.py, "
                            "each in a pytest process of its own (SPYRUS_TEST_TOKEN)")


@pytest.fixture(autouse=True)
def _machine_pcscd_released() -> Iterator[None]:
    """After each test (and its fixtures' teardown): give up this machine's pcscd if the test took
    it (tests/pcsc_rig.py), so that another test session may use it meanwhile."""
    yield
    rig = sys.modules.get("pcsc_rig")
    if rig is not None:
        rig.release_machine_pcscd()


@pytest.fixture(autouse=True)
def _shared_hsm_answers_after_a_shim_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a shim test (it may have unplugged the token, and with it the sessions of the
    session's shared pool): the token plugged back and the shared pool answering again before the
    next test uses it (a stale session is noticed only by the next operation, which then fails)."""
    yield
    if "shim" not in request.keywords or not VIA_SHIM:
        return
    import asyncio

    from waiting import wait_for

    env = request.getfixturevalue("token_env")
    env.set_shim(state="plugged")
    shared = request.getfixturevalue("hsm")

    def answers() -> bool:
        try:
            asyncio.run(shared.aprobe(timeout=2.0))
        except Exception:  # the first one after an unplug fails and starts the reconnection
            return False
        return True

    wait_for(answers, 30, "the shared HSM pool answering after a shim test", every=0.1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Keep the two groups apart: each needs its own process (see module docstring).
    skip_other = pytest.mark.skip(reason="runs in the other pytest process (shim / not shim)")
    not_this_token = pytest.mark.skip(
        reason=f"runs on SoftHSM2 only: SPYRUS_TEST_TOKEN={token_matrix.TOKEN} runs the token_matrix tests")
    for item in items:
        if ("shim" in item.keywords) != VIA_SHIM:
            item.add_marker(skip_other)
        elif token_matrix.TOKEN != "softhsm2" and "token_matrix" not in item.keywords:
            item.add_marker(not_this_token)


@pytest.fixture(scope="session")
def address_block() -> addresses.AddressBlock:
    """This session's loopback addresses (see tests/addresses.py): ``address_block.host()`` for
    a server of a test's own, ``address_block.port(host)`` for a port number it must be told."""
    return addresses.block()


@pytest.fixture(scope="session")
def token_env(tmp_path_factory: pytest.TempPathFactory, address_block: addresses.AddressBlock) -> Iterator[TokenEnv]:
    if token_matrix.TOKEN == "tpm2":
        yield from _tpm2_token_env(tmp_path_factory, address_block)
        return
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = true\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    control = None
    module = SOFTHSM
    if VIA_SHIM:
        if not SHIM.exists():
            pytest.fail(f"{SHIM} is not built; run 'make shim'")
        control = root / "shim.control"
        control.write_text("state=plugged\n")
        os.environ["P11SHIM_CONTROL"] = str(control)
        os.environ["P11SHIM_TARGET"] = SOFTHSM
        module = str(SHIM)
    label = "test-" + secrets.token_hex(3)
    so_pin_file = _write_secret(root / "so.pin", "so-" + secrets.token_hex(8))
    pin_file = _write_secret(root / "user.pin", "pin-" + secrets.token_hex(8))
    config_file = root / "config.yaml"
    config_file.write_text(
        f"hsm:\n  module: {module}\n  token_label: {label}\n  pin_file: {pin_file}\n"
        f"  call_timeout: 5\nstate_dir: {root / 'state'}\n")
    from spyrus_hsm.hsm import Secret
    from spyrus_hsm.hsm.provision import init_token

    init_token(module, label, Secret(so_pin_file.read_bytes().strip()),
               Secret(pin_file.read_bytes().strip()))
    yield TokenEnv(root, conf, module, label, so_pin_file, pin_file, config_file, control)


def _tpm2_token_env(tmp_path_factory: pytest.TempPathFactory,
                    address_block: addresses.AddressBlock) -> Iterator[TokenEnv]:
    """The token on tpm2-pkcs11 over a software TPM (tests/tpm_rig.py), started for this process
    and stopped at its end; its variables go into os.environ, so every child process (the
    `spyrus-hsm` commands, serve) reaches the same token."""
    import tpm_rig

    if VIA_SHIM:
        pytest.fail("SPYRUS_TEST_TOKEN=tpm2 does not combine with SPYRUS_TEST_VIA_SHIM=1")
    root = tmp_path_factory.mktemp("tpm2")
    host = address_block.host()
    rig = tpm_rig.TpmRig(root, host, address_block.port(host), address_block.port(host))
    try:
        rig.start()
    except tpm_rig.RigError as e:
        rig.stop()
        pytest.fail(f"the software TPM token could not be made: {e}")
    try:
        os.environ.update(rig.env)
        conf = root / "softhsm2.conf"  # read by no one here; kept so that TokenEnv.env() is the same
        conf.write_text("")
        label = "test-" + secrets.token_hex(3)
        so_pin_file = _write_secret(root / "so.pin", "so-" + secrets.token_hex(8))
        pin_file = _write_secret(root / "user.pin", "pin-" + secrets.token_hex(8))
        rig.add_token(label, pin_file.read_text().strip(), so_pin_file.read_text().strip())
        config_file = root / "config.yaml"
        config_file.write_text(
            f"hsm:\n  module: {rig.module}\n  token_label: {label}\n  pin_file: {pin_file}\n"
            f"  call_timeout: 5\nstate_dir: {root / 'state'}\n")
        yield TokenEnv(root, conf, rig.module, label, so_pin_file, pin_file, config_file, None, "tpm2")
    finally:
        rig.stop()


@dataclass(frozen=True)
class SecondToken:
    """A second token beside the session's, in the same SoftHSM2 token directory (two tokens:
    docs/two-tokens.md)."""
    label: str
    pin_file: Path

    @property
    def pin(self) -> bytes:
        return self.pin_file.read_bytes().strip()


@pytest.fixture(scope="session")
def second_token(token_env: TokenEnv) -> SecondToken:
    if token_env.token != "softhsm2":
        pytest.skip("two tokens are tested on SoftHSM2 (one tokendir, two tokens)")
    from spyrus_hsm.hsm import Secret
    from spyrus_hsm.hsm.provision import init_token

    label = token_env.label + "-b"
    pin_file = _write_secret(token_env.root / "user-b.pin", "pin-b-" + secrets.token_hex(8))
    init_token(token_env.module, label, Secret(token_env.so_pin_file.read_bytes().strip()),
               Secret(pin_file.read_bytes().strip()))
    return SecondToken(label, pin_file)


@dataclass(frozen=True)
class FreshPair:
    """Two tokens made for one test, with a logged-in pool on each (to provision them)."""
    first: SecondToken
    second: SecondToken
    first_hsm: Any
    second_hsm: Any


@pytest.fixture
def fresh_pair(token_env: TokenEnv) -> Iterator[FreshPair]:
    """Two new tokens for one `serve` on two tokens. A token another serve process logged in to
    earlier in the session, then provisioned from this process, was sometimes read by the next
    serve as uninitialised or renumbered (SoftHSM2 sharing a token directory between processes);
    tokens of their own keep each such test apart."""
    from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, TokenSelector
    from spyrus_hsm.hsm.provision import init_token

    if token_env.token != "softhsm2":
        pytest.skip("two tokens are tested on SoftHSM2 (one tokendir, two tokens)")
    tag = secrets.token_hex(3)
    made = []
    for name in ("a", "b"):
        pin_file = _write_secret(token_env.root / f"pair-{tag}-{name}.pin", f"pin-{name}-" + secrets.token_hex(8))
        token = SecondToken(f"pair-{tag}-{name}", pin_file)
        init_token(token_env.module, token.label, Secret(token_env.so_pin_file.read_bytes().strip()),
                   Secret(token.pin))
        made.append(token)
    pools = [Hsm(PoolSettings(token_env.module, TokenSelector(t.label), workers=2, call_timeout=5.0),
                 Secret(t.pin)).start(wait=True) for t in made]
    try:
        yield FreshPair(made[0], made[1], pools[0], pools[1])
    finally:
        for pool in pools:
            pool.close()


@pytest.fixture
def second_hsm(second_token: SecondToken, token_env: TokenEnv) -> Iterator[object]:
    """The second token, logged in (to provision what `serve` on both tokens finds there)."""
    from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, TokenSelector

    h = Hsm(PoolSettings(token_env.module, TokenSelector(second_token.label), workers=2, call_timeout=5.0),
            Secret(second_token.pin)).start(wait=True)
    yield h
    h.close()


@pytest.fixture(scope="session")
def hsm(token_env: TokenEnv) -> Iterator[object]:
    from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, TokenSelector

    settings = PoolSettings(token_env.module, TokenSelector(token_env.label), workers=4,
                            call_timeout=5.0, retry_min=0.1, retry_max=0.5)
    h = Hsm(settings, Secret(token_env.pin)).start(wait=True)
    yield h
    h.close()


@pytest.fixture
def label() -> str:
    return "k-" + secrets.token_hex(4)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(token_env: TokenEnv):  # type: ignore[no-untyped-def]
    """Run the real `spyrus-hsm` command in a subprocess against the test token."""

    def run(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> CliResult:
        proc = subprocess.run(
            [sys.executable, "-m", "spyrus_hsm", *args],
            input=stdin if stdin is not None else b"", capture_output=True,
            env=env or token_env.env(), timeout=timeout, check=False)
        return CliResult(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    return run
