"""Token initialisation and the user PIN's life: what runs before or instead of a user login
(C_InitToken, C_InitPIN as the security officer, C_SetPIN)."""

from __future__ import annotations

from . import library
from .errors import LoginFailed
from .library import TokenSelector, TokenSummary
from .refusals import RefusedPins
from .secret import Secret


def init_token(module_path: str, label: str, so_pin: Secret, user_pin: Secret | None) -> TokenSummary:
    """C_InitToken on a free slot, then C_InitPIN (skipped when user_pin is None)."""
    lib = library.load_module(module_path)
    return library.init_token(lib, module_path, label, so_pin, user_pin)


def init_user_pin(module_path: str, label: str, so_pin: Secret, user_pin: Secret) -> TokenSummary:
    return library.init_user_pin(library.load_module(module_path), label, so_pin, user_pin)


def list_tokens(module_path: str) -> list[TokenSummary]:
    return library.list_tokens(library.load_module(module_path))


def change_user_pin(module_path: str, selector: TokenSelector, old: Secret, new: Secret,
                    refused_pins: RefusedPins) -> tuple[TokenSummary, bool]:
    """C_SetPIN from `old` to `new`, unless `old` is remembered as refused (nothing tried then).
    Returns the token and whether a record of refused PINs was cleared."""
    token = library.find_token(library.load_module(module_path), selector)
    info = library.summarise(token)
    refusal = refused_pins.refusal(info.serial, old)
    if refusal is not None:
        raise LoginFailed(f"token '{info.label}' (serial {info.serial}) {refusal}")
    try:
        library.set_user_pin(token, old, new)
    except LoginFailed as exc:
        if exc.pin_incorrect:
            refused_pins.refused(info.serial, old)
        raise
    return info, refused_pins.clear(info.serial)


def unblock_user_pin(module_path: str, selector: TokenSelector, so_pin: Secret, new: Secret,
                     refused_pins: RefusedPins) -> tuple[TokenSummary, bool]:
    """C_InitPIN as the security officer: a new user PIN for a locked (or forgotten) one.
    Returns the token and whether a record of refused PINs was cleared."""
    token = library.find_token(library.load_module(module_path), selector)
    info = library.summarise(token)
    library.reset_user_pin(token, so_pin, new)
    return info, refused_pins.clear(info.serial)
