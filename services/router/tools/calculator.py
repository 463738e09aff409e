"""Exact arithmetic over fractions, evaluated from a whitelisted ``ast`` tree, never eval.

Only numbers, + - * / // % **, unary signs and parentheses are accepted. Decimal literals are
read from their source text so 0.1 + 0.2 is exactly 0.3. Every intermediate value is bounded
in size, and a power is refused before it is computed if its result would be too large.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from decimal import Context, Decimal
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200
# About 3,000 decimal digits: far below Python's 4,300-digit int-to-str limit.
MAX_BITS = 10_000
SIGNIFICANT_DIGITS = 20

_LITERAL = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    """The expression is not allowed or has no value (division by zero, too large)."""


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _checked(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise CalculatorError("result is too large")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only whole-number exponents are supported")
    # Refuse before computing: the result has about bits(base) * |exponent| bits.
    if base not in (0, 1, -1) and _bits(base) * abs(exponent.numerator) > MAX_BITS:
        raise CalculatorError("result is too large")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    return base**exponent.numerator


def _evaluate(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, source)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        text = ast.get_source_segment(source, node) or ""
        if not _LITERAL.fullmatch(text):
            raise CalculatorError(f"number {text[:20]!r} is not a plain decimal")
        return _checked(Fraction(text))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _evaluate(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left = _evaluate(node.left, source)
        right = _evaluate(node.right, source)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        function = _BINARY.get(type(node.op))
        if function is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        if right == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
            raise CalculatorError("division by zero")
        return _checked(function(left, right))
    raise CalculatorError(f"{type(node).__name__} is not allowed in an expression")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression, or CalculatorError saying why not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise CalculatorError("expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("expression is not valid arithmetic") from None
    return _evaluate(tree, expression.strip())


def format_value(value: Fraction) -> tuple[str, bool]:
    """Decimal text of the value and whether that text is exact."""
    if value.denominator == 1:
        return str(value.numerator), True
    context = Context(prec=SIGNIFICANT_DIGITS)
    decimal = context.divide(Decimal(value.numerator), Decimal(value.denominator))
    exact = Fraction(decimal) == value
    return format(decimal.normalize(context), "f"), exact
