"""`spyrus-hsm selftest` on X.509 credentials: a certificate stored beside an HSM key is fine
while young, a warning (exit status unchanged) below 20 % of its lifetime left, and a failure
with what to do once expired. Each test uses a token of its own, so the certificates it stores
do not reach other tests' self-tests."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from emulator.pki import make_ca
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, PoolSettings, Secret, TokenSelector
from spyrus_hsm.hsm.provision import init_token

LABEL = "op-cert"


@pytest.fixture
def own_token(token_env) -> Iterator[tuple[str, Hsm]]:  # type: ignore[no-untyped-def]
    """A fresh token (same PINs as the session's) and a pool on it."""
    label = "st-" + secrets.token_hex(3)
    init_token(token_env.module, label, Secret(token_env.so_pin_file.read_bytes().strip()), Secret(token_env.pin))
    hsm = Hsm(PoolSettings(token_env.module, TokenSelector(label), workers=1, call_timeout=5.0),
              Secret(token_env.pin)).start(wait=True)
    yield label, hsm
    hsm.close()


def store_credential(hsm: Hsm, *, lifetime: dt.timedelta, elapsed: float) -> x509.Certificate:
    """An HSM key pair and a certificate for it from a test CA, `elapsed` (a fraction) of whose
    `lifetime` has passed now, stored beside the key with the CA."""
    hsm.generate_keypair(LABEL, KeyAlgorithm.EC_P256)
    ca = make_ca("Selftest CA")
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - lifetime * elapsed
    cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=device-1"))
            .issuer_name(ca.cert.subject).public_key(hsm.public_key(LABEL))
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + lifetime).sign(ca.key, hashes.SHA256()))
    hsm.import_certificates(LABEL, [cert, ca.cert])
    return cert


def selftest(cli, token_env, token_label: str, *extra: str) -> Any:  # type: ignore[no-untyped-def]
    res = cli("selftest", *extra, env=token_env.env(SPYRUS_HSM_TOKEN_LABEL=token_label))
    assert "Traceback" not in res.err, res.err
    return res


def credential_check(cli, token_env, token_label: str) -> tuple[int, dict[str, Any]]:  # type: ignore[no-untyped-def]
    res = selftest(cli, token_env, token_label, "--json")
    checks = {c["name"]: c for c in json.loads(res.out)["checks"]}
    assert f"credential {LABEL}" in checks, res.out
    return res.code, checks[f"credential {LABEL}"]


def until(cert: x509.Certificate) -> str:
    return f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


def test_a_fresh_certificate_passes_without_a_warning(cli, token_env, own_token) -> None:  # type: ignore[no-untyped-def]
    token_label, hsm = own_token
    # ten days, as DPS-issued operational certificates are short-lived: no fixed 30-day margin
    cert = store_credential(hsm, lifetime=dt.timedelta(days=10), elapsed=0.1)
    code, check = credential_check(cli, token_env, token_label)
    assert code == 0 and check["ok"] and not check["warning"], check
    assert until(cert) in check["detail"]
    res = selftest(cli, token_env, token_label)
    # the one WARN: this test's own token chosen by SPYRUS_HSM_TOKEN_LABEL over the shared config's
    warned = [ln for ln in res.out.splitlines() if ln.startswith(("WARN", "FAIL"))]
    assert res.code == 0 and [ln.split(":")[0] for ln in warned] == ["WARN hsm.token_label"], res.out


def test_a_certificate_at_90_percent_of_its_lifetime_warns_and_still_passes(  # type: ignore[no-untyped-def]
        cli, token_env, own_token) -> None:
    token_label, hsm = own_token
    cert = store_credential(hsm, lifetime=dt.timedelta(days=10), elapsed=0.9)
    code, check = credential_check(cli, token_env, token_label)
    assert code == 0 and check["ok"] and check["warning"], check
    assert LABEL in check["detail"] and until(cert) in check["detail"]
    res = selftest(cli, token_env, token_label)
    assert res.code == 0, res.out + res.err
    assert f"WARN credential {LABEL}: certificate of '{LABEL}' expires {until(cert)}" in res.out


def test_an_expired_certificate_fails_with_how_to_renew_it(cli, token_env, own_token) -> None:  # type: ignore[no-untyped-def]
    token_label, hsm = own_token
    cert = store_credential(hsm, lifetime=dt.timedelta(days=10), elapsed=1.2)
    code, check = credential_check(cli, token_env, token_label)
    assert code == 1 and not check["ok"], check
    res = selftest(cli, token_env, token_label)
    assert res.code == 1
    line = next(x for x in res.out.splitlines() if x.startswith(f"FAIL credential {LABEL}"))
    assert f"expired {until(cert)}" in line and f"--issue-cert {LABEL} --force" in line, line
    assert "cert import" in line


