"""What the token can do (hsm/capabilities) and what key generation asks of it (templates):
decided without a token, from Capabilities values built here."""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, Mechanism, MechanismFlag
from pkcs11._pkcs11 import merge_templates
from pkcs11.attributes import AttributeMapper

from spyrus_hsm import config as config_mod
from spyrus_hsm.hsm import Capabilities, KeyAlgorithm, Need, SignAlgorithm, Unsupported
from spyrus_hsm.hsm.capabilities import MechanismSupport
from spyrus_hsm.hsm.templates import (
    GENERATED_PRIVATE_ATTRIBUTES,
    GENERATED_PUBLIC_ATTRIBUTES,
    GENERATED_PUBLIC_EC,
    GENERATED_PUBLIC_RSA,
    generated_pair_templates,
)
from spyrus_hsm.hsm.writes import only

SOFTHSM_LIKE = [Mechanism.SHA256_HMAC, Mechanism.EC_KEY_PAIR_GEN, Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                Mechanism.ECDSA, Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS, Mechanism.SHA256_RSA_PKCS_PSS,
                Mechanism.RSA_PKCS_PSS]
# tpm2-pkcs11 as found: no HMAC signing, hashed ECDSA only
TPM_LIKE = [Mechanism.EC_KEY_PAIR_GEN, Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.ECDSA_SHA256,
            Mechanism.ECDSA_SHA384, Mechanism.SHA256_RSA_PKCS, Mechanism.SHA256_RSA_PKCS_PSS]


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_generation_asks_only_for_what_the_key_needs(algorithm: KeyAlgorithm) -> None:
    public, private = generated_pair_templates(algorithm, "lbl", b"\x01\x02")
    extra = GENERATED_PUBLIC_EC if algorithm.is_ec else GENERATED_PUBLIC_RSA
    assert set(public) == GENERATED_PUBLIC_ATTRIBUTES | extra
    assert set(private) == GENERATED_PRIVATE_ATTRIBUTES
    assert Attribute.VERIFY not in public and Attribute.ENCRYPT not in public
    assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.SIGN] is True and private[Attribute.PRIVATE] is True
    assert public[Attribute.LABEL] == private[Attribute.LABEL] == "lbl"
    assert public[Attribute.ID] == private[Attribute.ID] == b"\x01\x02"


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_python_pkcs11_adds_nothing_of_its_own_to_the_generation_templates(algorithm: KeyAlgorithm) -> None:
    """What the token receives: python-pkcs11's own template (CKA_CLASS, the capability flags,
    ...) merged with ours, as its generate_keypair does, is exactly ours."""
    public, private = generated_pair_templates(algorithm, "lbl", b"\x01")
    mapper = AttributeMapper()
    for own, ours in ((mapper.public_key_template(capabilities=MechanismFlag(0xFFFFFFFF), id_=None, label=None,
                                                  store=False), public),
                      (mapper.private_key_template(capabilities=MechanismFlag(0xFFFFFFFF), id_=None, label=None,
                                                   store=False), private)):
        if not algorithm.is_ec:
            own.update({Attribute.PUBLIC_EXPONENT: b"\1\0\1", Attribute.MODULUS_BITS: 2048})
        assert merge_templates(own, only(ours)) == ours


def test_a_token_used_without_login_gets_no_private_objects() -> None:
    _, private = generated_pair_templates(KeyAlgorithm.EC_P256, "lbl", b"\x01", private=False)
    assert private[Attribute.PRIVATE] is False


def test_no_hmac_refuses_sas_keys_in_one_line_naming_the_mechanism_and_who_has_it() -> None:
    caps = Capabilities.of("tpm", TPM_LIKE)
    with pytest.raises(Unsupported) as err:
        caps.require(Need.HMAC_SHA256)
    assert str(err.value) == ("token 'tpm' has no CKM_SHA256_HMAC: SAS keys need a token that signs "
                              "HMAC-SHA256 and imports secret keys (SoftHSM2, a SPYRUS Rosetta)")
    assert "\n" not in str(err.value)


def test_a_missing_capability_is_a_configuration_error_exit_2() -> None:
    from spyrus_hsm.cli import EXIT_CODES, EXIT_USAGE

    assert EXIT_CODES[Unsupported.kind] == EXIT_USAGE


def test_ecdsa_hashes_here_with_raw_ecdsa_else_uses_the_tokens_hashed_mechanism() -> None:
    assert Capabilities.of("s", SOFTHSM_LIKE).ecdsa_mechanism(SignAlgorithm.ECDSA_SHA384) is Mechanism.ECDSA
    tpm = Capabilities.of("t", TPM_LIKE)
    assert tpm.ecdsa_mechanism(SignAlgorithm.ECDSA_SHA256) is Mechanism.ECDSA_SHA256
    assert tpm.ecdsa_mechanism(SignAlgorithm.ECDSA_SHA384) is Mechanism.ECDSA_SHA384
    only256 = Capabilities.of("o", [Mechanism.ECDSA_SHA256])
    assert only256.has(Need.ECDSA_SHA256) and not only256.has(Need.ECDSA_SHA384)
    assert only256.missing(Need.ECDSA_SHA384) == ("token 'o' has neither CKM_ECDSA nor CKM_ECDSA_SHA384: "
                                                  "ECDSA-SHA384 signatures need a token that signs ECDSA "
                                                  "(with either)")


