"""The parser of the policy regex matcher: RE2 syntax as Go's regexp accepts it, into a small tree.

ACI's framework evaluates `re2` rules with Go's regexp (through Rego's regex.match), so the syntax and
the meaning follow Go's regexp/syntax with its Perl flags: (?flags) and (?flags:re) with i, m, s and U;
non-capturing and named groups; \\A \\z \\b \\B; \\Q...\\E; Perl, POSIX and Unicode-category classes;
octal and \\x escapes; escaped punctuation; `{` that does not start a valid repeat is a literal;
repeat counts at most 1000. What Go refuses is refused here with Go's reason: backreferences,
lookaround, possessive and stacked repeats, unknown escapes. `.` excludes only \\n, `$` without (?m)
is the end of the text (no trailing-newline exception) and negated classes include \\n, as in Go.

Capture groups and greediness are parsed and then forgotten: policies only ask whether a value
matches, and the answer does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from sandbox.shared.policy import re2charset as cs
from sandbox.shared.policy.re2charset import CategoryTest, CharSet

MAX_REPEAT = 1000          # Go's and RE2's limit on a repeat count, also on nested repeats' product
MAX_HEIGHT = 100           # groups and repeats inside each other (Go: 1000); bounds every recursion here


class SyntaxProblem(ValueError):
    """A pattern that Go's regexp would refuse (or, rarely, one this matcher cannot evaluate)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.position = position


class Assertion(StrEnum):
    BEGIN_TEXT = "begin-text"        # ^ without (?m), \A
    END_TEXT = "end-text"            # $ without (?m), \z
    BEGIN_LINE = "begin-line"        # ^ with (?m)
    END_LINE = "end-line"            # $ with (?m)
    WORD_BOUNDARY = "word-boundary"  # \b (ASCII word characters, as in Go)
    NOT_WORD_BOUNDARY = "not-word-boundary"


# --- the tree ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chars:
    """One character from a set (literals, classes and `.` alike)."""

    chars: CharSet


@dataclass(frozen=True)
class EmptyWidth:
    """The empty string, or an empty-width assertion."""

    assertion: Assertion | None = None


@dataclass(frozen=True)
class Concat:
    items: tuple[RegexNode, ...]


@dataclass(frozen=True)
class Alternate:
    branches: tuple[RegexNode, ...]


@dataclass(frozen=True)
class Repeat:
    item: RegexNode
    min: int
    max: int | None  # None: unbounded


RegexNode = Chars | EmptyWidth | Concat | Alternate | Repeat


def repeat_product_ok(node: RegexNode, budget: int = MAX_REPEAT) -> bool:
    """Go's repeatIsValid: nested counted repeats may not multiply to more than 1000 copies."""
    if isinstance(node, Repeat):
        count = node.max if node.max is not None else node.min
        if count > budget:
            return False
        if count > 0:
            budget //= count
        return repeat_product_ok(node.item, budget)
    if isinstance(node, Concat):
        return all(repeat_product_ok(n, budget) for n in node.items)
    if isinstance(node, Alternate):
        return all(repeat_product_ok(n, budget) for n in node.branches)
    return True


# --- the parser ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flags:
    fold: bool = False       # i
    multiline: bool = False  # m
    dotnl: bool = False      # s
    ungreedy: bool = False   # U (parsed; greediness does not change whether a value matches)


_FLAG_NAMES = {"i": "fold", "m": "multiline", "s": "dotnl", "U": "ungreedy"}
_SIMPLE_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_UNSUPPORTED_GROUPS = (
    ("(?=", "lookahead (?= is not RE2 syntax"), ("(?!", "negative lookahead (?! is not RE2 syntax"),
    ("(?<=", "lookbehind (?<= is not RE2 syntax"), ("(?<!", "negative lookbehind (?<! is not RE2 syntax"),
    ("(?P=", "backreference (?P= is not RE2 syntax"), ("(?P>", "recursion (?P> is not RE2 syntax"),
    ("(?#", "comment group (?# is not RE2 syntax"), ("(?>", "atomic group (?> is not RE2 syntax"),
    ("(?(", "conditional (?( is not RE2 syntax"),
)
_NOT_NEWLINE = CharSet(((0x0A, 0x0A),), negated=True)
_ANY = CharSet(((0, cs.MAX_CODE_POINT),))