def api_tls_check(cli, token_env, token_label: str, tmp_path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    config = tmp_path / "service.yaml"
    config.write_text(token_env.config_file.read_text() + f"service:\n  tls_key_label: {LABEL}\n")
    res = cli("selftest", "--json", env=token_env.env(SPYRUS_HSM_TOKEN_LABEL=token_label,
                                                     SPYRUS_HSM_CONFIG=str(config)))
    assert "Traceback" not in res.err, res.err
    checks = {c["name"]: c for c in json.loads(res.out)["checks"]}
    assert "api tls" in checks, res.out
    return dict(checks["api tls"])


def test_an_issuing_service_certificate_is_reported_as_costing_no_signature_per_handshake(  # type: ignore[no-untyped-def]
        cli, token_env, own_token, emulator_pki, tmp_path) -> None:
    from service_harness import store_hsm_certificate

    token_label, hsm = own_token
    store_hsm_certificate(hsm, LABEL, emulator_pki, server_ip="127.0.0.1", issuing=True)
    check = api_tls_check(cli, token_env, token_label, tmp_path)
    assert check["ok"] and not check["warning"] and "no token signature per handshake" in check["detail"], check


def test_a_service_certificate_that_cannot_issue_warns_with_what_it_costs_and_how_to_move(  # type: ignore[no-untyped-def]
        cli, token_env, own_token, emulator_pki, tmp_path) -> None:
    from service_harness import store_hsm_certificate

    token_label, hsm = own_token
    store_hsm_certificate(hsm, LABEL, emulator_pki, server_ip="127.0.0.1")
    check = api_tls_check(cli, token_env, token_label, tmp_path)
    assert check["ok"] and check["warning"], check
    assert "cannot issue" in check["detail"] and "token signature" in check["detail"]
    assert "path-length-0 CA" in check["detail"]


def test_a_policy_rule_that_would_reach_reserved_keys_is_warned_about(  # type: ignore[no-untyped-def]
        cli, token_env, own_token, emulator_pki, tmp_path) -> None:
    """docs/service.md's old example: a gateway allowed `signature` on `line3-*`, with the
    default sas_key '{deviceId}' (so the line-3 devices' SAS keys match) and the API's key."""
    from service_harness import store_hsm_certificate

    token_label, hsm = own_token
    store_hsm_certificate(hsm, LABEL, emulator_pki, server_ip="127.0.0.1", issuing=True)
    hsm.import_secret_key("line3-press", Secret(secrets.token_bytes(32)))
    config = tmp_path / "service.yaml"
    config.write_text(token_env.config_file.read_text() + f"service:\n  tls_key_label: {LABEL}\n"
                      "  signing_keys: ['line3-*', 'op-*']\n  policy:\n"
                      "    - {principals: [gateway-3], operations: [signature], keys: ['line3-*', 'op-*']}\n")
    res = cli("selftest", env=token_env.env(SPYRUS_HSM_TOKEN_LABEL=token_label, SPYRUS_HSM_CONFIG=str(config)))
    assert "Traceback" not in res.err, res.err
    warnings = [line for line in res.out.splitlines() if line.startswith("WARN policy: ")]
    assert warnings == [
        "WARN policy: service.policy[0] keys pattern 'line3-*' matches reserved key(s) 'line3-press' (a device's "
        "SAS/DPS key): they are never used for caller-named signing",
        f"WARN policy: service.policy[0] keys pattern 'op-*' matches reserved key(s) '{LABEL}' (the API's TLS key "
        "(service.tls_key_label)): they are never used for caller-named signing",
        "WARN policy: service.signing_keys pattern 'line3-*' matches reserved key(s) 'line3-press' (a device's "
        "SAS/DPS key): they are never used for caller-named signing",
        f"WARN policy: service.signing_keys pattern 'op-*' matches reserved key(s) '{LABEL}' (the API's TLS key "
        "(service.tls_key_label)): they are never used for caller-named signing",
    ], res.out


def test_each_setting_that_picks_the_token_says_where_its_value_came_from(  # type: ignore[no-untyped-def]
        cli, token_env, own_token, tmp_path) -> None:
    """The deployment manifest's environment wins over the config file: selftest shows which
    value is used and where from, and warns that the file's hsm.module is not. (A token of its
    own: the session's holds other tests' expired credentials, which selftest fails on.)"""
    label, _ = own_token
    config = tmp_path / "config.yaml"
    config.write_text(f"hsm:\n  module: /opt/vendor-pkcs11/not-this-one.so\n  token_label: {label}\n"
                      f"  pin_file: {token_env.pin_file}\n  serial: true\nstate_dir: {tmp_path / 'state'}\n")
    res = cli("--config", str(config), "selftest",
              env=token_env.env(SPYRUS_HSM_PKCS11_MODULE=token_env.module, SPYRUS_HSM_CONFIG=""))
    assert res.code == 0, res.out + res.err
    lines = {ln.split(":", 1)[0].split()[-1]: ln for ln in res.out.splitlines()}
    assert lines["hsm.module"] == (f"WARN hsm.module: {token_env.module} (environment SPYRUS_HSM_PKCS11_MODULE; "
                                   "the file's '/opt/vendor-pkcs11/not-this-one.so' is not used)")
    assert lines["hsm.token_label"] == f"ok   hsm.token_label: {label} (file {config})"
    assert lines["hsm.token_serial"] == "ok   hsm.token_serial: not set (default)"
    assert lines["hsm.pin_file"] == f"ok   hsm.pin_file: {token_env.pin_file} (file {config})"
    assert lines["hsm.pcscd"] == "ok   hsm.pcscd: none (default)"
    assert lines["hsm.serial"] == f"ok   hsm.serial: true (file {config})"
    assert lines["login"].startswith(f"ok   login: token '{label}'")


def test_a_pin_file_given_on_the_command_line_is_shown_as_such(cli, token_env) -> None:  # type: ignore[no-untyped-def]
    res = cli("selftest", "--json", "--pin-file", str(token_env.pin_file))
    checks = {c["name"]: c for c in json.loads(res.out)["checks"]}
    assert checks["hsm.pin_file"]["detail"] == f"{token_env.pin_file} (command line --pin-file)"
    assert checks["hsm.module"]["detail"] == f"{token_env.module} (file {token_env.config_file})"
