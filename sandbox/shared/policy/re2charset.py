"""Character sets of the policy regex matcher: ranges of code points, Unicode categories, case folding.

The sets follow Go's regexp/syntax (the RE2 dialect ACI's framework evaluates): Perl classes (\\d \\s \\w)
and POSIX classes ([:alpha:]) are ASCII-only; \\pL-style classes are Unicode general categories;
(?i) folds a set at compile time by adding every character's simple case-folding orbit, so matching
itself never folds. Python's `unicodedata` (Python 3.11: Unicode 14.0) stands in for Go's tables
(Go 1.21: Unicode 15.0); the two agree on every character assigned in 14.0. Unicode *scripts*
(\\p{Greek}) have no stdlib table and are refused by the parser.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass

MAX_CODE_POINT = 0x10FFFF
# Above this code point no character has a case mapping (checked against unicodedata by the unit tests).
LAST_CASED = 0x1E943

Ranges = tuple[tuple[int, int], ...]

# Go's perlGroup: ASCII only, and \s is [\t\n\f\r ] (no \v, unlike Python's re).
PERL: dict[str, Ranges] = {
    "d": ((0x30, 0x39),),
    "s": ((0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)),
    "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
}

# Go's posixGroup.
POSIX: dict[str, Ranges] = {
    "alnum": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "alpha": ((0x41, 0x5A), (0x61, 0x7A)),
    "ascii": ((0x00, 0x7F),),
    "blank": ((0x09, 0x09), (0x20, 0x20)),
    "cntrl": ((0x00, 0x1F), (0x7F, 0x7F)),
    "digit": ((0x30, 0x39),),
    "graph": ((0x21, 0x7E),),
    "lower": ((0x61, 0x7A),),
    "print": ((0x20, 0x7E),),
    "punct": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    "space": ((0x09, 0x0D), (0x20, 0x20)),
    "upper": ((0x41, 0x5A),),
    "word": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
    "xdigit": ((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}

# Unicode general categories as Go's unicode.Categories names them. Go's one-letter "C" is Cc|Cf|Co|Cs:
# unassigned code points (Cn) are in no category.
_TWO_LETTER = ("Cc", "Cf", "Co", "Cs", "Ll", "Lm", "Lo", "Lt", "Lu", "Mc", "Me", "Mn", "Nd", "Nl", "No",
               "Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps", "Sc", "Sk", "Sm", "So", "Zl", "Zp", "Zs")
CATEGORIES: dict[str, frozenset[str]] = {name: frozenset({name}) for name in _TWO_LETTER}
CATEGORIES.update({letter: frozenset(c for c in _TWO_LETTER if c[0] == letter) for letter in "CLMNPSZ"})


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and merge overlapping or adjacent ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def negate(ranges: Ranges) -> Ranges:
    """The complement of normalized ranges within 0..MAX_CODE_POINT."""
    out = []
    nxt = 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return tuple(out)


# --- case folding -------------------------------------------------------------------------------------

def fold_key(char: str) -> str:
    """One representative of `char`'s simple case-folding orbit (Unicode CaseFolding.txt C+S).

    str.casefold() is the full folding (C+F); where it yields several characters the simple folding is
    the lowercase mapping when that is one character ('ẞ' -> 'ß'), else the character itself ('İ')."""
    key = char.casefold()
    if len(key) != 1:
        key = char.lower()
        if len(key) != 1:
            key = char
    return key


class _Orbits:
    """Every character's case-folding orbit ('k' -> {'K', 'k', KELVIN SIGN}), built on first use (about
    0.1 s: one pass over the cased planes) and shared by all patterns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[int, ...]] | None = None
        self._folding: tuple[int, ...] = ()  # sorted code points whose orbit has more than one member

    def _build(self) -> dict[str, tuple[int, ...]]:
        with self._lock:
            if self._by_key is None:
                groups: dict[str, set[int]] = {}
                for cp in range(LAST_CASED + 1):
                    char = chr(cp)
                    key = fold_key(char)
                    if key != char or char.upper() != char:
                        groups.setdefault(key, {ord(key)}).add(cp)
                by_key = {k: tuple(sorted(v)) for k, v in groups.items() if len(v) > 1}
                self._folding = tuple(sorted(cp for members in by_key.values() for cp in members))
                self._by_key = by_key
            return self._by_key

    def orbit(self, cp: int) -> tuple[int, ...]:
        """`cp` and every code point that folds to the same character."""
        if cp > LAST_CASED:
            return (cp,)
        return self._build().get(fold_key(chr(cp)), (cp,))

    def fold_ranges(self, ranges: Ranges) -> Ranges:
        """`ranges` plus the orbit of every member (Go's appendFoldedRange)."""
        by_key = self._build()
        extra: list[tuple[int, int]] = []
        for lo, hi in ranges:
            start = bisect.bisect_left(self._folding, lo)
            stop = bisect.bisect_right(self._folding, hi)
            for cp in self._folding[start:stop]:
                extra.extend((m, m) for m in by_key[fold_key(chr(cp))])
        return normalize((*ranges, *extra))


ORBITS = _Orbits()

_ASCII_ORBITS = {ord("k"): (ord("K"), ord("k"), 0x212A), ord("s"): (ord("S"), ord("s"), 0x17F)}


def fold(ranges: Ranges) -> Ranges:
    """Close `ranges` under simple case folding. ASCII-only sets skip the Unicode table: among ASCII
    letters only k (KELVIN SIGN) and s (LONG S) have partners outside ASCII."""
    if ranges and ranges[-1][1] < 0x80:
        extra: list[tuple[int, int]] = []
        for lo, hi in ranges:
            for cp in range(max(lo, 0x41), min(hi, 0x7A) + 1):
                char = chr(cp)
                if char.isalpha():
                    lower = ord(char.lower())
                    extra.extend((m, m) for m in _ASCII_ORBITS.get(lower, (lower, ord(char.upper()))))
        return normalize((*ranges, *extra))
    return ORBITS.fold_ranges(ranges)


# --- the sets ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CategoryTest:
    """\\p{Name} (or \\P{Name}): membership in Unicode general categories, tested per character."""

    categories: frozenset[str]
    negated: bool
    folded: bool  # under (?i): true when any member of the character's orbit is in the categories

    def __call__(self, cp: int) -> bool:
        import unicodedata  # a C extension the agent needs only for \p classes: not at boot

        members = ORBITS.orbit(cp) if self.folded else (cp,)
        inside = any(unicodedata.category(chr(m)) in self.categories for m in members)
        return inside != self.negated


@dataclass(frozen=True)
class CharSet:
    """A union of code point ranges and category tests, possibly negated as a whole."""

    ranges: Ranges = ()
    tests: tuple[CategoryTest, ...] = ()
    negated: bool = False

    def __contains__(self, cp: int) -> bool:
        i = bisect.bisect_right(self.ranges, (cp, MAX_CODE_POINT + 1)) - 1
        inside = (i >= 0 and self.ranges[i][0] <= cp <= self.ranges[i][1]) or any(t(cp) for t in self.tests)
        return inside != self.negated

    def is_empty(self) -> bool:
        return not self.tests and not self.negated and not self.ranges


@functools.lru_cache(maxsize=4096)
def single(cp: int, folded: bool) -> CharSet:
    """The set one literal character stands for."""
    return CharSet(fold(((cp, cp),)) if folded else ((cp, cp),))