def test_rsa_prefers_the_tokens_hashing_mechanism_then_the_raw_one() -> None:
    assert Capabilities.of("s", SOFTHSM_LIKE).rsa_mechanism(SignAlgorithm.RSA_PKCS1_SHA256) is Mechanism.SHA256_RSA_PKCS
    raw = Capabilities.of("r", [Mechanism.RSA_PKCS, Mechanism.RSA_PKCS_PSS])
    assert raw.rsa_mechanism(SignAlgorithm.RSA_PKCS1_SHA256) is Mechanism.RSA_PKCS
    assert raw.rsa_mechanism(SignAlgorithm.RSA_PSS_SHA256) is Mechanism.RSA_PKCS_PSS
    assert "CKM_SHA256_RSA_PKCS_PSS" in (Capabilities.of("n", []).missing(Need.RSA_PSS_SHA256) or "")


def test_generation_needs_the_mechanism_flag_and_the_key_size() -> None:
    sign_only = Capabilities("t", {Mechanism.EC_KEY_PAIR_GEN: MechanismSupport(int(MechanismFlag.SIGN)),
                                   Mechanism.ECDSA: MechanismSupport(int(MechanismFlag.SIGN))})
    assert "CKM_EC_KEY_PAIR_GEN for P-256" in (sign_only.missing(Need.EC_P256_GENERATE) or "")
    gen = int(MechanismFlag.GENERATE_KEY_PAIR)
    small = Capabilities("t", {Mechanism.EC_KEY_PAIR_GEN: MechanismSupport(gen, 256, 256),
                               Mechanism.RSA_PKCS_KEY_PAIR_GEN: MechanismSupport(gen, 1024, 1024)})
    assert small.has(Need.EC_P256_GENERATE) and not small.has(Need.EC_P384_GENERATE)
    assert not small.has(Need.RSA_2048_GENERATE)
    in_bytes = Capabilities("t", {Mechanism.EC_KEY_PAIR_GEN: MechanismSupport(gen, 32, 66)})
    assert in_bytes.has(Need.EC_P384_GENERATE)  # sizes stated in bytes are not judged
    with pytest.raises(Unsupported, match="CKM_EC_KEY_PAIR_GEN for P-384: ec-p384 keys"):
        small.require(*Need.to_generate(KeyAlgorithm.EC_P384))


def test_the_table_says_yes_no_and_assumed() -> None:
    rows = {r.capability: r for r in Capabilities.of("t", TPM_LIKE, login_required=False, max_sessions=16).table()}
    assert rows["HMAC-SHA256 sign (SAS keys)"].status == "no"
    assert rows["secret key import (SAS keys)"].status == "no"
    assert rows["EC P-384 generation"].status == "yes"
    assert rows["ECDSA-SHA256 sign"].detail == "CKM_ECDSA_SHA256 (hashed by the token)"
    assert rows["certificate objects"].status == "assumed"
    assert rows["login required"].status == "no"
    assert rows["max sessions"].status == "16"
    soft = {r.capability: r for r in Capabilities.of("s", SOFTHSM_LIKE).table()}
    assert soft["secret key import (SAS keys)"].status == "assumed"
    assert soft["ECDSA-SHA384 sign"].detail == "CKM_ECDSA (raw; hashed here)"
    assert soft["max sessions"].status == "no limit"


def _config(tmp_path, text: str) -> config_mod.Config:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text("hsm:\n  module: /m.so\n  token_label: t\n  pin_file: /p\n" + text)
    return config_mod.load(str(path), env={})


def test_a_configuration_names_what_its_keys_need(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, "cloud:\n  hub: h.example\n  device_id: d\n  key: dev\n"
                            "  id_scope: 0ne\n  registration_id: r\n  issue_cert: op\n")
    needs = config_mod.token_needs(cfg)
    assert ("cloud.key (symmetricKey attestation)", Need.HMAC_SHA256) in needs
    assert ("cloud.issue_cert", Need.EC_P384_GENERATE) in needs
    tpm = Capabilities.of("tpm", TPM_LIKE)
    unmet = [setting for setting, need in needs if tpm.missing(need)]
    assert unmet == ["cloud.key (symmetricKey attestation)"]
    assert config_mod.tls_key_needs(KeyAlgorithm.EC_P256) is Need.ECDSA_SHA256
    assert config_mod.tls_key_needs(KeyAlgorithm.RSA_2048) is Need.RSA_PSS_SHA256


def test_x509_attestation_needs_no_hmac(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, "cloud:\n  id_scope: 0ne\n  registration_id: r\n  attestation: x509\n  key: cred\n")
    assert config_mod.token_needs(cfg) == []
