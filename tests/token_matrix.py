"""The token a test process runs on, and what each token cannot do.

`SPYRUS_TEST_TOKEN` picks the token of the process: `softhsm2` (the default: every test) or
`tpm2` (tpm2-pkcs11 over a software TPM, tests/tpm_rig.py: only the tests marked
`token_matrix`, in a pytest process of its own, as a PKCS#11 module is loaded once per process).

A test that needs what a token lacks is skipped there with the capability named (`needs`), never
silently; one that fails there because of a known bug of the module is an expected failure with
the bug named (`known_bug`, not strict: it passes once the bug is fixed).
"""

from __future__ import annotations

import os

import pytest

TOKENS = ("softhsm2", "tpm2")
TOKEN = os.environ.get("SPYRUS_TEST_TOKEN", "softhsm2")
if TOKEN not in TOKENS:
    raise RuntimeError(f"SPYRUS_TEST_TOKEN={TOKEN!r}: expected one of {', '.join(TOKENS)}")

HMAC_IMPORT = "hmac_import"
PRIVATE_KEY_IMPORT = "private_key_import"
TOKEN_INIT = "token_init"

# What a token cannot do, by capability: the reason a test that needs it is skipped there.
LACKS: dict[str, dict[str, str]] = {
    "softhsm2": {},
    "tpm2": {
        HMAC_IMPORT: "token cannot import HMAC secret keys (CKM_SHA256_HMAC / C_CreateObject of CKO_SECRET_KEY)",
        PRIVATE_KEY_IMPORT: "token cannot import private keys (C_CreateObject of CKO_PRIVATE_KEY: no PKCS#12 import)",
        TOKEN_INIT: "token cannot be made with C_InitToken (tpm2_ptool addtoken makes them)",
    },
}

# Bugs of the module seen on a token, not yet fixed: the tests they fail are expected failures.
KNOWN_BUGS: dict[str, dict[str, str]] = {
    "softhsm2": {},
    "tpm2": {},
}


def lacks(capability: str, token: str = TOKEN) -> str | None:
    """Why `token` cannot do `capability`, or None when it can."""
    return LACKS[token].get(capability)


def needs(*capabilities: str) -> pytest.MarkDecorator:
    """Mark: skipped on a token that lacks one of `capabilities`, with the capability named."""
    missing = [reason for c in capabilities if (reason := lacks(c)) is not None]
    return pytest.mark.skipif(bool(missing), reason=f"{TOKEN}: " + "; ".join(missing))


def known_bug(bug: str) -> pytest.MarkDecorator:
    """Mark: an expected failure (not strict) on a token where the module has the bug `bug`."""
    reason = KNOWN_BUGS[TOKEN].get(bug)
    return pytest.mark.xfail(reason is not None, reason=f"{TOKEN}: {reason}", strict=False)
