"""MQTT 3.1.1 codec: the packets an IoT Hub/DPS server reads and writes, strictly validated.

Anything malformed or against the 3.1.1 spec raises ``ProtocolError``; the server closes the
connection on it (as the spec and Azure do). The few client-side encoders exist so tests can
speak raw MQTT to the emulator. QoS 2 is not part of Azure's dialect and is refused.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

#: Azure rejects device-to-cloud messages above 256 KiB; leave room for topic and headers.
MAX_PACKET_SIZE = 256 * 1024 + 16 * 1024


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1 (or Azure's subset of it); close the connection."""


class UnacceptableProtocolLevel(ProtocolError):
    """CONNECT named a protocol level other than 4; answer CONNACK 1, then close."""


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


@dataclass(frozen=True)
class Connect:
    client_id: str
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    keepalive: int = 60
    clean_session: bool = False
    will_topic: str | None = None
    will_payload: bytes | None = field(default=None, repr=False)
    will_qos: int = 0
    will_retain: bool = False


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    packet_id: int | None = None
    dup: bool = False
    retain: bool = False


@dataclass(frozen=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True)
class PingReq:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = Connect | Publish | PubAck | Subscribe | Unsubscribe | PingReq | Disconnect

# Fixed-header flags the spec mandates for each packet type a server may receive.
_REQUIRED_FLAGS = {
    PacketType.CONNECT: 0,
    PacketType.PUBACK: 0,
    PacketType.SUBSCRIBE: 2,
    PacketType.UNSUBSCRIBE: 2,
    PacketType.PINGREQ: 0,
    PacketType.DISCONNECT: 0,
}


# --- reading -------------------------------------------------------------------------------


async def read_packet(reader: asyncio.StreamReader, max_size: int = MAX_PACKET_SIZE) -> Packet:
    """Read one packet; ``asyncio.IncompleteReadError`` means the peer closed the stream."""
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("remaining length longer than 4 bytes")
    if length > max_size:
        raise ProtocolError(f"packet of {length} bytes exceeds the {max_size}-byte limit")
    return decode_packet(first, await reader.readexactly(length))


def decode_packet(first_byte: int, body: bytes) -> Packet:
    """Decode a packet sent by a client from its first byte and its body."""
    try:
        kind = PacketType(first_byte >> 4)
    except ValueError:
        raise ProtocolError(f"reserved packet type {first_byte >> 4}") from None
    flags = first_byte & 0x0F
    if kind in _REQUIRED_FLAGS and flags != _REQUIRED_FLAGS[kind]:
        raise ProtocolError(f"{kind.name} with invalid fixed-header flags {flags:#x}")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"{kind.name} is not accepted from a client here")
    buf = _Buffer(body)
    packet = decoder(buf, flags)
    buf.expect_end(kind)
    return packet


class _Buffer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ProtocolError("packet shorter than its fields")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not well-formed UTF-8") from None
        if "\x00" in text:
            raise ProtocolError("string contains U+0000")
        return text

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def expect_end(self, kind: PacketType) -> None:
        if self.remaining():
            raise ProtocolError(f"{kind.name} has {self.remaining()} unexpected trailing bytes")


def _packet_id(buf: _Buffer) -> int:
    packet_id = buf.u16()
    if packet_id == 0:
        raise ProtocolError("packet identifier 0")
    return packet_id


def _decode_connect(buf: _Buffer, _flags: int) -> Connect:
    name = buf.string()
    level = buf.u8()
    if name != "MQTT":
        raise ProtocolError(f"protocol name {name!r} is not 'MQTT'")
    if level != 4:
        raise UnacceptableProtocolLevel(f"protocol level {level} (only 4, MQTT 3.1.1)")
    flags = buf.u8()
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")
    has_will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_username, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3 or (not has_will and (will_qos or will_retain)):
        raise ProtocolError("inconsistent will flags")
    if has_password and not has_username:
        raise ProtocolError("password flag without username flag")
    keepalive = buf.u16()
    client_id = buf.string()
    will_topic = buf.string() if has_will else None
    will_payload = buf.binary() if has_will else None
    if will_topic is not None:
        validate_topic_name(will_topic)
    return Connect(
        client_id=client_id,
        username=buf.string() if has_username else None,
        password=buf.binary() if has_password else None,
        keepalive=keepalive,
        clean_session=bool(flags & 0x02),
        will_topic=will_topic,
        will_payload=will_payload,
        will_qos=will_qos,
        will_retain=will_retain,
    )


