"""The CLI with two tokens configured (docs/two-tokens.md): every command works on one token, the
first by default and the second with --token second; selftest checks one; token compare lists
what each lacks, and with --provision makes on the token that lacks them what needs no person
(key pairs born in a token, the operational certificate DPS issues, authenticated by the other
token's onboarding key); serve refuses --token; configurations two tokens cannot serve yet are refused in
one line."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import addresses
import pytest
from cryptography.x509.oid import NameOID

from spyrus_hsm import config as config_mod
from spyrus_hsm.cloud import renewal
from spyrus_hsm.hsm import KeyAlgorithm, Secret


def _config(tmp_path: Path, token_env: Any, second: Any, **extra: Any) -> Path:
    hsm = {"module": token_env.module, "token_label": token_env.label, "pin_file": str(token_env.pin_file),
           "second_token_label": second.label, "second_pin_file": str(second.pin_file)}
    data = {"hsm": hsm, "state_dir": str(tmp_path / "state"), **extra}
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(data))
    return path


def test_commands_work_on_the_token_named_and_compare_lists_what_each_lacks(
        tmp_path: Path, token_env: Any, second_token: Any, cli: Any) -> None:
    path = str(_config(tmp_path, token_env, second_token))
    env = token_env.env(SPYRUS_HSM_CONFIG=path)
    label = "dev-" + secrets.token_hex(3)
    first = cli("key", "import-sas", "--label", label, "--key-file", "-", stdin=secrets.token_bytes(32).hex().encode()
                + b"\n", env=env)
    assert first.code == 0, first.err
    listed = cli("list", "--json", env=env)
    assert json.loads(listed.out)["token"] == token_env.label
    assert label in listed.out
    second = cli("--token", "second", "list", "--json", env=env)
    assert second.code == 0, second.err
    assert json.loads(second.out)["token"] == second_token.label and label not in second.out
    compared = cli("token", "compare", env=env)
    assert compared.code == 1, compared.err
    assert f"token '{second_token.label}'" in compared.out and f"{label} (secret-key)" in compared.out
    both = cli("--token", "second", "key", "import-sas", "--label", label, "--key-file", "-",
               stdin=secrets.token_bytes(32).hex().encode() + b"\n", env=env)
    assert both.code == 0, both.err
    compared = cli("token", "compare", env=env)
    assert f"{label} (secret-key)" not in compared.out
    check = cli("--token", "second", "selftest", env=env)
    assert f"token '{second_token.label}'" in check.out, check.out
    default = cli("selftest", env=env)
    assert "--token second selftest" in default.out and f"token '{token_env.label}'" in default.out
    for text in (compared.out + compared.err, check.out + check.err):
        assert token_env.pin.decode() not in text and second_token.pin.decode() not in text


def test_token_second_without_a_second_token_and_serve_with_token_are_refused(
        tmp_path: Path, token_env: Any, cli: Any) -> None:
    result = cli("--token", "second", "list")
    assert result.code == 2 and "no second token is configured" in result.err
    assert "Traceback" not in result.err
    result = cli("--token", "first", "serve")
    assert result.code == 2 and "serve uses every configured token" in result.err


def test_two_tokens_with_an_operational_certificate_issued_through_dps_load(
        tmp_path: Path, token_env: Any, second_token: Any) -> None:
    """Nothing is refused with two tokens any more: cloud.issue_cert gives each token its own."""
    cloud = {"id_scope": "0ne", "registration_id": "r", "key": "k", "issue_cert": "op"}
    path = _config(tmp_path, token_env, second_token, cloud=cloud)
    cfg = config_mod.load(str(path), env={})
    assert cfg.hsm.two_tokens and cfg.cloud.issue_cert == "op"


def test_a_second_token_that_is_the_first_is_refused(tmp_path: Path, token_env: Any) -> None:
    path = tmp_path / "same.yaml"
    path.write_text(json.dumps({"hsm": {"token_label": "a", "second_token_label": "a"}}))
    with pytest.raises(config_mod.ConfigError, match="select the same token"):
        config_mod.load(str(path), env={})


# --- token compare --provision ---------------------------------------------------------------

HOST = addresses.host()
SCOPE = "0ne0002PR0V"


def _pair_config(tmp_path: Path, token_env: Any, pair: Any, **extra: Any) -> dict[str, str]:
    path = _config(tmp_path, token_env, pair.second, **extra)
    data = json.loads(path.read_text())
    data["hsm"].update(token_label=pair.first.label, pin_file=str(pair.first.pin_file))
    path.write_text(json.dumps(data))
    return token_env.env(SPYRUS_HSM_CONFIG=str(path))


def _no_pin(pair: Any, *results: Any) -> None:
    for result in results:
        for pin in (pair.first.pin.decode(), pair.second.pin.decode()):
            assert pin not in result.out and pin not in result.err


def test_provision_generates_on_the_token_that_lacks_them_the_key_pairs_born_in_the_other(
        tmp_path: Path, token_env: Any, fresh_pair: Any, cli: Any) -> None:
    a, b = fresh_pair.first_hsm, fresh_pair.second_hsm
    ec_label, rsa_label = "ec-" + secrets.token_hex(3), "rsa-" + secrets.token_hex(3)
    a.generate_keypair(ec_label, KeyAlgorithm.EC_P256)
    a.generate_keypair(rsa_label, KeyAlgorithm.RSA_2048)
    env = _pair_config(tmp_path, token_env, fresh_pair)
    result = cli("token", "compare", "--provision", env=env)
    assert result.code == 0, result.out + result.err
    assert f"{ec_label} (private)" in result.out  # what B lacked, listed first
    assert f"generated ec-p256 key pair '{ec_label}'" in result.out, result.out
    assert f"generated rsa-2048 key pair '{rsa_label}'" in result.out, result.out
    assert "both tokens hold the same labels" in result.out
    for label, algorithm in ((ec_label, KeyAlgorithm.EC_P256), (rsa_label, KeyAlgorithm.RSA_2048)):
        assert b.key_algorithm(label) == algorithm
        assert b.public_key(label).public_numbers() != a.public_key(label).public_numbers()
    again = cli("token", "compare", "--provision", env=env)
    assert again.code == 0, again.out + again.err
    assert "generated" not in again.out and "lacks" not in again.out
    _no_pin(fresh_pair, result, again)


def test_provision_refused_with_one_token(tmp_path: Path, token_env: Any, cli: Any) -> None:
    result = cli("token", "compare", "--provision")
    assert result.code == 2, result.out + result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--provision needs a second token" in lines[0], result.err
    assert token_env.pin.decode() not in result.out + result.err


def test_provision_has_dps_issue_the_blank_token_its_operational_certificate_with_the_survivors_key(
        tmp_path: Path, token_env: Any, fresh_pair: Any, cli: Any, emu: Any, emulator_pki: Any) -> None:
    a, b = fresh_pair.first_hsm, fresh_pair.second_hsm
    reg, onboarding = "pair-prov-" + secrets.token_hex(3), "onboard-" + secrets.token_hex(3)
    base = onboarding + "-op"
    primary, secondary = secrets.token_bytes(32), secrets.token_bytes(32)
    a.import_secret_key(onboarding, Secret(primary))  # only token A: B is the blank replacement
    emu.add_individual_enrollment(reg, symmetric_key=base64.b64encode(primary).decode(),
                                  secondary_key=base64.b64encode(secondary).decode(), assigned_hub=HOST)
    ca_file = tmp_path / "server-ca.pem"
    ca_file.write_text(emulator_pki.ca_pem)
    cloud = {"id_scope": SCOPE, "registration_id": reg, "provisioning_host": HOST, "attestation": "symmetricKey",
             "key": onboarding, "issue_cert": base, "server_ca_file": str(ca_file), "registration_timeout": 20}
    env = _pair_config(tmp_path, token_env, fresh_pair, cloud=cloud)
    result = cli("token", "compare", "--provision", env=env)
    assert result.code == 1, result.out + result.err  # the onboarding key B lacks stays with a person
    assert f"DPS issued operational certificate '{base}'" in result.out, result.out + result.err
    assert f"authenticated with token '{fresh_pair.first.label}'" in result.out, result.out
    assert f"lacks secret key '{onboarding}'" in result.out
    assert f"spyrus-hsm --token second key import-sas --label {onboarding} --key-file -" in result.out
    assert any(r.registration_id == reg for r in list(emu.received.registrations))
    # B (read once the command has exited) holds its own key and certificate, issued for the registration.
    generation = renewal.current(b, base)
    assert generation is not None and renewal.generation_of(base, generation.label)
    assert b.find(generation.label, "private")
    leaf = generation.leaf
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == reg
    assert leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Emulator DPS Issuing CA"
    assert not b.find(onboarding, "secret-key")
    # A, which held no operational certificate either, got its own with its own key.
    assert "authenticated with its own onboarding credential" in result.out
    own = renewal.current(a, base)
    assert own is not None and own.leaf != leaf
    assert len({r.registration_id for r in list(emu.received.registrations)} & {reg}) == 1
    _no_pin(fresh_pair, result)
    assert base64.b64encode(primary).decode() not in result.out + result.err
