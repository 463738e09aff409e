"""The one number grammar of the router's tools, and honest decimal text for exact values.

A number is read whole or refused, never in part: ``1e400`` is ten to the 400th, not ``1``;
``1,5`` is refused (a decimal comma or a list?) rather than read as 1 or 15. Accepted:

- an optional sign: ``+``, ``-`` or the typographic minus sign (U+2212);
- digits, optionally grouped in thousands by commas (``1,000,000``: groups of exactly three);
- an optional fraction (``2.5``, ``5.``, ``.5``);
- an optional exponent (``1e400``, ``1E-3``, ``2.5e+3``).

Refused, each with a reason a person can act on: spaces or underscores inside a number, a
comma that does not separate thousands, hexadecimal and other bases, several decimal points,
letters glued to the digits. Only ASCII digits count: other scripts' digits are not read as
numbers anywhere in routing either (RE2's ``\\d`` is ASCII).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction

# The typographic minus (U+2212) is read as "-" wherever a sign or an operator is.
MINUS = "\u2212"
MINUS_SIGNS = "-" + MINUS
SIGNS = "+" + MINUS_SIGNS
_DIGITS = frozenset("0123456789")


class NumberError(ValueError):
    """The text is not one number in an accepted notation; the message says why."""


def _is_digits(text: str) -> bool:
    return bool(text) and all(c in _DIGITS for c in text)


def _integer_part(text: str, shown: str) -> str:
    """Digits of the integer part, with thousands commas checked and removed."""
    if "," not in text:
        return text
    groups = text.split(",")
    if not (1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])):
        raise NumberError(
            f"{shown!r} is ambiguous: write decimals with a point (1.5) and use commas only "
            "between groups of three digits (1,000)"
        )
    return "".join(groups)


def parse_number(text: str) -> Decimal:
    """The exact value of ``text`` (one number, surrounding spaces allowed), or NumberError."""
    shown = text.strip()[:40]
    body = text.strip()
    if not body:
        raise NumberError("the number is empty")
    sign = ""
    if body[0] in SIGNS:
        sign = "-" if body[0] in MINUS_SIGNS else ""
        body = body[1:]
    if any(c.isspace() for c in body):
        raise NumberError(
            f"{shown!r} has spaces inside: write 1000 or 1,000, and put an operator between "
            "two numbers"
        )
    if "_" in body:
        raise NumberError(f"{shown!r} has underscores inside: write 1000 or 1,000")
    lowered = body.lower()
    if lowered.startswith(("0x", "0o", "0b")):
        raise NumberError(f"{shown!r}: only decimal numbers are supported")
    mantissa, exponent = lowered, ""
    if "e" in lowered:
        mantissa, _, exponent = lowered.partition("e")
        exponent = exponent.replace(MINUS, "-")
        digits = exponent[1:] if exponent[:1] in ("+", "-") else exponent
        if not _is_digits(digits):
            raise NumberError(f"{shown!r} is not a number")
    whole, point, fraction = mantissa.partition(".")
    if "." in fraction or (fraction and not _is_digits(fraction)):
        raise NumberError(f"{shown!r} is not a number")
    whole = _integer_part(whole, shown)
    if (whole and not _is_digits(whole)) or not (whole or fraction):
        raise NumberError(f"{shown!r} is not a number")
    if point and not fraction and not whole:
        raise NumberError(f"{shown!r} is not a number")
    literal = f"{sign}{whole or '0'}.{fraction or '0'}"
    if exponent:
        literal += f"e{exponent}"
    return Decimal(literal)


def format_decimal(value: Decimal) -> str:
    """Plain notation for everyday magnitudes, ``6.2e307`` style beyond, never a trailing zero
    that was not asked for (``Decimal("2.50")`` prints ``2.5``)."""
    if value.is_zero():
        return "0"
    value = value.normalize()
    exponent = value.adjusted()
    if -7 <= exponent < 21:
        return format(value, "f")
    sign, digits, _ = value.as_tuple()
    head = "".join(str(d) for d in digits)
    mantissa = head[0] + ("." + head[1:] if len(head) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{exponent}"


def rounded(value: Fraction, digits: int) -> tuple[Decimal, bool]:
    """``value`` to ``digits`` significant digits (half to even), and whether that is exact."""
    context = Context(prec=digits, rounding=ROUND_HALF_EVEN, Emax=10**6, Emin=-(10**6))
    decimal = context.divide(Decimal(value.numerator), Decimal(value.denominator))
    return decimal, Fraction(decimal) == value


def decimal_within(value: Decimal, max_exponent: int) -> bool:
    """True when ``value`` is 0 or its magnitude lies in [10**-max_exponent, 10**max_exponent).

    Checked on the exponent alone, before anything turns ``1e999999999`` into a huge integer.
    """
    return value.is_zero() or -max_exponent <= value.adjusted() < max_exponent


def fraction_within(value: Fraction, max_exponent: int) -> bool:
    """The same bound for an exact result."""
    if value == 0:
        return True
    size = abs(value)
    return bool(Fraction(1, 10**max_exponent) <= size < 10**max_exponent)
