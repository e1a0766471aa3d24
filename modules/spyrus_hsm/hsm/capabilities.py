"""What the token can do, asked once per connection: its mechanisms (C_GetMechanismList and
C_GetMechanismInfo: the SIGN and GENERATE_KEY_PAIR flags, the key sizes) and its token
information (CKF_LOGIN_REQUIRED, ulMaxSessionCount).

An operation that needs a mechanism the token lacks is refused before it touches the token, in
one line naming the mechanism and what would provide it (`Capabilities.require`). Two things a
mechanism list cannot tell: whether the token stores secret keys given to it (C_CreateObject
of a CKO_SECRET_KEY, for SAS keys) and certificate objects; both are reported as assumed and
tried when used (a token that refuses says so then).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pkcs11 import Mechanism, MechanismFlag
from pkcs11.types import Token

from ..errors import Kind
from .algorithms import KeyAlgorithm, SignAlgorithm
from .errors import HsmError

# CK_EFFECTIVELY_INFINITE and CK_UNAVAILABLE_INFORMATION in CK_TOKEN_INFO's session counts
_NO_LIMIT = (0, (1 << 64) - 1, (1 << 32) - 1)

HMAC_PROVIDERS = "SoftHSM2, a SPYRUS Rosetta"


class Unsupported(HsmError, kind=Kind.CONFIG):
    """The token lacks a mechanism the operation (or the configuration) needs."""


@dataclass(frozen=True)
class MechanismSupport:
    """One mechanism as C_GetMechanismInfo describes it (key sizes in bits; 0: not stated)."""

    flags: int
    min_bits: int = 0
    max_bits: int = 0

    def can(self, flag: MechanismFlag, bits: int | None = None) -> bool:
        if not self.flags & flag:
            return False
        if bits is None or self.max_bits < 128:
            # no sizes, or sizes in bytes (some modules state EC sizes so): not judged by size
            return True
        return self.min_bits <= bits <= self.max_bits


class Need(enum.Enum):
    """What an operation needs of the token."""

    HMAC_SHA256 = "hmac-sha256"
    SECRET_IMPORT = "secret-import"  # noqa: S105 - storing a secret key given to it (SAS, derived keys)
    EC_P256_GENERATE = "ec-p256-generate"
    EC_P384_GENERATE = "ec-p384-generate"
    RSA_2048_GENERATE = "rsa-2048-generate"
    ECDSA_SHA256 = "ecdsa-sha256"
    ECDSA_SHA384 = "ecdsa-sha384"
    RSA_PKCS1_SHA256 = "rsa-pkcs1-sha256"
    RSA_PSS_SHA256 = "rsa-pss-sha256"

    @staticmethod
    def to_sign(algorithm: SignAlgorithm) -> Need:
        return _SIGN_NEEDS[algorithm]

    @staticmethod
    def to_generate(algorithm: KeyAlgorithm) -> tuple[Need, Need]:
        """Generating a key pair of `algorithm`, and signing with it (a key that cannot sign
        is of no use here)."""
        return _GENERATE_NEEDS[algorithm]


_SIGN_NEEDS = {
    SignAlgorithm.HMAC_SHA256: Need.HMAC_SHA256,
    SignAlgorithm.ECDSA_SHA256: Need.ECDSA_SHA256,
    SignAlgorithm.ECDSA_SHA384: Need.ECDSA_SHA384,
    SignAlgorithm.RSA_PKCS1_SHA256: Need.RSA_PKCS1_SHA256,
    SignAlgorithm.RSA_PSS_SHA256: Need.RSA_PSS_SHA256,
}
_GENERATE_NEEDS = {
    KeyAlgorithm.EC_P256: (Need.EC_P256_GENERATE, Need.ECDSA_SHA256),
    KeyAlgorithm.EC_P384: (Need.EC_P384_GENERATE, Need.ECDSA_SHA384),
    KeyAlgorithm.RSA_2048: (Need.RSA_2048_GENERATE, Need.RSA_PKCS1_SHA256),
}

# The mechanisms asked about (C_GetMechanismInfo), by the name the messages use.
MECHANISMS: dict[Mechanism, str] = {
    Mechanism.SHA256_HMAC: "CKM_SHA256_HMAC",
    Mechanism.EC_KEY_PAIR_GEN: "CKM_EC_KEY_PAIR_GEN",
    Mechanism.RSA_PKCS_KEY_PAIR_GEN: "CKM_RSA_PKCS_KEY_PAIR_GEN",
    Mechanism.ECDSA: "CKM_ECDSA",
    Mechanism.ECDSA_SHA256: "CKM_ECDSA_SHA256",
    Mechanism.ECDSA_SHA384: "CKM_ECDSA_SHA384",
    Mechanism.SHA256_RSA_PKCS: "CKM_SHA256_RSA_PKCS",
    Mechanism.RSA_PKCS: "CKM_RSA_PKCS",
    Mechanism.SHA256_RSA_PKCS_PSS: "CKM_SHA256_RSA_PKCS_PSS",
    Mechanism.RSA_PKCS_PSS: "CKM_RSA_PKCS_PSS",
}


@dataclass(frozen=True)
class Row:
    """One line of the capability table: what, yes / no / assumed, and by which mechanism."""

    capability: str
    status: str
    detail: str


@dataclass(frozen=True)
class Capabilities:
    """What one token offers. `mechanisms`: those of `MECHANISMS` the token lists."""

    token_label: str
    mechanisms: Mapping[Mechanism, MechanismSupport] = field(default_factory=dict)
    login_required: bool = True
    max_sessions: int | None = None  # None: the token states no limit
    # whether a secret key given to it is stored (a session object made and destroyed at
    # connection: no mechanism tells); None: not asked
    secret_import: bool | None = None

    @classmethod
    def of(cls, token_label: str, mechanisms: Iterable[Mechanism] = (), *, login_required: bool = True,
           max_sessions: int | None = None) -> Capabilities:
        """A token that offers `mechanisms` for everything (sign, generate), any key size."""
        every = MechanismFlag.SIGN | MechanismFlag.GENERATE_KEY_PAIR
        return cls(token_label, {m: MechanismSupport(every) for m in mechanisms},
                   login_required=login_required, max_sessions=max_sessions)

    def _can(self, mechanism: Mechanism, flag: MechanismFlag, bits: int | None = None) -> bool:
        support = self.mechanisms.get(mechanism)
        return support is not None and support.can(flag, bits)

    def _signs(self, mechanism: Mechanism) -> bool:
        return self._can(mechanism, MechanismFlag.SIGN)

    # --- how to sign ---------------------------------------------------------------------------

    def ecdsa_mechanism(self, algorithm: SignAlgorithm) -> Mechanism | None:
        """CKM_ECDSA over a digest made here (preferred: it needs nothing of the token's
        digests, which some modules stub), else the token's CKM_ECDSA_SHA256/384."""
        if self._signs(Mechanism.ECDSA):
            return Mechanism.ECDSA
        hashed = Mechanism.ECDSA_SHA256 if algorithm is SignAlgorithm.ECDSA_SHA256 else Mechanism.ECDSA_SHA384
        return hashed if self._signs(hashed) else None

    def rsa_mechanism(self, algorithm: SignAlgorithm) -> Mechanism | None:
        """The token's hashing mechanism (CKM_SHA256_RSA_PKCS[_PSS]), else the raw one over a
        digest made here."""
        hashed, raw = ((Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.RSA_PKCS_PSS)
                       if algorithm is SignAlgorithm.RSA_PSS_SHA256
                       else (Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS))
        return next((m for m in (hashed, raw) if self._signs(m)), None)

    # --- what is there ----------------------------------------------------------------------------

    def has(self, need: Need) -> bool:
        return self.missing(need) is None

    def missing(self, need: Need) -> str | None:
        """None when the token has what `need` takes; else the one line saying what is missing
        and what would provide it."""
        token = f"token '{self.token_label}'"
        gen = MechanismFlag.GENERATE_KEY_PAIR
        if need is Need.HMAC_SHA256:
            if self._signs(Mechanism.SHA256_HMAC):
                return None
            return (f"{token} has no CKM_SHA256_HMAC: SAS keys need a token that signs HMAC-SHA256 "
                    f"and imports secret keys ({HMAC_PROVIDERS})")
        if need is Need.SECRET_IMPORT:
            if self.secret_import is not False:
                return None
            return (f"{token} does not store secret keys given to it (C_CreateObject of a secret key is "
                    f"refused): SAS keys need a token that imports secret keys ({HMAC_PROVIDERS})")
        if need in (Need.EC_P256_GENERATE, Need.EC_P384_GENERATE):
            curve, bits = ("P-256", 256) if need is Need.EC_P256_GENERATE else ("P-384", 384)
            if self._can(Mechanism.EC_KEY_PAIR_GEN, gen, bits):
                return None
            return (f"{token} has no CKM_EC_KEY_PAIR_GEN for {curve}: ec-{curve.lower().replace('-', '')} "
                    f"keys need a token that generates EC {curve} key pairs; use another key type "
                    "(see 'spyrus-hsm selftest'), or import a key with 'spyrus-hsm key import-pkcs12'")
        if need is Need.RSA_2048_GENERATE:
            if self._can(Mechanism.RSA_PKCS_KEY_PAIR_GEN, gen, 2048):
                return None
            return (f"{token} has no CKM_RSA_PKCS_KEY_PAIR_GEN for 2048 bits: rsa-2048 keys need a "
                    "token that generates RSA key pairs; use an EC key type, or import a key with "
                    "'spyrus-hsm key import-pkcs12'")
        if need in (Need.ECDSA_SHA256, Need.ECDSA_SHA384):
            algorithm = SignAlgorithm.ECDSA_SHA256 if need is Need.ECDSA_SHA256 else SignAlgorithm.ECDSA_SHA384
            if self.ecdsa_mechanism(algorithm) is not None:
                return None
            hashed = "CKM_ECDSA_SHA256" if need is Need.ECDSA_SHA256 else "CKM_ECDSA_SHA384"
            return (f"{token} has neither CKM_ECDSA nor {hashed}: {algorithm.value} signatures need "
                    "a token that signs ECDSA (with either)")
        algorithm = (SignAlgorithm.RSA_PSS_SHA256 if need is Need.RSA_PSS_SHA256
                     else SignAlgorithm.RSA_PKCS1_SHA256)
        if self.rsa_mechanism(algorithm) is not None:
            return None
        names = (("CKM_SHA256_RSA_PKCS_PSS", "CKM_RSA_PKCS_PSS", "RSA-PSS")
                 if need is Need.RSA_PSS_SHA256 else ("CKM_SHA256_RSA_PKCS", "CKM_RSA_PKCS", "RSA PKCS#1 v1.5"))
        return (f"{token} has neither {names[0]} nor {names[1]}: {algorithm.value} signatures need a "
                f"token that signs {names[2]} (with either)")

    def require(self, *needs: Need) -> None:
        """Raise `Unsupported` (one line) for the first of `needs` the token lacks."""
        for need in needs:
            why = self.missing(need)
            if why is not None:
                raise Unsupported(why, public="the HSM token does not support this operation")

    # --- the table (selftest) ---------------------------------------------------------------------

    def table(self) -> list[Row]:
        def row(capability: str, ok: bool, detail: str) -> Row:
            return Row(capability, "yes" if ok else "no", detail)

        def sizes(mechanism: Mechanism) -> str:
            s = self.mechanisms.get(mechanism)
            return f" ({s.min_bits}-{s.max_bits})" if s is not None and s.max_bits else ""

        ec_gen = f"CKM_EC_KEY_PAIR_GEN{sizes(Mechanism.EC_KEY_PAIR_GEN)}"
        hmac = self.has(Need.HMAC_SHA256)
        rows = [
            row("HMAC-SHA256 sign (SAS keys)", hmac, "CKM_SHA256_HMAC"),
            Row("secret key import (SAS keys)",
                "no" if not hmac or self.secret_import is False else "yes" if self.secret_import else "assumed",
                "no use without CKM_SHA256_HMAC" if not hmac
                else "C_CreateObject of a secret key: a session object made and destroyed at connection"
                if self.secret_import is not None else "C_CreateObject of a secret key: not asked"),
            row("EC P-256 generation", self.has(Need.EC_P256_GENERATE), ec_gen),
            row("EC P-384 generation", self.has(Need.EC_P384_GENERATE), ec_gen),
            row("RSA-2048 generation", self.has(Need.RSA_2048_GENERATE),
                f"CKM_RSA_PKCS_KEY_PAIR_GEN{sizes(Mechanism.RSA_PKCS_KEY_PAIR_GEN)}"),
        ]
        for label, algorithm in (("ECDSA-SHA256", SignAlgorithm.ECDSA_SHA256),
                                 ("ECDSA-SHA384", SignAlgorithm.ECDSA_SHA384)):
            mech = self.ecdsa_mechanism(algorithm)
            detail = ("CKM_ECDSA (raw; hashed here)" if mech is Mechanism.ECDSA else
                      f"{MECHANISMS[mech]} (hashed by the token)" if mech is not None else
                      "neither CKM_ECDSA nor CKM_ECDSA_SHA256/384")
            rows.append(row(f"{label} sign", mech is not None, detail))
        for label, algorithm in (("RSA PKCS#1 v1.5 SHA-256 sign", SignAlgorithm.RSA_PKCS1_SHA256),
                                 ("RSA-PSS SHA-256 sign", SignAlgorithm.RSA_PSS_SHA256)):
            mech = self.rsa_mechanism(algorithm)
            rows.append(row(label, mech is not None, MECHANISMS[mech] if mech is not None else "none"))
        rows += [
            Row("certificate objects", "assumed", "no mechanism tells; tried when used"),
            Row("login required", "yes" if self.login_required else "no",
                "CKF_LOGIN_REQUIRED" + ("" if self.login_required else ": no C_Login, objects not private")),
            Row("max sessions", "no limit" if self.max_sessions is None else str(self.max_sessions),
                "ulMaxSessionCount"),
        ]
        return rows


def read(token: Token, max_sessions: int | None) -> Capabilities:
    """Ask `token` (C_GetMechanismList, then C_GetMechanismInfo for the mechanisms this module
    uses). `max_sessions`: its ulMaxSessionCount, read by the caller."""
    from pkcs11 import TokenFlag

    slot = token.slot
    listed = slot.get_mechanisms()
    found: dict[Mechanism, MechanismSupport] = {}
    for mechanism in MECHANISMS:
        if mechanism not in listed:
            continue
        info = slot.get_mechanism_info(mechanism)
        found[mechanism] = MechanismSupport(int(info.flags), info.min_key_length or 0, info.max_key_length or 0)
    limit = None if max_sessions is None or max_sessions in _NO_LIMIT else max_sessions
    return Capabilities(token.label, found, login_required=bool(token.flags & TokenFlag.LOGIN_REQUIRED),
                        max_sessions=limit)
