"""Policy regexes: the RE2 subset that Python's `re` evaluates identically, always matched whole.

ACI's framework evaluates `re2` patterns with Go's regexp (RE2 syntax) after wrapping them in `^...$`.
We differ on purpose in one way: a pattern always has to match the *entire* value. The framework's
`^A=1|B=1$` only anchors the first alternative at the start and the last at the end, so `A=1;X=2`
passes there; here `A=1|B=1` admits exactly `A=1` and `B=1`. `re.fullmatch` gives that, and unlike
`$` it does not accept a trailing newline.

Constructs whose meaning differs between RE2 and Python, or that only one of them has, are refused
with a message naming the construct, so a policy means the same thing in the guest as it would in
ACI. `\\z` (RE2's end of text) is accepted and translated to Python's `\\Z`. Matching uses re.ASCII:
RE2's `\\d`, `\\w`, `\\s` and `\\b` are ASCII-only.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Flags both engines accept with the same meaning.
_FLAGS = set("ims")
_QUANTIFIER_END = set("*+?}")
# Escapes with one meaning in both engines (any escaped punctuation is a literal in both, too).
_ESCAPE_LETTERS = set("afnrtvxdDsSwWbBAz")


class RegexError(ValueError):
    """A pattern is not valid, or uses a construct outside the RE2/Python common subset."""


def _group_opening(pattern: str, i: int) -> int:
    """Check the construct starting at '(' + '?' at pattern[i]; return how many chars to skip."""
    rest = pattern[i + 2:]
    if rest.startswith("P<"):
        return 4
    if rest.startswith(":"):
        return 3
    bad = {
        "=": "lookahead '(?='", "!": "negative lookahead '(?!'", "<=": "lookbehind '(?<='",
        "<!": "negative lookbehind '(?<!'", "P=": "backreference '(?P='", "P>": "recursion '(?P>'",
        "#": "comment '(?#'", ">": "atomic group '(?>'", "(": "conditional '(?('",
        "<": "named group '(?<name>' (use '(?P<name>')",
    }
    for prefix, what in bad.items():
        if rest.startswith(prefix):
            raise RegexError(f"{what} at position {i} is not supported (RE2 has no such construct)")
    j = 0
    while j < len(rest) and rest[j] not in ":)":
        if rest[j] != "-" and rest[j] not in _FLAGS:
            raise RegexError(f"flag {rest[j]!r} at position {i + 2 + j} is not supported (use i, m or s)")
        j += 1
    if j == len(rest):
        raise RegexError(f"unterminated group at position {i}")
    return 2 + j + 1


def _escape(pattern: str, i: int, in_class: bool) -> str:
    """Return the translation of the escape at pattern[i] ('\\' + one char)."""
    if i + 1 >= len(pattern):
        raise RegexError("pattern ends with a lone backslash")
    c = pattern[i + 1]
    if c.isdigit():
        raise RegexError(f"'\\{c}' at position {i} is not supported (backreferences and octal escapes differ "
                         "between RE2 and Python; use \\xHH)")
    if c == "Z":
        raise RegexError(f"'\\Z' at position {i} is not RE2 syntax (use \\z)")
    if c == "x" and pattern[i + 2:i + 3] == "{":
        raise RegexError(f"'\\x{{...}}' at position {i} is not supported (use \\xHH)")
    if c.isalnum() and c not in _ESCAPE_LETTERS:
        raise RegexError(f"'\\{c}' at position {i} is not supported (it is not an escape that RE2 and Python "
                         "both read the same way)")
    if c == "z":
        if in_class:
            raise RegexError(f"'\\z' at position {i} is not allowed inside a character class")
        return "\\Z"
    return pattern[i:i + 2]


def translate(pattern: str) -> str:
    """Check that `pattern` is in the common subset and return its Python spelling."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(_escape(pattern, i, in_class=False))
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1  # a leading ']' is a literal
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\":
                    out_escape = _escape(pattern, j, in_class=True)
                    if out_escape != pattern[j:j + 2]:
                        raise RegexError(f"escape at position {j} is not allowed inside a character class")
                    j += 2
                    continue
                if pattern[j] == "[" and pattern[j + 1:j + 2] in (":", "=", "."):
                    raise RegexError(f"POSIX class at position {j} is not supported (spell the range out)")
                if pattern[j] == "[" or pattern[j:j + 2] in ("--", "&&", "~~", "||"):
                    raise RegexError(f"{pattern[j:j + 2]!r} inside a character class at position {j} "
                                     "is ambiguous between RE2 and Python (escape it)")
                j += 1
            if j >= n:
                raise RegexError(f"unterminated character class at position {i}")
            out.append(pattern[i:j + 1])
            i = j + 1
        elif c == "(" and pattern[i + 1:i + 2] == "?":
            skip = _group_opening(pattern, i)
            out.append(pattern[i:i + skip])
            i += skip
        elif c == "{" and pattern[i + 1:i + 2] == ",":
            raise RegexError(f"'{{,n}}' at position {i} means different things in RE2 and Python "
                             "(use {0,n})")
        elif c == "+" and i > 0 and pattern[i - 1] in _QUANTIFIER_END and not _escaped(pattern, i - 1):
            raise RegexError(f"possessive quantifier at position {i - 1} is not supported")
        else:
            out.append(c)
            i += 1
    translated = "".join(out)
    try:
        re.compile(translated, re.ASCII)
    except re.error as e:
        raise RegexError(f"does not compile: {e.msg} at position {e.pos}") from None
    return translated


def _escaped(pattern: str, i: int) -> bool:
    """Is pattern[i] escaped by an odd number of backslashes?"""
    k = i - 1
    while k >= 0 and pattern[k] == "\\":
        k -= 1
    return (i - 1 - k) % 2 == 1


def whole_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate that is true when `pattern` matches the whole string (see the module docstring)."""
    compiled = re.compile(translate(pattern), re.ASCII)
    fullmatch = compiled.fullmatch
    return lambda value: fullmatch(value) is not None
