"""Fixtures of the tests that connect HSM credentials to the emulator: each module names its
emulator address and DPS ID scope in `HOST` and `SCOPE` (fixed addresses: one per module)."""

from __future__ import annotations

import pytest

from spyrus_hsm.hsm import Hsm
from spyrus_hsm.identity import tls


@pytest.fixture(scope="module")
def provider(hsm: Hsm, token_env, tmp_path_factory):  # type: ignore[no-untyped-def]
    """pkcs11-provider loaded into this process, as the module does at start."""
    return tls.load_provider(token_env.module, str(token_env.pin_file), tmp_path_factory.mktemp("ossl"))


@pytest.fixture
def emu(make_emulator, request):  # type: ignore[no-untyped-def]
    """The emulator on the module's HOST with its SCOPE; DPS assigns on the first poll."""
    e = make_emulator(request.module.HOST, id_scope=request.module.SCOPE)
    e.polls_before_assigned = 1
    return e
