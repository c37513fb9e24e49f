"""Search filters, checked before LanceDB sees them: exactly one SQL boolean expression over the table's columns.

LanceDB reads a filter as `SELECT 1 FROM t WHERE <filter>` and keeps the first expression it can parse,
silently dropping the rest: `"modality = 'image'; DROP TABLE vectors"` filters by modality and
`"modality = 'image' garbage"` does too, so a filter that is not what its writer meant runs anyway. Here the
whole string is parsed with a real SQL parser (sqlglot) and refused unless it is one expression, with nothing
after it, no comments and no subqueries, that is a condition (a comparison, `IN`, `BETWEEN`, `LIKE`, `IS`,
`AND`/`OR`/`NOT` of conditions, `TRUE`/`FALSE`, or a function call such as `array_has_any(tags, ['a'])`,
whose type LanceDB checks), and that names only the table's columns (unquoted names match regardless of case,
as in LanceDB; quoted ones, "..." or `...`, exactly). The string LanceDB receives is the one checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

EXAMPLE = "modality = 'image' AND lang IN ('en', 'de')"


class FilterError(ValueError):
    """A filter that is not exactly one boolean expression over the table's columns."""


def check_filter(where: str, columns: Iterable[str]) -> str:
    """`where` itself when it is one boolean SQL expression naming only `columns`; else `FilterError`."""
    import sqlglot.errors
    from sqlglot import exp
    from sqlglot.tokens import TokenType

    dialect = _dialect()
    if not where.strip():
        raise FilterError(f"filter is empty; give a condition such as {EXAMPLE!r}, or no filter")
    try:
        tokens = dialect.tokenize(where)
        if any(token.token_type == TokenType.SEMICOLON for token in tokens):
            raise FilterError(
                f"filter {where!r} holds more than one SQL statement (a ';' outside quotes); a filter is "
                f"exactly one condition, e.g. {EXAMPLE!r}"
            )
        if any(token.comments for token in tokens):
            raise FilterError(f"filter {where!r} contains an SQL comment; send the condition alone")
        statements = dialect.parse(where)
    except sqlglot.errors.SqlglotError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FilterError(f"filter {where!r} is not valid SQL ({first})") from exc
    expression = statements[0] if len(statements) == 1 else None
    if expression is None:  # not reached after the ';' check; kept so that no parse can slip through
        raise FilterError(f"filter {where!r} is not exactly one SQL expression, e.g. {EXAMPLE!r}")
    if isinstance(expression, exp.Alias):
        raise FilterError(
            f"filter {where!r} has {expression.alias!r} after its condition; a filter is one condition alone"
        )
    if any(isinstance(node, exp.Query | exp.Subquery) for node in expression.walk()):
        raise FilterError(
            f"filter {where!r} contains a subquery; a filter is a condition on the table's columns"
        )
    if not _is_condition(expression):
        raise FilterError(
            f"filter {where!r} is not a condition (it is {_describe(expression)}); compare it, e.g. {EXAMPLE!r}"
        )
    _check_columns(where, expression, list(columns))
    return where


def _is_condition(node) -> bool:
    """A comparison, IN, BETWEEN, LIKE, IS, TRUE/FALSE, AND/OR/NOT of conditions, or a function call (whose
    type LanceDB checks: `array_has_any(...)` is a condition, `lower(text)` is refused by LanceDB itself)."""
    from sqlglot import exp

    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Connector):  # AND, OR (before Func: sqlglot makes them functions too)
        return _is_condition(node.left) and _is_condition(node.right)
    if isinstance(node, exp.Not):
        return _is_condition(node.this)
    return isinstance(node, exp.Predicate | exp.Boolean | exp.Func)


def _describe(node) -> str:
    from sqlglot import exp

    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Column):
        return f"the column {node.sql()}"
    if isinstance(node, exp.Literal):
        return "a string" if node.is_string else "a number"
    return f"a value, {node.sql()}"


def _check_columns(where: str, expression, columns: list[str]) -> None:
    from sqlglot import exp

    exact = set(columns)
    folded = {name.casefold() for name in columns}
    for column in expression.find_all(exp.Column):
        root = column.parts[0]  # `a.b` is field b of struct column a
        name = root.name
        known = name in exact if root.quoted else name.casefold() in folded
        if not known:
            hint = " (a string goes in single quotes)" if root.quoted else ""
            raise FilterError(
                f"filter {where!r} names column {name!r}, which the table does not have{hint}; its columns: "
                + ", ".join(columns)
            )


@functools.cache
def _dialect():
    """SQL as LanceDB reads it: identifiers in double quotes or backticks, strings in single quotes."""
    from sqlglot import tokens
    from sqlglot.dialects.dialect import Dialect

    class LanceFilter(Dialect):
        class Tokenizer(tokens.Tokenizer):
            IDENTIFIERS = ['"', "`"]

    return LanceFilter()
