"""The price of a request, computed the same way wherever it is needed.

Telemetry prices usage at ingest and the gateway prices its own RunResponse: both call
``cost_micros`` with the table telemetry serves (GetPrices), so the two figures always agree.
Integer micros (millionths of the currency) throughout, so no float rounding ever differs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

MICROS = 1_000_000
_PRICE_KEYS = (
    "input_per_1k_tokens",
    "output_per_1k_tokens",
    "per_tool_call",
    "per_cost_unit",
)


@dataclass(frozen=True)
class PriceTable:
    """One version of the prices, each in micros of ``currency``."""

    version: str
    currency: str
    input_per_1k_tokens_micros: int
    output_per_1k_tokens_micros: int
    per_tool_call_micros: int
    per_cost_unit_micros: int

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PriceTable:
        """Prices as decimal amounts of the currency ("0.003" or 0.003), exact to the micro."""
        version = str(data.get("version", "")).strip()
        currency = str(data.get("currency", "")).strip()
        if not version:
            raise ValueError("price table: version is required")
        if len(currency) != 3 or not currency.isupper():
            raise ValueError("price table: currency must be an ISO 4217 code such as USD")
        prices = data.get("prices", {})
        return cls(version, currency, *(_micros(key, prices.get(key)) for key in _PRICE_KEYS))

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        with path.open("rb") as file:
            return cls.from_mapping(tomllib.load(file))


def _micros(key: str, value: object) -> int:
    if value is None or isinstance(value, bool):
        raise ValueError(f"price table: prices.{key} is required")
    try:
        amount = Decimal(str(value)) * MICROS
    except InvalidOperation:
        raise ValueError(f"price table: prices.{key} is not a number") from None
    if amount < 0 or amount != amount.to_integral_value():
        raise ValueError(f"price table: prices.{key} must be >= 0 and whole micros")
    return int(amount)


def cost_micros(
    table: PriceTable, tokens_in: int, tokens_out: int, tool_calls: int, cost_units: int
) -> int:
    """Cost in micros, rounded half up once over the whole sum.

    Token prices are per 1000 tokens, so the exact cost is a whole number of thousandths of a
    micro; it is summed exactly and only the total is rounded (0.5 micro rounds up).
    """
    if min(tokens_in, tokens_out, tool_calls, cost_units) < 0:
        raise ValueError("usage amounts must not be negative")
    thousandths = (
        tokens_in * table.input_per_1k_tokens_micros
        + tokens_out * table.output_per_1k_tokens_micros
        + 1000 * (tool_calls * table.per_tool_call_micros + cost_units * table.per_cost_unit_micros)
    )
    return (thousandths + 500) // 1000
