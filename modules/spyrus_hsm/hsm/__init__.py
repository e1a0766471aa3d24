"""The only package that talks PKCS#11: token, sessions, worker pool, recovery, operations."""

from .client import Hsm, KeyRef
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
from .pool import HsmState, PoolSettings
from .provision import init_token
from .secret import Secret, read_secret_file, read_secret_stream
from .uri import Pkcs11Uri, UriError, as_uri

__all__ = [
    "DuplicateObject", "Hsm", "HsmBusy", "HsmConfigError", "HsmError", "HsmState", "HsmTimeout",
    "HsmUnavailable", "InvalidInput", "KeyAlgorithm", "KeyRef", "LoginFailed", "ObjectInfo",
    "ObjectNotFound", "OperationFailed", "PinFileError", "Pkcs11Uri", "PoolSettings", "Secret",
    "SignAlgorithm", "TokenNotFound", "TokenSelector", "TokenSummary", "UriError", "as_uri",
    "init_token", "mark_shared", "read_secret_file", "read_secret_stream",
]
