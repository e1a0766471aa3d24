"""The CLI with two tokens configured (docs/two-tokens.md): every command works on one token, the
first by default and the second with --token second; selftest checks one; token compare lists
what each lacks; serve refuses --token; configurations two tokens cannot serve yet are refused in
one line."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from spyrus_hsm import config as config_mod


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
