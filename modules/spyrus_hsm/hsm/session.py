"""A worker thread's PKCS#11 session and its cache of object handles, and the token probe.

Searches are always materialised (`list(...)`) and restricted to token objects
(CKA_TOKEN=true), because session objects of other users of the library in this process
(pkcs11-provider) are visible to our sessions too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, ObjectClass
from pkcs11.types import Object, Session

from .capabilities import Capabilities
from .errors import DuplicateObject, ObjectNotFound, TokenChanged
from .faults import is_device_fault
from .library import TokenSummary, summarise
from .uri import Pkcs11Uri

Template = dict[Attribute, object]
# What a search asked for: (class, label, id). A worker's handle cache and the pool's record of
# objects seen since the token was last read are keyed by it.
ObjectKey = tuple[ObjectClass, str | None, bytes | None]

CLASS_BY_TYPE = {
    "private": ObjectClass.PRIVATE_KEY,
    "public": ObjectClass.PUBLIC_KEY,
    "cert": ObjectClass.CERTIFICATE,
    "secret-key": ObjectClass.SECRET_KEY,
    "data": ObjectClass.DATA,
}
TYPE_BY_CLASS = {v: k for k, v in CLASS_BY_TYPE.items()}


@dataclass(frozen=True)
class ObjectInfo:
    label: str
    id_hex: str
    type: str
    key_type: str | None
    sensitive: bool | None
    extractable: bool | None
    subject: str | None = None
    not_after: str | None = None
    category: str | None = None


class WorkerSession:
    """One worker thread's session plus its cache of object handles.

    `token` is the token the pool logged in to; `seen` (shared by the pool's sessions of one
    generation) records the objects found since the token was last read: one of them missing
    later means the token's contents changed under the module, not a wrong label."""

    def __init__(self, session: Session, token: TokenSummary, generation: int,
                 seen: set[ObjectKey], capabilities: Capabilities) -> None:
        self.session = session
        self.token = token
        self.capabilities = capabilities  # what the token can do, asked when the pool connected
        self.token_label = token.label
        self.generation = generation  # the pool's library generation this session belongs to
        self.epoch = 0       # the pool's object epoch its handle cache reflects
        self._seen = seen
        self._cache: dict[ObjectKey, Object] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def forget_seen(self) -> None:
        """Objects are being deleted through this module: their absence is no news."""
        self._seen.clear()

    def find(self, uri: Pkcs11Uri, cls: ObjectClass) -> Object:
        """Exactly one token object of class `cls` matching the URI (cached per worker)."""
        key = (cls, uri.object, uri.id)
        obj = self._cache.get(key)
        if obj is None:
            found = self.search(uri, cls)
            if not found and key in self._seen:
                raise TokenChanged(
                    f"the {TYPE_BY_CLASS[cls]} object {describe(uri)} was on token "
                    f"'{self.token_label}' and is gone; re-reading the token, retry shortly"
                )
            if not found:
                raise ObjectNotFound(
                    f"no {TYPE_BY_CLASS[cls]} object {describe(uri)} on token "
                    f"'{self.token_label}'; see 'spyrus-hsm list'",
                    public=not_named(uri, TYPE_BY_CLASS[cls]).public
                )
            if len(found) > 1:
                raise DuplicateObject(
                    f"{len(found)} {TYPE_BY_CLASS[cls]} objects match {describe(uri)}; "
                    "refer to one by id (pkcs11:id=...) or delete the extra ones",
                    public=f"more than one {TYPE_BY_CLASS[cls]} object {describe(uri)}"
                )
            obj = self._cache[key] = found[0]
            self._seen.add(key)
        return obj

    def search(self, uri: Pkcs11Uri, cls: ObjectClass | None) -> list[Object]:
        if uri.token is not None and uri.token != self.token_label:
            raise ObjectNotFound(
                f"the reference names token '{uri.token}' but this module uses "
                f"token '{self.token_label}'"
            )
        template: Template = {Attribute.TOKEN: True}
        if cls is not None:
            template[Attribute.CLASS] = cls
        if uri.object is not None:
            template[Attribute.LABEL] = uri.object
        if uri.id is not None:
            template[Attribute.ID] = uri.id
        return list(self.session.get_objects(template))


def not_named(uri: Pkcs11Uri, kind: str, why: str = "") -> ObjectNotFound:
    """What a caller is told of an object it may not use, whether it is missing or reserved for
    another job (`why`, for the log): the same words, so a caller cannot tell the two apart."""
    public = f"no {kind} object {describe(uri)}"
    return ObjectNotFound(f"{public} may be named by a caller: {why}" if why else public, public=public)


def describe(uri: Pkcs11Uri) -> str:
    parts = []
    if uri.object is not None:
        parts.append(f"labelled '{uri.object}'")
    if uri.id is not None:
        parts.append(f"with id {uri.id.hex()}")
    return " ".join(parts)


def probe(ws: WorkerSession) -> None:
    """Is the token logged in to still there, and still the same one?

    C_GetTokenInfo, compared with the token's label and serial at login: a module can go on
    answering C_GenerateRandom while the token's contents are unreadable (SoftHSM2 with its
    token directory moved away) or after another token took its place. Then C_GenerateRandom,
    the cheapest call that needs the token itself."""
    try:
        now = summarise(ws.session.token.slot.get_token())
    except p11e.PKCS11Error as exc:
        if is_device_fault(exc):
            raise  # unplugged: the usual recovery
        raise TokenChanged(f"token '{ws.token.label}' contents unreadable "
                           f"(C_GetTokenInfo: {type(exc).__name__})") from None
    if now.serial != ws.token.serial:
        raise TokenChanged(f"token serial changed from {ws.token.serial} to {now.serial}")
    if now.label != ws.token.label:
        raise TokenChanged(f"token label changed from '{ws.token.label}' to '{now.label}'")
    ws.session.generate_random(64)
