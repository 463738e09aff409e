"""The price of a request, computed the same way wherever it is needed.

Telemetry prices usage at ingest and the gateway prices its own RunResponse: both call
``cost_micros`` with the table telemetry serves (GetPrices), so the two figures always agree.
Integer micros (millionths of the currency) throughout, so no float rounding ever differs.

Tokens are priced per model: the table's ``[models."<name>"]`` sections give a model's input
and output prices; a model the table does not list (and a request without one) is priced with
the default token prices of ``[prices]``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
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


MAX_MODEL_NAME_CHARS = 128


@dataclass(frozen=True)
class ModelPrice:
    """One model's token prices, in micros per 1000 tokens."""

    input_per_1k_tokens_micros: int
    output_per_1k_tokens_micros: int


@dataclass(frozen=True)
class PriceTable:
    """One version of the prices, each in micros of ``currency``."""

    version: str
    currency: str
    input_per_1k_tokens_micros: int
    output_per_1k_tokens_micros: int
    per_tool_call_micros: int
    per_cost_unit_micros: int
    # Token prices by model name; others are priced with the two defaults above.
    models: Mapping[str, ModelPrice] = field(default_factory=dict)

    def token_prices(self, model: str) -> ModelPrice:
        """The model's token prices, or the defaults for a model not listed (or none)."""
        listed = self.models.get(model) if model else None
        if listed is not None:
            return listed
        return ModelPrice(self.input_per_1k_tokens_micros, self.output_per_1k_tokens_micros)

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
        models = {}
        for name, model_prices in dict(data.get("models", {})).items():
            if not name or len(name) > MAX_MODEL_NAME_CHARS or not isinstance(model_prices, dict):
                raise ValueError(f"price table: models.{name!r} must be a table of prices")
            models[name] = ModelPrice(
                _micros(
                    f"models.{name}.input_per_1k_tokens", model_prices.get("input_per_1k_tokens")
                ),
                _micros(
                    f"models.{name}.output_per_1k_tokens", model_prices.get("output_per_1k_tokens")
                ),
            )
        amounts = [_micros(f"prices.{key}", prices.get(key)) for key in _PRICE_KEYS]
        return cls(
            version,
            currency,
            input_per_1k_tokens_micros=amounts[0],
            output_per_1k_tokens_micros=amounts[1],
            per_tool_call_micros=amounts[2],
            per_cost_unit_micros=amounts[3],
            models=models,
        )

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        with path.open("rb") as file:
            return cls.from_mapping(tomllib.load(file))


def _micros(key: str, value: object) -> int:
    if value is None or isinstance(value, bool):
        raise ValueError(f"price table: {key} is required")
    try:
        amount = Decimal(str(value)) * MICROS
    except InvalidOperation:
        raise ValueError(f"price table: {key} is not a number") from None
    if amount < 0 or amount != amount.to_integral_value():
        raise ValueError(f"price table: {key} must be >= 0 and whole micros")
    return int(amount)


def cost_micros(
    table: PriceTable,
    tokens_in: int,
    tokens_out: int,
    tool_calls: int,
    cost_units: int,
    *,
    model: str = "",
) -> int:
    """Cost in micros, rounded half up once over the whole sum; tokens at ``model``'s prices.

    Token prices are per 1000 tokens, so the exact cost is a whole number of thousandths of a
    micro; it is summed exactly and only the total is rounded (0.5 micro rounds up).
    """
    if min(tokens_in, tokens_out, tool_calls, cost_units) < 0:
        raise ValueError("usage amounts must not be negative")
    tokens = table.token_prices(model)
    thousandths = (
        tokens_in * tokens.input_per_1k_tokens_micros
        + tokens_out * tokens.output_per_1k_tokens_micros
        + 1000 * (tool_calls * table.per_tool_call_micros + cost_units * table.per_cost_unit_micros)
    )
    return (thousandths + 500) // 1000
