"""The published tools: each contract as data, bound to its async implementation.

Changing a published contract needs a new version; ``contracts.lock.json`` pins the released
ones (print the current fingerprints with ``python -m services.router.catalog``).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from services.router.notes import KeyReusedError
from services.router.registry import (
    Example,
    Registry,
    SideEffect,
    ToolConflictError,
    ToolContext,
    ToolInputError,
    ToolOutput,
    ToolSpec,
    load_lock,
)
from services.router.tools import calculator, clock, units

CALCULATOR = ToolSpec(
    name="calculator",
    version="1.0.0",
    description="Exact arithmetic: + - * / // % ** and parentheses on integers and decimals.",
    input_schema={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "minLength": 1,
                "maxLength": calculator.MAX_EXPRESSION_CHARS,
                "pattern": r"^[0-9+\-*/%().\s]+$",
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "expression": {"type": "string"},
            "value": {"type": "string"},
            "exact": {"type": "boolean"},
        },
        "required": ["expression", "value", "exact"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=1000,
    fallback_answer="I could not compute that expression.",
    examples=(
        Example({"expression": "2+3*4"}, result={"value": "14", "exact": True}),
        Example({"expression": "1/3"}, result={"exact": False}),
        Example({"expression": "1/0"}, refused=True),
    ),
)

# 1.1.0 reads numbers in every common notation whole (1e400, 1,000, .5) and refuses the
# ambiguous ones (1,5) with a reason; the tool, not a schema pattern, says what is wrong.
CALCULATOR_1_1 = ToolSpec(
    name="calculator",
    version="1.1.0",
    description=(
        "Exact arithmetic: + - * / // % ** (also ^ and the \u00d7 \u00f7 signs) and "
        "parentheses on integers and decimals, with exponents (1e400, 2.5e-3) and thousands "
        "commas (1,000). Results that are not exact decimals are rounded to 20 significant "
        "digits and marked exact=false."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "minLength": 1,
                "maxLength": calculator.MAX_EXPRESSION_CHARS,
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
    output_schema=CALCULATOR.output_schema,
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=1000,
    fallback_answer="I could not compute that expression.",
    examples=(
        *CALCULATOR.examples,
        Example({"expression": "2^10"}, result={"value": "1024", "exact": True}),
        Example({"expression": "1,000 * 2"}, result={"value": "2000"}),
        Example({"expression": "1,5 + 1"}, refused=True),
    ),
)

UNIT_CONVERT = ToolSpec(
    name="unit_convert",
    version="1.0.0",
    description="Convert a quantity between units of length, mass, temperature, volume or speed.",
    input_schema={
        "type": "object",
        "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "minLength": 1, "maxLength": 32},
            "to_unit": {"type": "string", "minLength": 1, "maxLength": 32},
        },
        "required": ["value", "from_unit", "to_unit"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
            "dimension": {"type": "string"},
            "result": {"type": "number"},
        },
        "required": ["value", "from_unit", "to_unit", "dimension", "result"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=1000,
    fallback_answer="I could not convert those units.",
    examples=(
        Example({"value": 1, "from_unit": "km", "to_unit": "m"}, result={"result": 1000}),
        Example({"value": 1, "from_unit": "km", "to_unit": "kg"}, refused=True),
    ),
)

# 1.1.0 takes the value as a number or as decimal text (read whole: "1e308", "1,000"), and
# returns the result as decimal text with an exact flag instead of a rounded double.
UNIT_CONVERT_1_1 = ToolSpec(
    name="unit_convert",
    version="1.1.0",
    description=(
        "Convert a quantity between units of length, mass, temperature, volume or speed. "
        "value is a number or decimal text (1e308, 1,000); result is decimal text, exact "
        f"when exact is true, else rounded to {units.ROUNDED_DIGITS} significant digits."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "value": {"type": ["number", "string"], "minLength": 1, "maxLength": 64},
            "from_unit": {"type": "string", "minLength": 1, "maxLength": 32},
            "to_unit": {"type": "string", "minLength": 1, "maxLength": 32},
        },
        "required": ["value", "from_unit", "to_unit"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "value": {"type": "string"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
            "dimension": {"type": "string"},
            "result": {"type": "string"},
            "exact": {"type": "boolean"},
        },
        "required": ["value", "from_unit", "to_unit", "dimension", "result", "exact"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=1000,
    fallback_answer="I could not convert those units.",
    examples=(
        Example(
            {"value": 1, "from_unit": "km", "to_unit": "m"},
            result={"result": "1000", "exact": True},
        ),
        Example(
            {"value": "1e308", "from_unit": "km", "to_unit": "m"},
            result={"result": "1e311", "exact": True},
        ),
        Example({"value": 1, "from_unit": "km", "to_unit": "kg"}, refused=True),
    ),
)

CURRENT_TIME = ToolSpec(
    name="current_time",
    version="1.0.0",
    description="The current date and time in an IANA time zone or a well-known city.",
    input_schema={
        "type": "object",
        "properties": {"zone": {"type": "string", "minLength": 1, "maxLength": 64}},
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "zone": {"type": "string"},
            "iso": {"type": "string"},
            "utc_offset": {"type": "string"},
            "abbreviation": {"type": "string"},
        },
        "required": ["zone", "iso", "utc_offset", "abbreviation"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=1000,
    fallback_answer="I could not tell the time there.",
    examples=(
        Example({"zone": "UTC"}, result={"zone": "UTC", "utc_offset": "+00:00"}),
        Example({"zone": "Nowhere/Atlantis"}, refused=True),
    ),
)

SAVE_NOTE = ToolSpec(
    name="save_note",
    version="1.0.0",
    description="Save a short note to the current session.",
    input_schema={
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 1000}},
        "required": ["text"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "note_id": {"type": "integer"},
            "text": {"type": "string"},
            "created_at": {"type": "string"},
        },
        "required": ["note_id", "text", "created_at"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.WRITE,
    cost_units=2,
    timeout_ms=3000,
    fallback_answer="I could not save the note; please try again.",
)

LIST_NOTES = ToolSpec(
    name="list_notes",
    version="1.0.0",
    description="List the notes saved in the current session, oldest first.",
    input_schema={
        "type": "object",
        "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "notes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "note_id": {"type": "integer"},
                        "text": {"type": "string"},
                        "created_at": {"type": "string"},
                    },
                    "required": ["note_id", "text", "created_at"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["notes"],
        "additionalProperties": False,
    },
    side_effect=SideEffect.READ_ONLY,
    cost_units=1,
    timeout_ms=3000,
    fallback_answer="I could not read the notes right now.",
)


async def run_calculator(args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
    expression = " ".join(args["expression"].split())
    try:
        value, exact = calculator.format_value(calculator.evaluate(expression))
    except calculator.CalculatorError as error:
        raise ToolInputError(str(error)) from None
    sign = "=" if exact else "≈"
    return ToolOutput(
        answer=f"{expression} {sign} {value}",
        result={"expression": expression, "value": value, "exact": exact},
    )


def _double(value: Fraction) -> int | float:
    """unit_convert 1.0.0's result number: whole results as integers, others as doubles
    rounded to 10 significant digits, refused where a double cannot hold them."""
    if value.denominator == 1:
        return value.numerator
    try:
        number = float(value)
    except OverflowError:
        raise ToolInputError("the result is too large to represent") from None
    if value and not sys.float_info.min <= abs(number) < math.inf:
        raise ToolInputError("the result is too large or too small to represent as a number")
    return float(f"{number:.10g}")


def _conversion(args: dict[str, Any]) -> tuple[Fraction, units.Unit, units.Unit, Fraction]:
    """The exact value asked for, both units and the exact result."""
    try:
        value = Fraction(units.quantity(args["value"]))
        result, src, dst = units.convert(value, args["from_unit"], args["to_unit"])
    except units.UnitError as error:
        raise ToolInputError(str(error)) from None
    return value, src, dst, result


async def run_unit_convert(args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
    """unit_convert 1.0.0: the result as a rounded number; the answer says when it is rounded."""
    value, src, dst, result = _conversion(args)
    number = _double(result)
    try:
        text = units.shown(result)
    except units.UnitError as error:
        raise ToolInputError(str(error)) from None
    given = units.shown(value).text
    return ToolOutput(
        answer=f"{given} {src.symbol} {text.relation} {text.text} {dst.symbol}",
        result={
            "value": args["value"],
            "from_unit": src.symbol,
            "to_unit": dst.symbol,
            "dimension": src.dimension,
            "result": number,
        },
    )


async def run_unit_convert_1_1(args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
    """unit_convert 1.1.0: exact decimal text, or rounded text marked exact=false."""
    value, src, dst, result = _conversion(args)
    try:
        given, text = units.shown(value), units.shown(result)
    except units.UnitError as error:
        raise ToolInputError(str(error)) from None
    return ToolOutput(
        answer=f"{given.text} {src.symbol} {text.relation} {text.text} {dst.symbol}",
        result={
            "value": given.text,
            "from_unit": src.symbol,
            "to_unit": dst.symbol,
            "dimension": src.dimension,
            "result": text.text,
            "exact": text.exact,
        },
    )


async def run_current_time(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    try:
        now = clock.now_in(args.get("zone", "UTC"), ctx.now())
    except clock.ZoneError as error:
        raise ToolInputError(str(error)) from None
    offset = now.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}"
    zone = str(now.tzinfo)
    return ToolOutput(
        answer=f"It is {now:%H:%M} on {now:%A %d %B %Y} in {zone} ({now.tzname()}, UTC{offset}).",
        result={
            "zone": zone,
            "iso": now.isoformat(timespec="seconds"),
            "utc_offset": offset,
            "abbreviation": now.tzname() or "",
        },
    )


def _require_session(ctx: ToolContext) -> None:
    if not ctx.session_id:
        raise ToolInputError("session_id is required for notes")


async def run_save_note(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    _require_session(ctx)
    text = args["text"].strip()
    if not text:
        raise ToolInputError("the note is empty")
    try:
        note, replayed = await ctx.notes.save(
            tenant=ctx.tenant,
            session_id=ctx.session_id,
            idempotency_key=ctx.idempotency_key,
            request_id=ctx.request_id,
            text=text,
        )
    except KeyReusedError:
        raise ToolConflictError("idempotency_key was already used for a different note") from None
    return ToolOutput(
        answer=f"Saved your note: {note.text}",
        result={"note_id": note.id, "text": note.text, "created_at": note.created_at.isoformat()},
        replayed=replayed,
    )


async def run_list_notes(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    _require_session(ctx)
    notes = await ctx.notes.list(
        tenant=ctx.tenant, session_id=ctx.session_id, limit=args.get("limit", 20)
    )
    lines = [f"{i}. {note.text}" for i, note in enumerate(notes, start=1)]
    return ToolOutput(
        answer="\n".join(["Your notes:", *lines]) if notes else "You have no notes yet.",
        result={
            "notes": [
                {"note_id": n.id, "text": n.text, "created_at": n.created_at.isoformat()}
                for n in notes
            ]
        },
    )


TOOLS = [
    (CALCULATOR, run_calculator),
    (CALCULATOR_1_1, run_calculator),
    (UNIT_CONVERT, run_unit_convert),
    (UNIT_CONVERT_1_1, run_unit_convert_1_1),
    (CURRENT_TIME, run_current_time),
    (SAVE_NOTE, run_save_note),
    (LIST_NOTES, run_list_notes),
]


def default_registry(plugin_modules: Sequence[str] = ()) -> Registry:
    """Every published tool, checked against the pinned fingerprints, plus plugin tools.

    Plugin tools are the plugin owner's to version; the lock covers the published catalog.
    """
    registry = Registry()
    for spec, run in TOOLS:
        registry.register(spec, run)
    registry.check_published(load_lock())
    for module_name in plugin_modules:
        module = importlib.import_module(module_name)
        for spec, run in module.TOOLS:
            registry.register(spec, run)
    return registry


if __name__ == "__main__":
    print(json.dumps(default_registry().fingerprints(), indent=2, sort_keys=True))
