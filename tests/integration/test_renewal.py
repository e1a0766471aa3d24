"""Renewal of the operational certificate with a fresh HSM key (key rotation), end to end: real
SoftHSM2, pkcs11-provider and `spyrus-hsm serve` against tests/emulator, whose DPS issues
certificates that live a few seconds."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import addresses
import pytest
from cloud_harness import Serve, sas_enrollment, serve_config
from token_matrix import HMAC_IMPORT, needs

from spyrus_hsm.cloud import renewal
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner
from spyrus_hsm.edge.reported import twin_key
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.identity import x509 as x509_id

pytestmark = pytest.mark.timeout(240)
HOST = addresses.host()
SCOPE = "0ne000RE4E"


def _cloud(reg: str, key: str, base: str, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(id_scope=SCOPE, registration_id=reg, provisioning_host=HOST,
                                    attestation="symmetricKey", key=key, issue_cert=base, renew_at=0.5,
                                    renew_retry_initial=1, renew_retry_max=4, registration_timeout=10)
    return {**settings, **extra}


def _enrolled_module(hsm, token_env, emu, emulator_pki, tmp_path: Path, reg: str, label: str,  # type: ignore[no-untyped-def]
                     validity: float, **cloud: Any) -> tuple[Serve, Path]:
    """`serve` with the operational certificate `<label>-op` onboarded by the HSM key `label`,
    DPS issuing certificates valid `validity` seconds."""
    sas_enrollment(hsm, emu, reg, label, HOST)
    emu.issued_validity = validity
    config = serve_config(tmp_path / "serve.yaml", token_env, tmp_path / "state", emulator_pki.ca_file,
                          **_cloud(reg, label, label + "-op", **cloud))
    return Serve(token_env, config), config


def _renewed(emu, reg: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The certificate-renewed messages the module sent on each new connection."""
    return [t.json() for t in list(emu.received.telemetry)
            if t.device_id == reg and t.properties.get("type") == "certificate-renewed"]


def _hub_connects(emu, reg: str) -> list[Any]:  # type: ignore[no-untyped-def]
    return [c for c in list(emu.received.connects) if c.client_id == reg and c.service == "hub"]


def _generations(hsm: Hsm, base: str) -> list[renewal.Generation]:
    return renewal.generations(hsm, base)


