"""Request bodies for the wire fuzz, built on the wire from a method's descriptor.

The bodies are written as protobuf wire bytes rather than through message classes because the
classes refuse to build most of what matters here (invalid UTF-8 in a string field, an enum
number nobody defined, a Timestamp ten thousand years out). Concatenated messages merge on the
receiving side, so a case is a plausible request (every field set to an ordinary value) with one
field's odd value appended: a singular field takes the last value, a repeated one gets more
items, a sub-message merges.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

F = FieldDescriptor
VARINT, I64, LEN, I32 = 0, 1, 2, 5
_VARINTS = {F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_ENUM, F.TYPE_BOOL}
_ZIGZAG = {F.TYPE_SINT32, F.TYPE_SINT64}
_FIXED64 = {F.TYPE_FIXED64, F.TYPE_SFIXED64}
_FIXED32 = {F.TYPE_FIXED32, F.TYPE_SFIXED32}
_TIME_TYPES = ("google.protobuf.Timestamp", "google.protobuf.Duration")
# How deep sub-messages are filled in; deeper ones stay empty (recursive types end there).
MAX_DEPTH = 3
REPEATS = 3000


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def number_field(field: FieldDescriptor, value: int | float) -> bytes:
    """One occurrence of a numeric field with ``value`` (wrapped to the field's width)."""
    kind = field.type
    if kind == F.TYPE_DOUBLE:
        return tag(field.number, I64) + struct.pack("<d", float(value))
    if kind == F.TYPE_FLOAT:
        return tag(field.number, I32) + struct.pack("<f", float(value))
    number = int(value)
    if kind in _ZIGZAG:
        return tag(field.number, VARINT) + varint((number << 1) ^ (number >> 63))
    if kind in _FIXED64:
        return tag(field.number, I64) + struct.pack("<Q", number & (1 << 64) - 1)
    if kind in _FIXED32:
        return tag(field.number, I32) + struct.pack("<I", number & (1 << 32) - 1)
    return tag(field.number, VARINT) + varint(number)


def plausible(message: Descriptor, depth: int = 0) -> bytes:
    """Every field of ``message`` set once to an ordinary value."""
    return b"".join(plausible_field(field, depth) for field in message.fields)


def plausible_field(field: FieldDescriptor, depth: int) -> bytes:
    if field.type == F.TYPE_STRING:
        return delimited(field.number, f"fuzz-{field.name}".encode())
    if field.type == F.TYPE_BYTES:
        return delimited(field.number, b"fuzz")
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.full_name in _TIME_TYPES:
            return delimited(field.number, varint_field(1, int(time.time())))
        if depth >= MAX_DEPTH:
            return delimited(field.number, b"")
        return delimited(field.number, plausible(field.message_type, depth + 1))
    if field.type == F.TYPE_GROUP:
        return b""
    return number_field(field, 1)


def varint_field(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def _odd_numbers(field: FieldDescriptor) -> Iterator[tuple[str, bytes]]:
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        for name, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
            yield name, number_field(field, value)
        yield "1e308", number_field(field, 1e308)
        return
    yield "max int64", number_field(field, 2**63 - 1)
    yield "min int64", number_field(field, -(2**63))
    yield "-1", number_field(field, -1)
    yield "2**32", number_field(field, 2**32)


def _odd_time(field: FieldDescriptor) -> Iterator[tuple[str, bytes]]:
    for name, body in (
        ("seconds far future", varint_field(1, 2**62)),
        ("seconds before year 1", varint_field(1, -(2**62))),
        ("seconds year 10000", varint_field(1, 253402300800)),
        ("nanos -1", varint_field(2, -1)),
        ("nanos 2e9", varint_field(2, 2_000_000_000)),
    ):
        yield name, delimited(field.number, body)


def odd_values(field: FieldDescriptor, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """Odd values of one field, each labelled, as wire bytes of that field."""
    name = field.name
    if field.type == F.TYPE_STRING:
        yield f"{name}: invalid UTF-8", delimited(field.number, b"ok\xc3\x28\xff\xfe")
        yield f"{name}: NUL", delimited(field.number, b"a\x00b")
        yield f"{name}: 100k chars", delimited(field.number, b"x" * 100_000)
        yield f"{name}: control and astral", delimited(field.number, "\u202e\x1b[2J😀".encode())
        yield f"{name}: empty", delimited(field.number, b"")
    elif field.type == F.TYPE_BYTES:
        yield f"{name}: 300 kB", delimited(field.number, b"\xff" * 300_000)
    elif field.type == F.TYPE_ENUM:
        yield f"{name}: undefined enum", number_field(field, 2**31 - 1)
        yield f"{name}: negative enum", number_field(field, -5)
    elif field.type == F.TYPE_BOOL:
        yield f"{name}: bool 2**63", number_field(field, 2**63)
    elif field.type == F.TYPE_MESSAGE:
        sub = field.message_type
        if sub.full_name in _TIME_TYPES:
            for label, body in _odd_time(field):
                yield f"{name}: {label}", body
        elif depth < MAX_DEPTH:
            base = plausible(sub, depth + 1)
            for inner in sub.fields:
                for label, body in odd_values(inner, depth + 1):
                    yield f"{name}.{label}", delimited(field.number, base + body)
    elif field.type != F.TYPE_GROUP:
        for label, body in _odd_numbers(field):
            yield f"{name}: {label}", body
    if field.is_repeated and depth == 0:
        one = plausible_field(field, depth)
        yield f"{name}: {REPEATS} items", one * REPEATS


def odd_messages(message: Descriptor, rng: random.Random, limit: int) -> list[tuple[str, bytes]]:
    """Up to ``limit`` odd requests of type ``message`` (a seeded sample when there are more;
    every top-level field's invalid UTF-8 and out-of-range time always in)."""
    base = plausible(message)
    cases = [(label, base + body) for field in message.fields for label, body in odd_values(field)]
    must = [c for c in cases if "invalid UTF-8" in c[0] and "." not in c[0].split(":")[0]]
    rest = [c for c in cases if c not in must]
    room = max(0, limit - len(must))
    return must + (rng.sample(rest, room) if len(rest) > room else rest)


def random_bodies(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Random bytes of assorted lengths, plus truncated and bogus length prefixes."""
    bodies = [
        (f"random {n}", rng.randbytes(rng.choice((1, 7, 64, 1000, 20_000)))) for n in range(count)
    ]
    bodies.append(("length past the end", tag(1, LEN) + varint(1_000_000) + b"abc"))
    bodies.append(("truncated varint", tag(1, VARINT) + b"\xff\xff\xff"))
    bodies.append(("field number 0", b"\x00\x01"))
    bodies.append(("end group without start", tag(1, 4)))
    return bodies
