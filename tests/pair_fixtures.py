"""The fixture names the two-token `serve` tests use, each test with two tokens of its own
(conftest's `fresh_pair`); a test module imports them to shadow the session's `hsm`."""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["first_token", "hsm", "second_hsm", "second_token"]


@pytest.fixture
def first_token(fresh_pair: Any) -> Any:
    return fresh_pair.first


@pytest.fixture
def second_token(fresh_pair: Any) -> Any:
    return fresh_pair.second


@pytest.fixture
def hsm(fresh_pair: Any) -> Any:
    return fresh_pair.first_hsm


@pytest.fixture
def second_hsm(fresh_pair: Any) -> Any:
    return fresh_pair.second_hsm
