"""Token initialisation: the one HSM operation that runs before there is a user login."""

from __future__ import annotations

from . import library
from .library import TokenSummary
from .secret import Secret


def init_token(module_path: str, label: str, so_pin: Secret, user_pin: Secret | None) -> TokenSummary:
    """C_InitToken on a free slot, then C_InitPIN (skipped when user_pin is None)."""
    lib = library.load_module(module_path)
    return library.init_token(lib, module_path, label, so_pin, user_pin)


def init_user_pin(module_path: str, label: str, so_pin: Secret, user_pin: Secret) -> TokenSummary:
    return library.init_user_pin(library.load_module(module_path), label, so_pin, user_pin)


def list_tokens(module_path: str) -> list[TokenSummary]:
    return library.list_tokens(library.load_module(module_path))
