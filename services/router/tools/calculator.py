"""Exact arithmetic over fractions, never eval.

The expression is first cut into tokens by a linear scan: numbers (read whole by
``tools.numbers``, so ``1e400`` is exact and ``1,5`` is refused), the operators
``+ - * / // % **`` (``^``, the multiplication and division signs and the typographic
minus are accepted as ``**``, ``*``, ``/``, ``-``)
and parentheses; anything else is refused by name. The numbers are then replaced by
placeholders and Python's own parser (``ast``, mode ``eval``) applies the usual precedence and
associativity; only the nodes of that tiny grammar are evaluated. Every input is at most
``MAX_EXPRESSION_CHARS`` long, every number and intermediate value is bounded in size, and a
power is refused before it is computed if its result would be too large, so no input can burn
CPU or memory.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from fractions import Fraction

from services.router.tools.numbers import (
    MINUS,
    SIGNS,
    NumberError,
    decimal_within,
    parse_number,
    rounded,
)

MAX_EXPRESSION_CHARS = 200
# About 3,000 decimal digits: far below Python's 4,300-digit int-to-str limit.
MAX_BITS = 10_000
# Numbers written in the expression: at most this power of ten either way (2**10_000 ~ 1e3010).
MAX_LITERAL_EXPONENT = 3000
SIGNIFICANT_DIGITS = 20

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# Longest first: "**" before "*", "//" before "/".
_OPERATORS = (
    ("**", "**"),
    ("//", "//"),
    ("+", "+"),
    ("-", "-"),
    (MINUS, "-"),
    ("*", "*"),
    ("\u00d7", "*"),
    ("/", "/"),
    ("\u00f7", "/"),
    ("%", "%"),
    ("^", "**"),
    ("(", "("),
    (")", ")"),
)
_PLACEHOLDER = "n"


class CalculatorError(ValueError):
    """The expression is not allowed or has no value (division by zero, too large)."""


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _checked(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise CalculatorError("result is too large")
    return value


def _number_end(text: str, start: int) -> int:
    """End of the number token at ``start``: digits, letters, points and underscores glued
    together, a comma followed by a digit, and an exponent's sign. Taking the whole run means
    ``1e400`` or ``3.11.7`` reach the number reader whole and are read or refused whole."""
    i = start
    while i < len(text):
        char = text[i]
        following = text[i + 1] if i + 1 < len(text) else ""
        glued = char.isalnum() or char in "._" or (char == "," and following.isdigit())
        exponent_sign = char in SIGNS and text[i - 1] in "eE" and following.isdigit()
        if not (glued or exponent_sign):
            break
        i += 1
    return i


def _literal(token: str) -> Fraction:
    try:
        value = parse_number(token)
    except NumberError as error:
        raise CalculatorError(str(error)) from None
    if not decimal_within(value, MAX_LITERAL_EXPONENT):
        raise CalculatorError(f"number {token[:24]!r} is out of range")
    return _checked(Fraction(value))


def tokenize(expression: str) -> tuple[str, list[Fraction]]:
    """The expression with numbers replaced by placeholders, and the numbers' exact values."""
    parts: list[str] = []
    values: list[Fraction] = []
    previous_number = False
    i = 0
    while i < len(expression):
        char = expression[i]
        following = expression[i + 1] if i + 1 < len(expression) else ""
        if char.isspace():
            i += 1
            continue
        if char.isdigit() or (char == "." and following.isdigit()):
            end = _number_end(expression, i)
            token = expression[i:end]
            if previous_number:
                raise CalculatorError(
                    f"two numbers in a row near {token[:24]!r}: put an operator between them "
                    "(and write 1000 or 1,000, not 1 000)"
                )
            parts.append(f"{_PLACEHOLDER}{len(values)}")
            values.append(_literal(token))
            previous_number = True
            i = end
            continue
        for text, python in _OPERATORS:
            if expression.startswith(text, i):
                parts.append(python)
                i += len(text)
                previous_number = text == ")"
                break
        else:
            raise CalculatorError(f"{char!r} is not allowed in an expression")
    return " ".join(parts), values


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only whole-number exponents are supported")
    # Refuse before computing: the result has about bits(base) * |exponent| bits.
    if base not in (0, 1, -1) and _bits(base) * abs(exponent.numerator) > MAX_BITS:
        raise CalculatorError("result is too large")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    return base**exponent.numerator


def _evaluate(node: ast.AST, values: list[Fraction]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values)
    if isinstance(node, ast.Name) and node.id.startswith(_PLACEHOLDER):
        return values[int(node.id[len(_PLACEHOLDER) :])]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left = _evaluate(node.left, values)
        right = _evaluate(node.right, values)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        function = _BINARY[type(node.op)]
        if right == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
            raise CalculatorError("division by zero")
        return _checked(function(left, right))
    if isinstance(node, ast.Call):
        raise CalculatorError("write an operator between a number and a parenthesis: 2 * (3)")
    raise CalculatorError("expression is not valid arithmetic")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression, or CalculatorError saying why not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise CalculatorError("expression is empty")
    skeleton, values = tokenize(expression)
    if not values:
        raise CalculatorError("expression has no number")
    try:
        tree = ast.parse(skeleton, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("expression is not valid arithmetic") from None
    try:
        return _evaluate(tree, values)
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None


def format_value(value: Fraction) -> tuple[str, bool]:
    """Decimal text of the value and whether that text is exact."""
    if value.denominator == 1:
        return str(value.numerator), True
    decimal, exact = rounded(value, SIGNIFICANT_DIGITS)
    return format(decimal.normalize(), "f") if decimal else "0", exact
