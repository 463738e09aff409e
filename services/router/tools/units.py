"""Unit conversion with exact factors: length, mass, temperature, volume, speed.

Values and results are exact fractions; the text shown says whether it is exact (``=``) or
rounded to ``ROUNDED_DIGITS`` significant digits (``≈``), never a rounded value as if exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from services.router.tools.numbers import (
    NumberError,
    decimal_within,
    format_decimal,
    fraction_within,
    parse_number,
    rounded,
)

# Values and results beyond 10**±MAX_EXPONENT are refused: far past any physical quantity,
# and the bound keeps every conversion a few small-integer multiplications.
MAX_EXPONENT = 1000
# A result whose exact decimal needs at most this many significant digits is shown exactly.
EXACT_DIGITS = 20
ROUNDED_DIGITS = 10


@dataclass(frozen=True)
class Unit:
    symbol: str
    dimension: str
    # value_in_base = value * scale + offset (offset only for temperatures).
    scale: Fraction
    offset: Fraction = Fraction(0)


_F = Fraction
_UNITS: list[tuple[Unit, tuple[str, ...]]] = [
    # length, base metre
    (Unit("m", "length", _F(1)), ("m", "meter", "meters", "metre", "metres")),
    (Unit("km", "length", _F(1000)), ("km", "kilometer", "kilometers", "kilometre", "kilometres")),
    (
        Unit("cm", "length", _F(1, 100)),
        ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    ),
    (
        Unit("mm", "length", _F(1, 1000)),
        ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    ),
    (Unit("mi", "length", _F("1609.344")), ("mi", "mile", "miles")),
    (Unit("yd", "length", _F("0.9144")), ("yd", "yard", "yards")),
    (Unit("ft", "length", _F("0.3048")), ("ft", "foot", "feet")),
    (Unit("in", "length", _F("0.0254")), ("in", "inch", "inches")),
    # mass, base kilogram
    (Unit("kg", "mass", _F(1)), ("kg", "kilogram", "kilograms", "kilo", "kilos")),
    (Unit("g", "mass", _F(1, 1000)), ("g", "gram", "grams")),
    (Unit("mg", "mass", _F(1, 1_000_000)), ("mg", "milligram", "milligrams")),
    (Unit("t", "mass", _F(1000)), ("t", "tonne", "tonnes")),
    (Unit("lb", "mass", _F("0.45359237")), ("lb", "lbs", "pound", "pounds")),
    (Unit("oz", "mass", _F("0.45359237") / 16), ("oz", "ounce", "ounces")),
    # temperature, base kelvin
    (Unit("K", "temperature", _F(1)), ("k", "kelvin")),
    (
        Unit("°C", "temperature", _F(1), _F("273.15")),
        ("c", "°c", "celsius", "centigrade", "degrees celsius", "degrees c", "deg c"),
    ),
    (
        Unit("°F", "temperature", _F(5, 9), _F("273.15") - _F(160, 9)),
        ("f", "°f", "fahrenheit", "degrees fahrenheit", "degrees f", "deg f"),
    ),
    # volume, base litre (gallon, quart, pint and cup are US customary)
    (Unit("L", "volume", _F(1)), ("l", "liter", "liters", "litre", "litres")),
    (
        Unit("mL", "volume", _F(1, 1000)),
        ("ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    ),
    (Unit("m³", "volume", _F(1000)), ("m3", "m³", "cubic meter", "cubic meters")),
    (Unit("gal", "volume", _F("3.785411784")), ("gal", "gallon", "gallons")),
    (Unit("qt", "volume", _F("3.785411784") / 4), ("qt", "quart", "quarts")),
    (Unit("pt", "volume", _F("3.785411784") / 8), ("pt", "pint", "pints")),
    (Unit("cup", "volume", _F("3.785411784") / 16), ("cup", "cups")),
    # speed, base metre per second
    (
        Unit("m/s", "speed", _F(1)),
        (
            "m/s",
            "mps",
            "meter per second",
            "meters per second",
            "metre per second",
            "metres per second",
        ),
    ),
    (
        Unit("km/h", "speed", _F(1000, 3600)),
        (
            "km/h",
            "kmh",
            "kph",
            "kilometer per hour",
            "kilometers per hour",
            "kilometre per hour",
            "kilometres per hour",
        ),
    ),
    (Unit("mph", "speed", _F("1609.344") / 3600), ("mph", "mile per hour", "miles per hour")),
    (Unit("kn", "speed", _F(1852, 3600)), ("kn", "knot", "knots")),
]

UNITS: dict[str, Unit] = {name: unit for unit, names in _UNITS for name in names}


class UnitError(ValueError):
    """Unknown unit, or units of different dimensions."""


def lookup(name: str) -> Unit:
    unit = UNITS.get(" ".join(name.lower().split()))
    if unit is None:
        raise UnitError(f"unknown unit {name[:32]!r}")
    return unit


def convert(value: Fraction, source: str, target: str) -> tuple[Fraction, Unit, Unit]:
    """``value`` in ``source`` units expressed in ``target`` units, exactly."""
    src, dst = lookup(source), lookup(target)
    if src.dimension != dst.dimension:
        raise UnitError(
            f"cannot convert {src.dimension} ({src.symbol}) to {dst.dimension} ({dst.symbol})"
        )
    base = value * src.scale + src.offset
    if src.dimension == "temperature" and base < 0:
        raise UnitError("temperature is below absolute zero")
    return (base - dst.offset) / dst.scale, src, dst


def quantity(value: int | float | str) -> Decimal:
    """A value as given: a JSON number or decimal text read by the one number grammar."""
    if isinstance(value, str):
        try:
            number = parse_number(value)
        except NumberError as error:
            raise UnitError(str(error)) from None
    else:
        # repr() is the shortest text that reads back as the same double: the JSON text sent.
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    if not number.is_finite() or not decimal_within(number, MAX_EXPONENT):
        raise UnitError(f"value is out of range (at most 1e{MAX_EXPONENT} in magnitude)")
    return number


@dataclass(frozen=True)
class Shown:
    """A value as text, and whether the text is exact."""

    text: str
    exact: bool

    @property
    def relation(self) -> str:
        return "=" if self.exact else "≈"


def shown(value: Fraction) -> Shown:
    """Exact decimal text when it needs at most EXACT_DIGITS digits, else ROUNDED_DIGITS."""
    if not fraction_within(value, MAX_EXPONENT):
        raise UnitError(f"result is out of range (at most 1e{MAX_EXPONENT} in magnitude)")
    decimal, exact = rounded(value, EXACT_DIGITS)
    if not exact:
        decimal, _ = rounded(value, ROUNDED_DIGITS)
    return Shown(format_decimal(decimal), exact)
