"""The only package that talks PKCS#11: token, sessions, worker pool, recovery, operations."""

from .capabilities import Capabilities, Need, Row, Unsupported
from .client import Hsm, KeyRef
from .encoding import ecdsa_raw_to_der
from .errors import (
    DuplicateObject,
    HsmBusy,
    HsmConfigError,
    HsmError,
    HsmTimeout,
    HsmUnavailable,
    InvalidInput,
    LoginFailed,
    ObjectNotFound,
    OperationFailed,
    PinFileError,
    TokenNotFound,
)
from .library import TokenSelector, TokenSummary, mark_shared
from .operations import KeyAlgorithm, ObjectInfo, SignAlgorithm
from .pair import TokenPair, one_token
from .provision import change_user_pin, init_token, list_tokens, unblock_user_pin
from .recovery import EXIT_RESTART, restart_done, restart_once
from .refusals import RefusedPins
from .secret import Secret, read_secret_file, read_secret_stream
from .session import not_named
from .state import HsmState, PoolSettings
from .uri import Pkcs11Uri, UriError, as_uri

__all__ = [
    "EXIT_RESTART",
    "Capabilities",
    "DuplicateObject",
    "Hsm",
    "HsmBusy",
    "HsmConfigError",
    "HsmError",
    "HsmState",
    "HsmTimeout",
    "HsmUnavailable",
    "InvalidInput",
    "KeyAlgorithm",
    "KeyRef",
    "LoginFailed",
    "Need",
    "ObjectInfo",
    "ObjectNotFound",
    "OperationFailed",
    "PinFileError",
    "Pkcs11Uri",
    "PoolSettings",
    "RefusedPins",
    "Row",
    "Secret",
    "SignAlgorithm",
    "TokenNotFound",
    "TokenPair",
    "TokenSelector",
    "TokenSummary",
    "Unsupported",
    "UriError",
    "as_uri",
    "change_user_pin",
    "ecdsa_raw_to_der",
    "init_token",
    "list_tokens",
    "mark_shared",
    "not_named",
    "one_token",
    "read_secret_file",
    "read_secret_stream",
    "restart_done",
    "restart_once",
    "unblock_user_pin",
]
