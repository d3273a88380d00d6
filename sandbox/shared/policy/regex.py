"""Policy regexes: RE2 (Go regexp) syntax and meaning, matched in linear time, always against the whole value.

ACI's framework evaluates `re2` rules with Go's regexp after wrapping them in `^...$`. We differ on
purpose in one way: a pattern always has to match the *entire* value. The framework's `^A=1|B=1$`
only anchors the first alternative at the start and the last at the end, so `A=1;X=2` passes there;
here `A=1|B=1` admits exactly `A=1` and `B=1`.

Everything else is Go's: the syntax (re2syntax.py), including inline flags such as `((?i)FABRIC)_.+`,
POSIX classes such as `[[:alpha:]]` and Unicode categories such as `\\pL`; `.` not matching `\\n`
without (?s); `$` without (?m) meaning the end of the text; ASCII-only `\\d`, `\\s`, `\\w` and `\\b`.
Matching never backtracks (re2machine.py): host-chosen values cannot make a policy decision slow,
whatever the pattern. Patterns compile once (when the policy is loaded) and are shared.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.shared.policy.re2machine import Matcher, Program
    from sandbox.shared.policy.re2syntax import RegexNode


class RegexError(ValueError):
    """A pattern that is not valid RE2 syntax, or that is too large to evaluate."""


class Regex:
    """A compiled policy pattern."""

    def __init__(self, pattern: str, tree: RegexNode) -> None:
        from sandbox.shared.policy.re2machine import Matcher  # see compile_regex

        self.pattern = pattern
        self._tree = tree
        self._whole = Matcher(_program(pattern, tree, unanchored=False))
        self._anywhere: Matcher | None = None

    def fullmatch(self, value: str) -> bool:
        """Whether the pattern matches all of `value` (how policies use it)."""
        return self._whole.matches(value)

    def search(self, value: str) -> bool:
        """Whether the pattern matches some substring of `value` (Go's MatchString)."""
        if self._anywhere is None:
            from sandbox.shared.policy.re2machine import Matcher  # see compile_regex

            self._anywhere = Matcher(_program(self.pattern, self._tree, unanchored=True))
        return self._anywhere.matches(value)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def _program(pattern: str, tree: RegexNode, *, unanchored: bool) -> Program:
    from sandbox.shared.policy.re2machine import ProgramTooLarge, compile_program

    try:
        return compile_program(tree, unanchored=unanchored)
    except ProgramTooLarge as e:
        raise RegexError(f"is too large: {e} (split the rule, or use shorter repeat counts)") from None


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> Regex:
    """Parse and compile `pattern` (cached: the same rule in many containers compiles once).

    The matcher's modules load on the first pattern, when a policy is loaded, not when the agent
    boots (about 4 ms on the host, an order of magnitude more under TCG); no import cycle hides here."""
    from sandbox.shared.policy.re2syntax import SyntaxProblem, parse

    try:
        tree = parse(pattern)
    except SyntaxProblem as e:
        raise RegexError(f"is not valid RE2 syntax: {e}") from None
    return Regex(pattern, tree)


def check(pattern: str) -> None:
    """Raise RegexError (saying what and where) unless `pattern` is a valid policy regex."""
    compile_regex(pattern)


def whole_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate that is true when `pattern` matches the whole string (see the module docstring)."""
    return compile_regex(pattern).fullmatch
