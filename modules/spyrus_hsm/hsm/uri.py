"""RFC 7512 `pkcs11:` URIs: the one way keys, certificates and tokens are referred to.

Parsed into `Pkcs11Uri` and formatted back. Secrets never ride in a URI: `pin-value` is
refused, and `pin-source` is accepted only as a `file:` reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypedDict, Unpack
from urllib.parse import quote, unquote_to_bytes

from ..errors import Kind, SpyrusError

OBJECT_TYPES = ("private", "public", "cert", "secret-key", "data")

# RFC 7512 pchar without the separators it reserves for itself.
_PATH_SAFE = ":[]@!$'()*+,=&"
_QUERY_SAFE = ":[]@!$'()*+,=/?|"
_PATH_ORDER = ("token", "manufacturer", "serial", "model", "object", "type", "id")
_QUERY_ORDER = ("module-name", "module-path", "pin-source")


class _Changes(TypedDict, total=False):
    """What `Pkcs11Uri.with_` may change."""
    object: str | None
    type: str | None
    id: bytes | None
    pin_source: str | None


class UriError(SpyrusError, ValueError, kind=Kind.USAGE):
    """A string is not a usable pkcs11: URI; the message says which part."""


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    vendor: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise UriError(f"type={self.type!r} is not one of {', '.join(OBJECT_TYPES)}")
        if self.pin_source is not None and not self.pin_source.startswith("file:"):
            raise UriError("pin-source must be a file: reference (secrets never go in a URI)")

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise UriError("a PKCS#11 URI starts with 'pkcs11:'")
        body = text[len("pkcs11:"):]
        path, _, query = body.partition("?")
        values: dict[str, bytes] = {}
        vendor: list[tuple[str, str]] = []
        for part, sep in ((path, ";"), (query, "&")):
            for item in filter(None, part.split(sep)):
                name, eq, raw = item.partition("=")
                if not eq:
                    raise UriError(f"attribute {name!r} has no value")
                if name == "pin-value":
                    raise UriError("pin-value is refused: give the PIN in a file (pin-source)")
                value = unquote_to_bytes(raw)
                if name.startswith("x-"):
                    vendor.append((name, value.decode("utf-8", "replace")))
                    continue
                if name not in _PATH_ORDER + _QUERY_ORDER:
                    continue  # standard attributes we do not use (slot-id, library-*)
                if name in values:
                    raise UriError(f"attribute {name!r} appears twice")
                values[name] = value
        kwargs: dict[str, object] = {}
        for name, value in values.items():
            key = name.replace("-", "_")
            if name == "id":
                kwargs[key] = value
            else:
                try:
                    kwargs[key] = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise UriError(f"attribute {name!r} is not UTF-8") from None
        return cls(**kwargs, vendor=tuple(vendor))  # type: ignore[arg-type]

    def __str__(self) -> str:
        path = []
        for name in _PATH_ORDER:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "id":
                path.append("id=" + "".join(f"%{b:02X}" for b in value))
            else:
                path.append(f"{name}={quote(value, safe=_PATH_SAFE.replace(';', ''))}")
        path += [f"{k}={quote(v, safe=_PATH_SAFE)}" for k, v in self.vendor]
        query = []
        for name in _QUERY_ORDER:
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                query.append(f"{name}={quote(value, safe=_QUERY_SAFE.replace('&', ''))}")
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    def with_(self, **changes: Unpack[_Changes]) -> Pkcs11Uri:
        return replace(self, **changes)


def as_uri(ref: str | Pkcs11Uri, default_type: str | None = None) -> Pkcs11Uri:
    """A key reference from the user: a pkcs11: URI, or a bare label."""
    if isinstance(ref, Pkcs11Uri):
        uri = ref
    elif ref.startswith("pkcs11:"):
        uri = Pkcs11Uri.parse(ref)
    elif ref:
        uri = Pkcs11Uri(object=ref)
    else:
        raise UriError("an empty key reference names nothing")
    if uri.object is None and uri.id is None:
        raise UriError(f"{uri} names no object: give object= (label) or id=")
    if default_type and uri.type is None:
        uri = replace(uri, type=default_type)
    return uri
