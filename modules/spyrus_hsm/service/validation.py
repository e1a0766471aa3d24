"""Request bodies: JSON objects with known fields, each checked with a message naming it.

The same patterns are published in /openapi.json (openapi.py imports them), so the spec and
the checks cannot drift apart.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..errors import Kind, SpyrusError
from .appkeys import SERVICE
from .problems import Problem, bad_request

# Azure's device/module id alphabet; DPS registration ids are lower-case.
DEVICE_ID = r"^[A-Za-z0-9\-.:_%+#*?!(),=@$']{1,128}$"
REGISTRATION_ID = r"^[a-z0-9][a-z0-9\-._:]{0,127}$"
ID_SCOPE = r"^[A-Za-z0-9]{1,32}$"
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = rf"^{_DNS_LABEL}(\.{_DNS_LABEL}){{0,8}}$"
LABEL = r"^[A-Za-z0-9][A-Za-z0-9\-._:@+]{0,127}$"
MAX_DATA_BYTES = 8192  # a signature request's data, decoded
# Padded standard base64 of at most MAX_DATA_BYTES bytes, the limit inside the pattern: up to 2730
# full groups of 3 bytes, then at most one partial group of 1 or 2 (8192 = 3 * 2730 + 2).
BASE64_DATA = rf"^(?:[A-Za-z0-9+/]{{4}}){{0,{MAX_DATA_BYTES // 3}}}(?:[A-Za-z0-9+/]{{2}}==|[A-Za-z0-9+/]{{3}}=)?$"
MAX_CSR_BYTES = 8192  # a leaf's DER PKCS#10 request (RSA-4096 ones are under 2 KiB)
BASE64_CSR = rf"^(?:[A-Za-z0-9+/]{{4}}){{1,{MAX_CSR_BYTES // 3}}}(?:[A-Za-z0-9+/]{{2}}==|[A-Za-z0-9+/]{{3}}=)?$"


# Set on the request while its body is being read: a timeout then is the client's (408), not ours.
READING_BODY = web.RequestKey("spyrus.reading_body", bool)
_NAMEABLE_KEY = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


class ClientDisconnected(SpyrusError, kind=Kind.USAGE):
    """The client closed the connection before its request body arrived: nobody to answer."""


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      "send the request body as application/json")
    limit = request.app[SERVICE].cfg.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        # Refused before reading, so a client that sent 'Expect: 100-continue' hears it at once.
        raise web.HTTPRequestEntityTooLarge(limit, request.content_length)
    request[READING_BODY] = True
    try:
        raw = await request.read()  # aiohttp enforces client_max_size (413) while reading
    except RequestPayloadError:  # its message quotes the request: not passed on
        raise bad_request("the request body is not well-formed (its length or chunked encoding)") from None
    except OSError:
        if request.transport is None or request.transport.is_closing():
            raise ClientDisconnected from None
        raise
    request[READING_BODY] = False
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        name = f"'{exc.key}'" if _NAMEABLE_KEY.fullmatch(exc.key) else "a key"
        raise bad_request(f"{name} appears more than once in an object of the request body") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object; a key given twice is refused rather than the last one silently winning."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def only(body: dict[str, Any], *allowed: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def text(body: dict[str, Any], name: str, pattern: str, required: bool = True) -> str | None:
    """The field's value; None only when it is absent and optional (null is not absent)."""
    if name not in body:
        if required:
            raise bad_request(f"'{name}' is required")
        return None
    value = body[name]
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise bad_request(f"'{name}' must be a string matching {pattern}")
    return value


def integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """As `text`; 600.0 counts as the integer 600, as JSON Schema says."""
    if name not in body:
        return None
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}")
    return value


def choice(body: dict[str, Any], name: str, options: tuple[str, ...]) -> str:
    value = body.get(name)
    if value not in options:
        raise bad_request(f"'{name}' must be one of {', '.join(options)}")
    assert isinstance(value, str)
    return value


def base64_data(body: dict[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise bad_request(f"'{name}' is required: the bytes to sign, base64-encoded")
    if not re.fullmatch(BASE64_DATA, value):
        raise bad_request(f"'{name}' must be padded base64 of at most {MAX_DATA_BYTES} bytes")
    return base64.b64decode(value, validate=True)


def flag(body: dict[str, Any], name: str) -> bool:
    """An optional boolean (absent: false)."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false")
    return value


def base64_csr(body: dict[str, Any], name: str) -> bytes | None:
    """An optional DER certificate signing request, padded base64 (its content is checked by
    the caller: identity.issued.check_csr)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(BASE64_CSR, value):
        raise bad_request(f"'{name}' must be a DER PKCS#10 request of at most {MAX_CSR_BYTES} bytes, "
                          "padded base64")
    return base64.b64decode(value, validate=True)