def _is_ascii_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _hex_value(c: str) -> int:
    return int(c, 16) if len(c) == 1 and c in "0123456789abcdefABCDEF" else -1


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.pos = 0
        self.flags = Flags()
        self.nesting = 0  # open groups: bounds the parser's own recursion

    def fail(self, message: str, position: int | None = None) -> SyntaxProblem:
        return SyntaxProblem(message, self.pos if position is None else position)

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    # -- structure ----------------------------------------------------------------------------------

    def parse(self) -> RegexNode:
        node, _ = self.alternation()
        if self.pos < len(self.text):  # only a ')' stops an alternation early
            raise self.fail("unexpected ): no group is open")
        return node

    def alternation(self) -> tuple[RegexNode, int]:
        """An alternation and its tree height."""
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.concatenation())
        if len(branches) == 1:
            return branches[0]
        return Alternate(tuple(node for node, _ in branches)), 1 + max(height for _, height in branches)

    def concatenation(self) -> tuple[RegexNode, int]:
        items: list[RegexNode] = []
        heights: list[int] = []
        last_was_repeat = False
        while self.pos < len(self.text) and self.text[self.pos] not in "|)":
            start = self.pos
            bounds = self.repeat_operator()
            if bounds is not None:
                if last_was_repeat:
                    raise self.fail(f"invalid nested repetition operator {self.text[start:self.pos]!r}", start)
                if not items:
                    raise self.fail(f"missing argument to repetition operator {self.text[start:self.pos]!r}", start)
                low, high = bounds
                items[-1] = Repeat(items[-1], low, high)
                heights[-1] = self.check_height(heights[-1] + 1, start)
                if (low >= 2 or (high or 0) >= 2) and not repeat_product_ok(items[-1]):
                    raise self.fail(f"invalid repeat count {self.text[start:self.pos]!r}: nested repeats "
                                    f"exceed {MAX_REPEAT} copies", start)
                last_was_repeat = True
                continue
            last_was_repeat = False
            for node, height in self.atom():
                items.append(node)
                heights.append(height)
        if len(items) == 1:
            return items[0], heights[0]
        return (Concat(tuple(items)), 1 + max(heights)) if items else (EmptyWidth(), 1)

    def repeat_operator(self) -> tuple[int, int | None] | None:
        """Consume *, +, ? or a valid {n}, {n,}, {n,m} (each optionally followed by ?)."""
        c = self.peek()
        if c in ("*", "+", "?") and c:
            self.pos += 1
            bounds: tuple[int, int | None] = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            parsed = self.counted_repeat()
            if parsed is None:
                return None
            bounds = parsed
        else:
            return None
        if self.peek() == "?":
            self.pos += 1  # non-greedy: same language
        return bounds

    def counted_repeat(self) -> tuple[int, int | None] | None:
        """{n}, {n,} or {n,m} at pos; None (and nothing consumed) if it is not one, then `{` is a literal."""
        start = self.pos
        i = start + 1
        low, i = self.decimal(i)
        if low is None:
            return None
        high: int | None = low
        if self.text[i:i + 1] == ",":
            i += 1
            if self.text[i:i + 1] == "}":
                high = None
            else:
                high, i = self.decimal(i)
                if high is None:
                    return None
        if self.text[i:i + 1] != "}":
            return None
        self.pos = i + 1
        if low > MAX_REPEAT or (high is not None and (high > MAX_REPEAT or low > high)):
            raise self.fail(f"invalid repeat count {self.text[start:self.pos]!r} (at most {MAX_REPEAT}, "
                            "and the minimum may not exceed the maximum)", start)
        return low, high

    def decimal(self, i: int) -> tuple[int | None, int]:
        """Go's parseInt: digits without a leading zero (except "0" itself)."""
        j = i
        while j < len(self.text) and self.text[j] in "0123456789":
            j += 1
        digits = self.text[i:j]
        if not digits or (len(digits) > 1 and digits[0] == "0"):
            return None, i
        return (int(digits) if len(digits) <= 9 else MAX_REPEAT + 1), j

    def check_height(self, height: int, position: int) -> int:
        if height > MAX_HEIGHT:
            raise self.fail(f"groups and repeats nested more than {MAX_HEIGHT} deep", position)
        return height

    # -- atoms --------------------------------------------------------------------------------------

    def atom(self) -> list[tuple[RegexNode, int]]:
        """The next atom (several literals for \\Q...\\E, none for a bare (?flags))."""
        c = self.text[self.pos]
        if c == "(":
            return self.group()
        if c == "[":
            return [(Chars(self.char_class()), 1)]
        if c == "\\":
            return self.escape_atom()
        self.pos += 1
        if c == ".":
            return [(Chars(_ANY if self.flags.dotnl else _NOT_NEWLINE), 1)]
        if c == "^":
            return [(EmptyWidth(Assertion.BEGIN_LINE if self.flags.multiline else Assertion.BEGIN_TEXT), 1)]
        if c == "$":
            return [(EmptyWidth(Assertion.END_LINE if self.flags.multiline else Assertion.END_TEXT), 1)]
        return [(self.literal(ord(c)), 1)]

    def literal(self, cp: int) -> Chars:
        return Chars(cs.single(cp, self.flags.fold))

    def group(self) -> list[tuple[RegexNode, int]]:
        start = self.pos
        rest = self.text[start:start + 4]
        for prefix, message in _UNSUPPORTED_GROUPS:
            if rest.startswith(prefix):
                raise self.fail(message, start)
        saved = self.flags
        if rest.startswith("(?P<") or (rest.startswith("(?<") and rest[3:4] not in ("=", "!")):
            self.pos += 4 if rest.startswith("(?P<") else 3
            end = self.text.find(">", self.pos)
            name = self.text[self.pos:end] if end >= 0 else ""
            if end < 0 or not name or not all(ch == "_" or _is_ascii_alnum(ch) for ch in name):
                raise self.fail("invalid named capture: a name is one or more of A-Z a-z 0-9 _, closed by >",
                                start)
            self.pos = end + 1
        elif rest.startswith("(?"):
            self.pos += 2
            opens_group = self.flag_settings(start)
            if not opens_group:
                return []  # (?flags): applies to the rest of the enclosing group
        else:
            self.pos += 1
        self.nesting = self.check_height(self.nesting + 1, start)
        node, height = self.alternation()
        if self.peek() != ")":
            raise self.fail("missing closing ): the group is not closed", start)
        self.pos += 1
        self.nesting -= 1
        self.flags = saved
        return [(node, self.check_height(height + 1, start))]

    def flag_settings(self, start: int) -> bool:
        """Parse `flags)` or `flags:` after '(?'; set the flags; True when a group opens (':')."""
        flags = self.flags
        negated = False
        seen_since_minus = False
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c in _FLAG_NAMES:
                flags = replace(flags, **{_FLAG_NAMES[c]: not negated})
                seen_since_minus = True
            elif c == "-" and not negated:
                negated, seen_since_minus = True, False
            elif c in ":)" and (seen_since_minus or not negated):
                self.flags = flags
                return c == ":"
            else:
                break
        raise self.fail(f"invalid or unsupported flag group {self.text[start:self.pos]!r} (flags are i, m, s "
                        "and U, e.g. (?i) or (?i-s:...))", start)

    def escape_atom(self) -> list[tuple[RegexNode, int]]:
        start = self.pos
        c = self.peek(1)
        assertions = {"A": Assertion.BEGIN_TEXT, "z": Assertion.END_TEXT, "b": Assertion.WORD_BOUNDARY,
                      "B": Assertion.NOT_WORD_BOUNDARY}
        if c in assertions and c:
            self.pos += 2
            return [(EmptyWidth(assertions[c]), 1)]
        if c == "Q":
            end = self.text.find("\\E", start + 2)
            literal = self.text[start + 2:] if end < 0 else self.text[start + 2:end]
            self.pos = len(self.text) if end < 0 else end + 2
            return [(self.literal(ord(ch)), 1) for ch in literal]
        if c == "C":
            raise self.fail("invalid escape \\C (any byte) is not supported by Go's regexp", start)
        if c in ("p", "P") and c:
            return [(Chars(CharSet(tests=(self.unicode_class(),))), 1)]
        if c and c in "dswDSW":
            self.pos += 2
            return [(Chars(self.perl_class(c)), 1)]
        return [(self.literal(self.escape()), 1)]

    def escape(self) -> int:
        """A single-character escape at pos (outside or inside a class); returns its code point."""
        start = self.pos
        c = self.peek(1)
        if not c:
            raise self.fail("trailing backslash at end of expression", start)
        self.pos += 2
        if c in "01234567":
            if c != "0" and self.peek() not in tuple("01234567"):
                raise self.fail(f"invalid escape \\{c}: backreferences are not RE2 syntax", start)
            value = int(c)
            for _ in range(2):
                if self.peek() and self.peek() in "01234567":
                    value = value * 8 + int(self.peek())
                    self.pos += 1
            return value
        if c == "x":
            return self.hex_escape(start)
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c.isascii() and not c.isalnum():
            return ord(c)
        raise self.fail(f"invalid escape \\{c}", start)

    def hex_escape(self, start: int) -> int:
        if self.peek() == "{":
            end = self.text.find("}", self.pos)
            digits = self.text[self.pos + 1:end] if end >= 0 else ""
            if digits and all(_hex_value(d) >= 0 for d in digits) and int(digits, 16) <= cs.MAX_CODE_POINT:
                self.pos = end + 1
                return int(digits, 16)
        elif _hex_value(self.peek()) >= 0 and _hex_value(self.peek(1)) >= 0:
            value = int(self.text[self.pos:self.pos + 2], 16)
            self.pos += 2
            return value
        raise self.fail("invalid escape: \\x takes two hex digits or \\x{HEX} up to 10FFFF", start)

    def perl_class(self, c: str) -> CharSet:
        ranges = cs.PERL[c.lower()]
        if self.flags.fold:
            ranges = cs.fold(ranges)
        return CharSet(ranges, negated=c.isupper())

    def unicode_class(self) -> CategoryTest:
        """\\pN, \\p{Name}, \\p{^Name} and the \\P forms: Unicode general categories (and Any)."""
        start = self.pos
        negated = self.peek(1) == "P"
        self.pos += 2
        if self.peek() == "{":
            end = self.text.find("}", self.pos)
            if end < 0:
                raise self.fail("invalid character class range: \\p{ is not closed", start)
            name = self.text[self.pos + 1:end]
            self.pos = end + 1
        else:
            name = self.peek()
            if not name:
                raise self.fail("invalid character class range: \\p needs a name", start)
            self.pos += 1
        if name.startswith("^"):
            negated, name = not negated, name[1:]
        if name == "Any":
            return CategoryTest(frozenset(), not negated, False)
        if name not in cs.CATEGORIES:
            raise self.fail(f"unsupported Unicode class \\p{{{name}}}: only general categories (L, Lu, Nd, ...) "
                            "and Any are available; spell a script out as ranges", start)
        return CategoryTest(cs.CATEGORIES[name], negated, self.flags.fold)

    def char_class(self) -> CharSet:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        tests: list[CategoryTest] = []
        first = True
        while first or self.peek() != "]":
            if self.pos >= len(self.text):
                raise self.fail("missing closing ]: the character class is not closed", start)
            first = False
            if self.text.startswith("[:", self.pos) and (end := self.text.find(":]", self.pos + 2)) >= 0:
                name = self.text[self.pos + 2:end]
                self.pos = end + 2
                posix_negated = name.startswith("^")
                if name.removeprefix("^") not in cs.POSIX:
                    raise self.fail(f"invalid character class [:{name}:] (the POSIX classes are "
                                    f"{', '.join(sorted(cs.POSIX))})", self.pos - len(name) - 4)
                group = cs.POSIX[name.removeprefix("^")]
                group = cs.fold(group) if self.flags.fold else group
                ranges.extend(cs.negate(group) if posix_negated else group)
                continue
            if self.peek() == "\\" and self.peek(1) in ("p", "P") and self.peek(1):
                tests.append(self.unicode_class())
                continue
            if self.peek() == "\\" and self.peek(1) and self.peek(1) in "dswDSW":
                perl = self.perl_class(self.peek(1))
                self.pos += 2
                ranges.extend(cs.negate(perl.ranges) if perl.negated else perl.ranges)
                continue
            range_start = self.pos
            low = self.class_char(start)
            high = low
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                high = self.class_char(start)
                if high < low:
                    raise self.fail(f"invalid character class range {self.text[range_start:self.pos]!r}",
                                    range_start)
            ranges.append((low, high))
        self.pos += 1
        merged = cs.normalize(ranges)
        if self.flags.fold:
            merged = cs.fold(merged)
        return CharSet(merged, tuple(tests), negated)

    def class_char(self, class_start: int) -> int:
        c = self.peek()
        if not c:
            raise self.fail("missing closing ]: the character class is not closed", class_start)
        if c == "\\":
            return self.escape()
        self.pos += 1
        return ord(c)


def parse(pattern: str) -> RegexNode:
    """The tree of an RE2 pattern; SyntaxProblem (with the position) when Go's regexp would refuse it."""
    return _Parser(pattern).parse()
