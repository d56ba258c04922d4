"""containerd's filter language (pkg/filters), as containerd's List/Walk calls send it.

Grammar (from containerd)::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)?
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go string literal; after "~=" also /regex/ or |regex|

A selector without operator tests that the field is present. Selectors joined by commas must all
match; several filter strings match if any of them does. The scanner below follows containerd's
rune by rune so that edge cases (dots inside values, escapes) parse the same way.

``~=`` patterns are RE2 (Google's ``re2``), as in containerd, whose Go ``regexp`` is RE2: the same
syntax, and matching in time linear in the input, so no pattern a client sends can make a List
call spin (Python's backtracking ``re`` can take exponential time on patterns like ``(a+)+$``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import re2

from snapshotter.errors import InvalidArgumentError

MAX_PATTERN_LENGTH = 4096  # containerd's label limit; a longer pattern can match no label
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad pattern is its error, answered, not logged


def compile_pattern(pattern: str) -> Any:
    """The RE2 program for a ``~=`` value; ValueError when it is not a valid RE2 pattern."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        raise ValueError(str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc)) from None


# An adaptor answers "what is the value of this field path, and is it present?"
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


class Operator(Enum):
    PRESENT = ""
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass
class Selector:
    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    _regex: Any = field(default=None, repr=False, compare=False)  # an RE2 program

    def matches(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return present
        if self.operator is Operator.EQUAL:
            return present and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            return value != self.value
        if self._regex is None:
            self._regex = compile_pattern(self.value)
        return self._regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Any of ``alternatives`` matches when all of its selectors match; no alternatives = all."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(adaptor) for s in alt) for alt in self.alternatives)


class FilterSyntaxError(InvalidArgumentError):
    """A filter string does not parse; the message points at the offending position."""


def parse_all(filters: Iterable[str]) -> Filter:
    """Parse List's repeated ``filters`` (OR-ed). Empty strings match everything, as in containerd."""
    alternatives: list[tuple[Selector, ...]] = []
    for text in filters:
        if text == "":
            return Filter(())
        alternatives.append(_Parser(text).parse())
    return Filter(tuple(alternatives))


_EOF = "EOF"
_QUOTED, _VALUE, _FIELD, _SEPARATOR, _OPERATOR, _ILLEGAL = (
    "quoted",
    "value",
    "field",
    "separator",
    "operator",
    "illegal",
)
_QUOTES = {'"', "/", "|"}
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


class _Scanner:
    """Tokenizer following containerd's filters/scanner.go."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.after_operator = False
        self.error = ""

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def scan(self) -> tuple[int, str, str]:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(self.text):
            return start, _EOF, ""
        ch = self.text[start]
        self.pos += 1
        if ch == "\0":
            self.error = "unexpected null"
            return start, _ILLEGAL, ch
        if ch in _QUOTES:
            ok = self._scan_quoted(ch)
            return start, (_QUOTED if ok else _ILLEGAL), self.text[start : self.pos]
        if ch in ",.":
            self.after_operator = False
            return start, _SEPARATOR, ch
        if ch in "=!~":
            while self.peek() in ("=", "!", "~"):
                self.pos += 1
            self.after_operator = True
            return start, _OPERATOR, self.text[start : self.pos]
        if self.after_operator:
            while self.peek() != _EOF and _is_value_char(self.peek()):
                self.pos += 1
            self.after_operator = False
            return start, _VALUE, self.text[start : self.pos]
        if _is_field_char(ch):
            while self.peek() != _EOF and _is_field_char(self.peek()):
                self.pos += 1
            return start, _FIELD, self.text[start : self.pos]
        return start, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                self.error = "quoted literal not terminated"
                return False
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return True
            if ch == "\\":
                if self.pos >= len(self.text):
                    self.error = "quoted literal not terminated"
                    return False
                self.pos += 1  # the escaped character; validated by _unquote


def _unquote(literal: str) -> str:
    """Decode a quoted literal with Go escape rules; '/' and '|' quote like '"'."""
    quote, body = literal[0], literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        i += 1
        esc = body[i]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 1
        elif esc in (quote, "'", '"', "|", "/"):
            out.append(esc)
            i += 1
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 1 : i + 1 + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"illegal \\{esc} escape")
            out.append(chr(int(digits, 16)))
            i += 1 + width
        elif esc in "01234567":
            digits = body[i : i + 3]
            if len(digits) != 3 or any(c not in "01234567" for c in digits):
                raise ValueError("illegal octal escape")
            out.append(chr(int(digits, 8)))
            i += 3
        else:
            raise ValueError(f"illegal escape sequence \\{esc}")
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def fail(self, pos: int, msg: str) -> FilterSyntaxError:
        return FilterSyntaxError(f"filters: parse error at position {pos} of {self.text!r}: {msg}")

    def _peek_token(self) -> str:
        saved = (self.scanner.pos, self.scanner.after_operator)
        _, tok, text = self.scanner.scan()
        self.scanner.pos, self.scanner.after_operator = saved
        return text if tok == _SEPARATOR else tok

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            pos, tok, text = self.scanner.scan()
            if tok == _EOF:
                return tuple(selectors)
            if tok == _SEPARATOR and text == ",":
                selectors.append(self.selector())
                continue
            raise self.fail(pos, f"unexpected input: {text or tok!r}")

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        nxt = self._peek_token()
        if nxt in (",", _EOF):
            return Selector(fieldpath, Operator.PRESENT)
        pos, tok, text = self.scanner.scan()
        if tok == _ILLEGAL:
            raise self.fail(pos, self.scanner.error)
        if tok != _OPERATOR:
            raise self.fail(pos, 'expected an operator ("=="|"!="|"~=")')
        try:
            operator = Operator(text)
        except ValueError:
            raise self.fail(pos, f"unsupported operator {text!r}") from None
        value = self.value(allow_alt_quotes=operator is Operator.MATCHES)
        selector = Selector(fieldpath, operator, value)
        if operator is Operator.MATCHES:
            try:
                selector._regex = compile_pattern(value)
            except ValueError as exc:
                raise self.fail(pos, f"invalid regular expression {value!r}: {exc}") from None
        return selector

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self._peek_token() == ".":
            self.scanner.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes=False)
        if tok == _ILLEGAL:
            raise self.fail(pos, self.scanner.error)
        raise self.fail(pos, "expected field or quoted")

    def value(self, *, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok in (_VALUE, _FIELD):
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes=allow_alt_quotes)
        if tok == _ILLEGAL:
            raise self.fail(pos, self.scanner.error)
        raise self.fail(pos, "expected value or quoted")

    def unquote(self, pos: int, text: str, *, allow_alt_quotes: bool) -> str:
        if not allow_alt_quotes and text[0] != '"':
            raise self.fail(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except (ValueError, IndexError) as exc:
            raise self.fail(pos, f"unquoting failed: {exc}") from None