def _renewal_state(emu, reg: str, base: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    reported = emu.twin(reg)["reported"]
    return dict(reported.get("credentials", {}).get(twin_key(base), {}).get("renewal") or {})


def _private_key_files(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()]


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_serve_renews_a_20_s_certificate_three_times_each_with_a_new_key(
        hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "rn-" + label, label + "-op"
    serve, _ = _enrolled_module(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, validity=20)
    started = time.monotonic()
    timeline: list[str] = []
    try:
        emu.wait_for(lambda: any(c.accepted for c in _hub_connects(emu, reg)), timeout=30)
        timeline.append(f"{time.monotonic() - started:5.1f} s  connected with '{base}'")
        for n in range(1, 4):
            emu.wait_for(lambda n=n: len(_renewed(emu, reg)) >= n, timeout=60)  # type: ignore[misc]
            timeline.append(f"{time.monotonic() - started:5.1f} s  renewal {n}: {_renewed(emu, reg)[n - 1]['label']}")
        emu.wait_for(lambda: _renewal_state(emu, reg, base).get("state") == "scheduled"
                     and _renewal_state(emu, reg, base)["label"] == _renewed(emu, reg)[-1]["label"], timeout=20)
        state = _renewal_state(emu, reg, base)
    finally:
        code = serve.stop()
    durations = [line.split(" done in ")[1].split(":")[0]
                 for line in serve.output().splitlines() if " done in " in line]
    print("\n".join(["renewal timeline:", *timeline, f"each renewal took {', '.join(durations)}"]))
    assert code == 0, serve.output()
    events = _renewed(emu, reg)
    assert [e["label"] for e in events[:3]] == [f"{base}@2", f"{base}@3", f"{base}@4"]
    assert len({e["publicKeySha256"] for e in events}) == len(events)  # a new key every time
    connects = _hub_connects(emu, reg)
    assert all(c.accepted and c.auth_method == "x509" for c in connects), connects
    assert len(connects) == 1 + len(events)  # one reconnect per renewal, no more
    assert state["state"] == "scheduled" and state["failures"] == 0 and "error" not in state  # null: deleted
    # Exactly one operational key pair and its chain are left: the newest.
    left = _generations(hsm, base)
    assert [(g.label, sorted(g.types)) for g in left] == [(events[-1]["label"], ["cert", "private", "public"])]
    private = hsm.find(events[-1]["label"], "private")[0]
    assert private.sensitive is True and private.extractable is False
    assert _private_key_files(tmp_path) == []
    assert "Traceback" not in serve.output()


def test_a_refused_renewal_keeps_the_old_certificate_reports_why_and_recovers(
        hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "rf-" + label, label + "-op"
    # due at 12 s; the registration timeout is shorter than the retry-after DPS asks for, so the
    # 429 ends the attempt at once and the next one waits the 6 s asked for.
    serve, _ = _enrolled_module(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, validity=40,
                                renew_at=0.3, registration_timeout=5)
    try:
        emu.wait_for(lambda: any(c.accepted for c in _hub_connects(emu, reg)), timeout=30)
        emu.throttle_dps(times=1, status=401)
        emu.throttle_dps(times=1, retry_after=6, status=429)
        emu.wait_for(lambda: len(_renewed(emu, reg)) >= 1, timeout=60)
        emu.wait_for(lambda: _renewal_state(emu, reg, base).get("state") == "scheduled"
                     and _renewal_state(emu, reg, base).get("lastSuccess") is not None, timeout=20)
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
    patches = [p.patch["credentials"][twin_key(base)]["renewal"] for p in list(emu.received.reported_patches)
               if p.device_id == reg and twin_key(base) in p.patch.get("credentials", {})]
    failed = [p for p in patches if p["state"] == "failed"]
    assert [p["failures"] for p in failed] == [1, 2], patches
    assert "401" in failed[0]["error"] and "throttling" in failed[1]["error"] and "6 s" in failed[1]["error"]
    for p in failed:  # the next attempt is reported, after the backoff (and after DPS's retry-after); the
        # times are whole seconds and the first backoff is 0.5-1 s: the same second is possible
        assert dt.datetime.fromisoformat(p["nextAttempt"]) >= dt.datetime.fromisoformat(p["lastAttempt"])
    second = dt.datetime.fromisoformat(failed[1]["nextAttempt"]) - dt.datetime.fromisoformat(failed[1]["lastAttempt"])
    assert second >= dt.timedelta(seconds=5)
    assert patches[-1]["state"] == "scheduled" and patches[-1]["failures"] == 0 and patches[-1]["error"] is None
    assert patches[-1]["lastSuccess"]
    # The old certificate stayed in use through both failures: one connection until the renewal.
    connects = _hub_connects(emu, reg)
    assert len(connects) == 2 and all(c.accepted for c in connects)
    assert [g.label for g in _generations(hsm, base)] == [f"{base}@2"]
    assert [r.status_code for r in list(emu.received.registrations) if r.registration_id == reg] == [202, 401, 429, 202]


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_kill_at_any_renewal_step_leaves_a_usable_credential_and_no_orphans(
        step, hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = f"rk{step}-" + label, label + "-op"
    serve, config = _enrolled_module(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, validity=8)
    try:
        if step == 2:  # hold it inside the DPS registration: the new key exists, its certificate not yet
            serve.wait_line("step 1/4", timeout=60)
            emu.stall_dps(True)
        serve.wait_line(f"step {step}/4", timeout=60)
    finally:
        serve.kill()
    emu.stall_dps(False)
    left_behind = [(g.label, sorted(g.types)) for g in _generations(hsm, base)]
    emu.issued_validity = 3600  # the restarted module settles on a long-lived certificate
    connects_before = len(_hub_connects(emu, reg))
    restarted = Serve(token_env, config)
    began = time.monotonic()
    try:
        emu.wait_for(lambda: any(c.accepted for c in _hub_connects(emu, reg)[connects_before:]), timeout=30)
        reconnect = time.monotonic() - began
        emu.wait_for(lambda: _renewal_state(emu, reg, base).get("state") == "scheduled"
                     and _lives_long(_renewal_state(emu, reg, base)), timeout=60)
    finally:
        code = restarted.stop()
    print(f"killed at step {step}: token held {left_behind}; connected again after {reconnect:.1f} s")
    assert code == 0, restarted.output()
    left = _generations(hsm, base)
    assert len(left) == 1 and left[0].complete, left  # one credential, nothing half-made
    cred = x509_id.select(hsm, label=left[0].label)
    assert cred.leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
    assert "Traceback" not in restarted.output()


def _lives_long(state: dict[str, Any]) -> bool:
    not_after = state.get("notAfter")
    return bool(not_after) and dt.datetime.fromisoformat(not_after) > dt.datetime.now(dt.UTC) + dt.timedelta(
        minutes=10)


def test_renew_once_cleans_up_after_itself_and_after_an_interrupted_attempt(
        hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "ro-" + label, label + "-op"
    sas_enrollment(hsm, emu, reg, label, HOST)
    prov = Provisioner(hsm, tmp_path)
    request = DpsRequest(SCOPE, reg, HOST, "symmetricKey", label, server_ca_pem=emulator_pki.ca_pem,
                         issue_cert=base)
    with pytest.raises(Exception, match="nothing to renew"):
        renewal.renew_once(hsm, prov, request, base, lambda cred, a: None, timeout=20)
    prov.register(request, timeout=20)
    first = renewal.require_current(hsm, base)

    def refuse(cred: x509_id.X509Credential, assignment: Any) -> None:
        raise ConnectionRefusedError("the hub refused the new certificate")

    with pytest.raises(ConnectionRefusedError):
        renewal.renew_once(hsm, prov, request, base, refuse, timeout=20)
    assert [g.label for g in _generations(hsm, base)] == [base]  # the failed generation is gone
    assert renewal.require_current(hsm, base) == first
    # What a crash between key generation and storage leaves: a key pair without certificate.
    from spyrus_hsm.identity import issued as issued_id
    issued_id.operational_key(hsm, f"{base}@2")
    moved: list[str] = []
    second = renewal.renew_once(hsm, prov, request, base, lambda cred, a: moved.append(cred.label),
                                timeout=20).credential
    assert moved == [second.label] == [f"{base}@2"]
    assert [g.label for g in _generations(hsm, base)] == [f"{base}@2"]
    assert second.leaf.public_key() != first.leaf.public_key()


def _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment of a `spyrus-hsm` command with a config whose cloud section onboards `reg`."""
    sas_enrollment(hsm, emu, reg, label, HOST)
    config = serve_config(tmp_path / "c.yaml", token_env, tmp_path / "state", emulator_pki.ca_file,
                          **_cloud(reg, label, base))
    return token_env.env(SPYRUS_HSM_CONFIG=str(config))  # type: ignore[no-any-return]


def _register(cli, env, emulator_pki, reg: str, label: str, base: str) -> None:  # type: ignore[no-untyped-def]
    assert cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label, "--provisioning-host",
               HOST, "--server-ca", str(emulator_pki.ca_file), "--issue-cert", base, env=env).code == 0


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_renew_command_renews_only_when_due_unless_forced(
        cli, hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "rc-" + label, label + "-op"
    env = _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base)
    res = cli("renew", "--label", base, env=env)
    assert res.code == 1 and "nothing to renew" in res.err and "--issue-cert" in res.err, res.err
    _register(cli, env, emulator_pki, reg, label, base)
    res = cli("renew", "--label", base, env=env)
    assert res.code == 0, res.err
    assert json.loads(res.out)["renewed"] is False and "not due for renewal until" in res.err
    connects = len(_hub_connects(emu, reg))
    res = cli("renew", "--label", base, "--force", env=env)
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["renewed"] is True and out["label"] == f"{base}@2" and out["previous"] == base
    assert out["subject"] == f"CN={reg}" and out["notAfter"]
    assert len(_hub_connects(emu, reg)) == connects + 1  # the new certificate was proven on the hub
    assert [g.label for g in _generations(hsm, base)] == [f"{base}@2"]


def test_renew_command_whose_new_certificate_the_hub_refuses_says_so_in_one_line(
        cli, hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "rr-" + label, label + "-op"
    env = _cli_env(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, base)
    _register(cli, env, emulator_pki, reg, label, base)
    emu.refuse_hub(1)
    res = cli("renew", "--label", base, "--force", env=env)
    assert res.code == 1, res.err
    assert "Traceback" not in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert res.err.startswith("spyrus-hsm:") and HOST in res.err and "refused" in res.err, res.err
    assert [g.label for g in _generations(hsm, base)] == [base]  # the old credential stays, the new one is gone


def test_serve_whose_hub_refuses_the_credential_says_so_in_one_line_and_carries_on(
        hsm, provider, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, base = "sr-" + label, label + "-op"
    emu.refuse_hub(1)  # the first connect at start ...
    emu.refuse_hub(1, new_certificates=True)  # ... and the move to the renewed certificate (only that: neither
    # the retry nor a reconnect with the certificate in use can take this refusal)
    serve, _ = _enrolled_module(hsm, token_env, emu, emulator_pki, tmp_path, reg, label, validity=30)
    try:
        at = serve.wait_line("cloud connection failed", timeout=60)
        emu.wait_for(lambda: any(c.accepted for c in _hub_connects(emu, reg)), timeout=30)  # then retried
        emu.wait_for(lambda: _renewal_state(emu, reg, base).get("state") == "failed", timeout=60)
        failed = _renewal_state(emu, reg, base)
        emu.wait_for(lambda: _renewal_state(emu, reg, base).get("lastSuccess") is not None, timeout=60)
    finally:
        code = serve.stop()
    output = serve.output()
    assert code == 0, output
    assert "Traceback" not in output, output
    line = output.splitlines()[at]
    assert f"IoT Hub {HOST} ({reg}) refused the credential" in line, line
    assert f"IoT Hub {HOST} ({reg}) refused the credential" in failed["error"], failed
    assert failed["label"] == base  # the old certificate stayed in use ...
    assert [g.label for g in _generations(hsm, base)] == [f"{base}@2"]  # the refused @2 discarded, made again