def _decode_publish(buf: _Buffer, flags: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if qos == 0 and dup:
        raise ProtocolError("PUBLISH QoS 0 with DUP set")
    topic = buf.string()
    validate_topic_name(topic)
    packet_id = _packet_id(buf) if qos else None
    return Publish(topic, buf.rest(), qos, packet_id, dup, bool(flags & 0x01))


def _decode_puback(buf: _Buffer, _flags: int) -> PubAck:
    return PubAck(_packet_id(buf))


def _decode_subscribe(buf: _Buffer, _flags: int) -> Subscribe:
    packet_id = _packet_id(buf)
    topics: list[tuple[str, int]] = []
    while buf.remaining():
        topic_filter = buf.string()
        validate_topic_filter(topic_filter)
        options = buf.u8()
        if options > 2:
            raise ProtocolError(f"SUBSCRIBE requested QoS byte {options:#x}")
        topics.append((topic_filter, options))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(topics))


def _decode_unsubscribe(buf: _Buffer, _flags: int) -> Unsubscribe:
    packet_id = _packet_id(buf)
    filters: list[str] = []
    while buf.remaining():
        topic_filter = buf.string()
        validate_topic_filter(topic_filter)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(filters))


def _decode_pingreq(_buf: _Buffer, _flags: int) -> PingReq:
    return PingReq()


def _decode_disconnect(_buf: _Buffer, _flags: int) -> Disconnect:
    return Disconnect()


_DECODERS: dict[PacketType, Callable[[_Buffer, int], Packet]] = {
    PacketType.CONNECT: _decode_connect,
    PacketType.PUBLISH: _decode_publish,
    PacketType.PUBACK: _decode_puback,
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.PINGREQ: _decode_pingreq,
    PacketType.DISCONNECT: _decode_disconnect,
}


# --- topics --------------------------------------------------------------------------------


def validate_topic_name(topic: str) -> None:
    """A PUBLISH topic: non-empty, no wildcards."""
    if not topic:
        raise ProtocolError("empty topic name")
    if "+" in topic or "#" in topic:
        raise ProtocolError(f"wildcard in topic name {topic!r}")


def validate_topic_filter(topic_filter: str) -> None:
    """A SUBSCRIBE filter: '+' fills a whole level, '#' only as the whole last level."""
    if not topic_filter:
        raise ProtocolError("empty topic filter")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            raise ProtocolError(f"'+' not alone in a level of {topic_filter!r}")
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ProtocolError(f"'#' not the whole last level of {topic_filter!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (wildcards never match a leading '$')."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or level not in ("+", topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


# --- writing -------------------------------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    if not 0 <= length < 1 << 28:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _packet(kind: PacketType, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + encode_remaining_length(len(body)) + body


def _string(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("MQTT string/binary field longer than 65535 bytes")
    return struct.pack(">H", len(data)) + data


def encode_connack(code: ConnackCode, session_present: bool = False) -> bytes:
    return _packet(PacketType.CONNACK, 0, bytes([int(session_present), code]))


def encode_publish(packet: Publish) -> bytes:
    if packet.qos and not packet.packet_id:
        raise ValueError("QoS 1 PUBLISH needs a packet identifier")
    flags = packet.dup << 3 | packet.qos << 1 | packet.retain
    body = _string(packet.topic)
    if packet.qos:
        body += struct.pack(">H", packet.packet_id)
    return _packet(PacketType.PUBLISH, flags, body + packet.payload)


def encode_puback(packet_id: int) -> bytes:
    return _packet(PacketType.PUBACK, 0, struct.pack(">H", packet_id))


def encode_suback(packet_id: int, return_codes: list[int]) -> bytes:
    return _packet(PacketType.SUBACK, 0, struct.pack(">H", packet_id) + bytes(return_codes))


def encode_unsuback(packet_id: int) -> bytes:
    return _packet(PacketType.UNSUBACK, 0, struct.pack(">H", packet_id))


def encode_pingresp() -> bytes:
    return _packet(PacketType.PINGRESP, 0, b"")


# Client-side encoders, for tests that speak raw MQTT to the emulator.


def encode_connect(packet: Connect) -> bytes:
    flags = packet.clean_session << 1
    payload = _string(packet.client_id)
    if packet.will_topic is not None:
        flags |= 0x04 | packet.will_qos << 3 | packet.will_retain << 5
        payload += _string(packet.will_topic) + _binary(packet.will_payload or b"")
    if packet.username is not None:
        flags |= 0x80
        payload += _string(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += _binary(packet.password)
    header = _string("MQTT") + bytes([4, flags]) + struct.pack(">H", packet.keepalive)
    return _packet(PacketType.CONNECT, 0, header + payload)


def encode_subscribe(packet: Subscribe) -> bytes:
    body = struct.pack(">H", packet.packet_id)
    for topic_filter, qos in packet.topics:
        body += _string(topic_filter) + bytes([qos])
    return _packet(PacketType.SUBSCRIBE, 2, body)


def encode_pingreq() -> bytes:
    return _packet(PacketType.PINGREQ, 0, b"")


def encode_disconnect() -> bytes:
    return _packet(PacketType.DISCONNECT, 0, b"")
