"""The built container image, run for real with podman: a SoftHSM2 token made on the host and
mounted into the container, the module serving its HTTPS API as the non-root user, a SAS token
minted through the API from outside and checked in software with the device key, and a clean
exit within 10 s of SIGTERM.

Run by `make image-test` and `make image-test-arm64` (scripts/image-test.sh builds the image
and sets IMAGE, PODMAN and SPYRUS_IMAGE_ARCH).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

import addresses
import pytest
from waiting import wait_for

from emulator.pki import make_ca, make_server_cert

# Only from `make image-test`, which builds the image first and sets these variables.
pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("SPYRUS_IMAGE_TEST") != "1",
                       reason="container image test: run 'make image-test' (builds the image with podman)"),
]

UID = 10001                     # the image's user (Dockerfile.amd64)
TOKEN_LABEL = "demo"
DEVICE = "demo-device"
HUB = "demo-hub.example"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
START_TIMEOUT = 60.0


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [*shlex.split(os.environ.get("PODMAN", "podman")), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def free_port() -> int:
    """A port on 127.0.0.1 for podman to publish on: one of this test session's (tests/addresses.py)."""
    return addresses.port(addresses.LOOPBACK)


def owned_by_container_user(path: Path, mode: int) -> Path:
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


@dataclass
class Module:
    container: str
    port: int
    ca_file: Path
    bearer: str
    device_key: bytes

    def logs(self) -> str:
        proc = podman("logs", self.container, check=False)
        return (proc.stdout + proc.stderr)[-4000:]


