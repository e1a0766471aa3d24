"""The leaf examples of docs/onboarding.md against a real service (its TLS key in the HSM with an
issuing certificate, the placement `make run` sets up), each getting a SAS token that verifies
with the leaf's key:

- examples/c-mbedtls/leaf.c on mbedTLS 2.28, built by the Makefile into .build/leaf_mbedtls
  (missing: a failure under `make test`, SPYRUS_TOOLS_REQUIRED=1, a named skip otherwise);
- examples/leaf_sas_token.py in a bare virtualenv holding only the `spyrus-hsm-leaf` distribution
  (leaf/pyproject.toml), installed with no package index: none of the module's dependencies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from service_harness import HOST, Leaf, ServiceHarness, new_leaf, store_hsm_certificate, verify_sas

from emulator.pki import EmulatorPki, PemFiles
from spyrus_hsm.hsm import Hsm

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
C_LEAF = ROOT / ".build" / "leaf_mbedtls"
RUN_TIMEOUT = 60
# what the module needs and a leaf must not: none of it may be in the leaf's virtualenv
MODULE_ONLY = ("pkcs11", "aiohttp", "opentelemetry", "cryptography", "asn1crypto", "yaml", "prometheus_client",
               "azure", "spyrus_hsm.hsm", "spyrus_hsm.service", "spyrus_hsm.config")


@dataclass
class Site:
    svc: ServiceHarness
    leaf: Leaf
    bearer_file: Path
    client: PemFiles


@pytest.fixture(scope="module")
def site(hsm: Hsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("leaf-examples")
    pki = EmulatorPki(directory / "pki")
    leaf = new_leaf(hsm, "onboarded")
    label = "api-" + leaf.name
    store_hsm_certificate(hsm, label, pki, server_ip=HOST, issuing=True)
    policy = [{"principals": ["{cn}"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    bearer_file = directory / "bearer.token"
    bearer_file.write_text(leaf.bearer + "\n")
    bearer_file.chmod(0o600)
    with ServiceHarness(hsm, directory, pki, policy=policy, bearer={leaf.name: leaf.bearer}, tls_key_label=label,
                        tls_cert_file=None, tls_key_file=None) as svc:
        yield Site(svc, leaf, bearer_file, pki.device(leaf.name))


def _c_leaf() -> str:
    if not C_LEAF.exists():
        message = "the C leaf example is missing: 'make unit' builds .build/leaf_mbedtls"
        if os.environ.get("SPYRUS_TOOLS_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return str(C_LEAF)


def _run_c(site: Site, *options: str, ca_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [_c_leaf(), *options, "-a", HOST, "-t", "1800",
           "localhost", str(site.svc.port), str(ca_file or site.svc.server_ca), site.leaf.name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert site.leaf.bearer not in done.stdout + done.stderr
    return done


def test_the_c_leaf_gets_a_sas_token_by_bearer_token_that_verifies(site: Site) -> None:
    done = _run_c(site, "-b", str(site.bearer_file))
    assert done.returncode == 0, done.stderr
    verify_sas(done.stdout.strip(), site.leaf.key)
    assert f"SAS token for {site.leaf.name}, valid for 1800 s" in done.stderr


def test_the_c_leaf_gets_a_sas_token_by_client_certificate(site: Site) -> None:
    done = _run_c(site, "-c", str(site.client.cert_file), "-k", str(site.client.key_file))
    assert done.returncode == 0, done.stderr
    verify_sas(done.stdout.strip(), site.leaf.key)


def test_the_c_leaf_refuses_a_service_its_ca_file_does_not_vouch_for(site: Site, tmp_path: Path) -> None:
    other = EmulatorPki(tmp_path / "other")
    done = _run_c(site, "-b", str(site.bearer_file), ca_file=other.ca_file)
    assert done.returncode == 2 and done.stdout == ""
    assert "was not verified" in done.stderr, done.stderr


def test_the_c_leaf_reports_the_services_refusal(site: Site, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text(secrets.token_urlsafe(32))
    done = _run_c(site, "-b", str(wrong))
    assert done.returncode == 3 and done.stdout == ""
    assert "HTTP 401" in done.stderr and "not recognised" in done.stderr, done.stderr


def test_the_python_leaf_runs_in_a_virtualenv_without_the_modules_dependencies(
        site: Site, tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build files; install with no index at all.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "leaf", source / "leaf")
    shutil.copytree(ROOT / "modules" / "spyrus_hsm", source / "modules" / "spyrus_hsm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_INDEX_URL")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source / "leaf")],
                   check=True, timeout=RUN_TIMEOUT, capture_output=True)
    wheel, = (tmp_path / "dist").glob("spyrus_hsm_leaf-*.whl")
    venv = tmp_path / "leaf-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_TIMEOUT, env=clean_env)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
                    str(wheel)], check=True, timeout=RUN_TIMEOUT, env=clean_env, capture_output=True)

    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    found = json.loads(subprocess.run([python, "-c", probe, *MODULE_ONLY], check=True, capture_output=True,
                                      text=True, timeout=RUN_TIMEOUT, env=clean_env, cwd=tmp_path).stdout)
    assert not [m for m, present in found.items() if present], found

    env = {**clean_env, "LEAF_SERVICE_URL": f"https://{HOST}:{site.svc.port}",
           "LEAF_TRUST_ANCHOR": str(site.svc.server_ca), "LEAF_DEVICE_ID": site.leaf.name,
           "LEAF_BEARER_TOKEN_FILE": str(site.bearer_file), "LEAF_TTL": "900"}
    done = subprocess.run([python, str(ROOT / "examples" / "leaf_sas_token.py")], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert site.leaf.bearer not in done.stdout + done.stderr
    verify_sas(done.stdout.strip(), site.leaf.key)
    assert "(in 900 s)" in done.stderr


def test_the_python_leaf_example_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAF_")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "leaf_sas_token.py")], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 1 and "set 'LEAF_SERVICE_URL'" in done.stderr
    assert "Traceback" not in done.stderr