def make_token(root: Path) -> bytes:
    """A SoftHSM2 token 'demo' holding the HMAC key 'demo-device', made with the host's CLI."""
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "host-softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    so_pin, pin = root / "so.pin", root / "user.pin"
    for f in (so_pin, pin):
        f.write_text(secrets.token_urlsafe(12) + "\n")
        f.chmod(0o600)
    device_key = secrets.token_bytes(32)
    key_file = root / "device.key"
    key_file.touch(mode=0o600)
    key_file.write_text(base64.b64encode(device_key).decode() + "\n")
    config = root / "host-config.yaml"
    config.write_text(f"hsm:\n  module: {SOFTHSM}\n  token_label: {TOKEN_LABEL}\n  pin_file: {pin}\n"
                      f"state_dir: {root / 'host-state'}\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "SPYRUS_HSM_CONFIG": str(config)}
    for args in (["token", "init", "--label", TOKEN_LABEL, "--so-pin-file", str(so_pin), "--pin-file", str(pin)],
                 ["key", "import-sas", "--label", DEVICE, "--key-file", str(key_file)]):
        proc = subprocess.run([sys.executable, "-m", "spyrus_hsm", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"spyrus-hsm {args[0]} {args[1]}: {proc.stderr}"
    key_file.unlink()
    so_pin.unlink()
    # The container user must own the token files (SoftHSM writes and locks them).
    for path in [tokens, *tokens.rglob("*")]:
        os.chown(path, UID, UID)
    return device_key


def write_module_files(root: Path, pin: Path) -> tuple[Path, Path, str]:
    """Files for /etc/spyrus-hsm: config, SoftHSM config, TLS chain and key. Returns the config
    directory, the CA file clients trust, and the bearer token."""
    etc = root / "etc"
    etc.mkdir()
    ca = make_ca("spyrus-hsm image-test CA")
    server = make_server_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], common_name="spyrus-hsm")
    (etc / "server-chain.pem").write_text(server.chain_pem)
    key = etc / "server.key"
    key.write_text(server.key_pem)
    owned_by_container_user(key, 0o400)
    ca_file = root / "ca.pem"
    ca_file.write_text(ca.cert_pem)
    bearer = secrets.token_urlsafe(24)
    digest = hashlib.sha256(bearer.encode()).hexdigest()
    (etc / "softhsm2.conf").write_text(
        "directories.tokendir = /srv/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    (etc / "config.yaml").write_text(f"""\
hsm:
  module: {SOFTHSM}
  token_label: {TOKEN_LABEL}
  pin_file: /run/secrets/spyrus-hsm-pin
state_dir: /var/lib/spyrus-hsm
service:
  host: 0.0.0.0
  port: 8443
  health_port: 8080
  tls_cert_file: /etc/spyrus-hsm/server-chain.pem
  tls_key_file: /etc/spyrus-hsm/server.key
  bearer_tokens:
    image-test: {digest}
  policy:
    - principals: ["image-test"]
      operations: ["sas-token"]
      devices: ["*"]
  hub: {HUB}
""")
    owned_by_container_user(pin, 0o400)
    return etc, ca_file, bearer


@pytest.fixture(scope="module")
def image() -> str:
    return os.environ["IMAGE"]


@pytest.fixture(scope="module")
def module(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Module]:
    root = tmp_path_factory.mktemp("image")
    device_key = make_token(root)
    etc, ca_file, bearer = write_module_files(root, root / "user.pin")
    port = free_port()
    name = "spyrus-hsm-image-test-" + secrets.token_hex(3)
    podman("run", "-d", "--name", name, *ULIMITS,
           "-p", f"127.0.0.1:{port}:8443",
           "-v", f"{etc}:/etc/spyrus-hsm:ro",
           "-v", f"{root / 'user.pin'}:/run/secrets/spyrus-hsm-pin:ro",
           "-v", f"{root / 'tokens'}:/srv/softhsm/tokens",
           "-e", "SOFTHSM2_CONF=/etc/spyrus-hsm/softhsm2.conf",
           image)
    mod = Module(name, port, ca_file, bearer, device_key)
    try:
        yield mod
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def wait_running(mod: Module, what: str, cond: Callable[[], object], within: float, every: float) -> float:
    """Seconds until `cond` held, failing (with the container's logs) if the container exits."""
    def running() -> None:
        state = podman("inspect", mod.container, "--format", "{{.State.Status}}").stdout.strip()
        if state != "running":
            pytest.fail(f"container is {state} before {what}; logs:\n{mod.logs()}")

    started = time.monotonic()
    try:
        wait_for(cond, within, what, every=every, alive=running)
    except AssertionError as exc:
        pytest.fail(f"{exc}; logs:\n{mod.logs()}")
    return time.monotonic() - started


def wait_until(mod: Module, what: str, *check: str) -> float:
    """Seconds until the podman command `check` succeeded, failing if the container exits."""
    return wait_running(mod, what, lambda: podman(*check, check=False).returncode == 0, START_TIMEOUT, 0.5)


def wait_healthy(mod: Module) -> float:
    """The image's own HEALTHCHECK (GET /healthz on 127.0.0.1:8080 inside the container)."""
    return wait_until(mod, "healthy", "healthcheck", "run", mod.container)


def wait_ready(mod: Module) -> float:
    """/readyz on the same loopback listener: the HSM is present and logged in."""
    readyz = ("import sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({}))"
              ".open('http://127.0.0.1:8080/readyz', timeout=4).status != 200)")
    return wait_until(mod, "ready", "exec", mod.container, "python3", "-c", readyz)


def post_sas_token(mod: Module, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    ctx = ssl.create_default_context(cafile=str(mod.ca_file))
    req = urllib.request.Request(
        f"https://127.0.0.1:{mod.port}/v1/sas-tokens", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {mod.bearer}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_image_has_no_compiler_and_no_test_tools(image: str) -> None:
    unwanted = json.dumps(["pytest", "hypothesis", "schemathesis", "mypy", "ruff", "pip", "setuptools"])
    script = ("for t in gcc cc c++ make; do command -v $t && exit 1; done; "
              "/opt/spyrus-hsm/bin/python -c 'import importlib.util as u, sys; "
              f"sys.exit(any(u.find_spec(m) for m in {unwanted}))'")
    proc = podman("run", "--rm", *ULIMITS, "--entrypoint", "sh", image, "-c", script, check=False)
    assert proc.returncode == 0, f"build tools or test packages in the image: {proc.stdout} {proc.stderr}"


def test_the_image_is_for_the_architecture_under_test(image: str) -> None:
    # `make image-test-arm64` runs these tests on the arm64 image under qemu: make sure they did.
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[os.environ.get("SPYRUS_IMAGE_ARCH", "amd64")]
    proc = podman("run", "--rm", *ULIMITS, "--entrypoint", "python3", image, "-c",
                  "import platform; print(platform.machine())")
    assert proc.stdout.strip() == machine, proc.stdout + proc.stderr


def test_the_module_runs_as_the_unprivileged_user_in_plugdev(image: str) -> None:
    proc = podman("run", "--rm", *ULIMITS, "--entrypoint", "id", image)
    out = proc.stdout
    assert f"uid={UID}" in out and "(plugdev)" in out and "(softhsm)" in out, out


def test_healthz_answers_through_the_images_healthcheck(module: Module) -> None:
    seconds = wait_healthy(module)
    print(f"healthy {seconds:.1f} s after start")


def test_selftest_in_the_container_passes(module: Module) -> None:
    wait_healthy(module)
    proc = podman("exec", module.container, "spyrus-hsm", "selftest", check=False)
    assert proc.returncode == 0, f"selftest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_a_sas_token_minted_through_the_api_verifies_with_the_device_key(module: Module) -> None:
    wait_ready(module)
    status, body = post_sas_token(module, {"deviceId": DEVICE, "hub": HUB, "ttlSeconds": 3600})
    assert status == 200, f"{status} {body}\nlogs:\n{module.logs()}"
    assert set(body) >= {"token", "resourceUri", "expiresOn"}, body
    token = str(body["token"])
    scheme, _, query = token.partition(" ")
    assert scheme == "SharedAccessSignature"
    fields = {k: v[0] for k, v in parse_qs(query).items()}
    assert fields["sr"] == body["resourceUri"] == f"{HUB}/devices/{DEVICE}"
    expiry = int(fields["se"])
    assert abs(expiry - (time.time() + 3600)) < 120
    signed = f"{quote(fields['sr'], safe='')}\n{expiry}".encode()
    expected = base64.b64encode(hmac.new(module.device_key, signed, hashlib.sha256).digest()).decode()
    assert hmac.compare_digest(fields["sig"], expected), "signature does not verify with the device key"


def test_a_request_without_the_bearer_token_is_refused(module: Module) -> None:
    wait_healthy(module)
    anonymous = Module(module.container, module.port, module.ca_file, "wrong-" + module.bearer, b"")
    status, _ = post_sas_token(anonymous, {"deviceId": DEVICE, "hub": HUB, "ttlSeconds": 3600})
    assert status == 401


def test_sigterm_stops_the_module_with_exit_code_0_within_10_seconds(module: Module) -> None:
    wait_healthy(module)
    started = time.monotonic()
    podman("stop", "-t", "10", module.container, timeout=30)
    elapsed = time.monotonic() - started
    code = podman("inspect", module.container, "--format", "{{.State.ExitCode}}").stdout.strip()
    print(f"stopped in {elapsed:.1f} s, exit code {code}")
    assert code == "0", f"exit code {code} after SIGTERM; logs:\n{module.logs()}"
    assert elapsed < 10
