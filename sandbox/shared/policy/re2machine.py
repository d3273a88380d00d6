"""The policy regex matcher's automaton: a Thompson NFA, run as a lazily built DFA. Linear time.

A pattern compiles to a program of instructions (consume one character from a set; split; jump;
empty-width assertion; match). Matching walks the text once, keeping the *set* of program positions
that are alive, never backtracking: each character costs at most one pass over the program, so a
match costs O(len(text) * len(program)) whatever the pattern and the text (`(A|AA)+=1`, `(a*)*b` and
`FABRIC_.+=.+` included). Each distinct set becomes a DFA state the first time it is reached, and its
transition on each character is remembered, so the usual cost per character is one dict lookup.

The DFA cache is bounded (MAX_STATES states, MAX_TRANSITIONS transitions per matcher); when full it
is dropped and rebuilt as needed, which keeps memory bounded and the time linear. Matchers are safe
to share between threads: the hot path only reads, and new states are made under a lock.

Empty-width assertions (^ $ \\A \\z \\b \\B) depend on the characters on either side of a position, so a
state also records what kind of character came before it (start of text, newline, ASCII word
character or other), and the set is closed over assertions when the next character is known.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

from sandbox.shared.policy.re2charset import CharSet
from sandbox.shared.policy.re2syntax import (
    Alternate,
    Assertion,
    Chars,
    Concat,
    EmptyWidth,
    RegexNode,
    Repeat,
)

# Instructions; a larger pattern is refused. An uncached step walks the live part of the program (about
# 0.25 µs per instruction on the host), so this caps the worst case, a value whose every character reaches
# a new DFA state, near 1.3 ms per character; ordinary patterns cost ~50 ns per character.
MAX_PROGRAM = 5_000
MAX_STATES = 2_000
MAX_TRANSITIONS = 50_000


class ProgramTooLarge(ValueError):
    """The pattern compiles to more than MAX_PROGRAM instructions."""


class Opcode(IntEnum):
    CHARS = 0    # consume a character in arg (a CharSet) and go to pc + 1
    SPLIT = 1    # go to both arg and arg2
    JUMP = 2     # go to arg
    ASSERT = 3   # go to pc + 1 if assertion arg holds here
    MATCH = 4


class CharKind(IntEnum):
    """What kind of character lies on one side of a position (EDGE: the start or end of the text)."""

    EDGE = 0
    NEWLINE = 1
    WORD = 2
    OTHER = 3


def _kind(char: str) -> CharKind:
    if char == "\n":
        return CharKind.NEWLINE
    if char == "_" or (char.isascii() and char.isalnum()):
        return CharKind.WORD
    return CharKind.OTHER


def _holds(assertion: Assertion, before: CharKind, after: CharKind) -> bool:
    if assertion == Assertion.BEGIN_TEXT:
        return before == CharKind.EDGE
    if assertion == Assertion.END_TEXT:
        return after == CharKind.EDGE
    if assertion == Assertion.BEGIN_LINE:
        return before in (CharKind.EDGE, CharKind.NEWLINE)
    if assertion == Assertion.END_LINE:
        return after in (CharKind.EDGE, CharKind.NEWLINE)
    boundary = (before == CharKind.WORD) != (after == CharKind.WORD)
    return boundary if assertion == Assertion.WORD_BOUNDARY else not boundary


# --- compiling ---------------------------------------------------------------------------------------

class _Compiler:
    def __init__(self) -> None:
        self.ops: list[Opcode] = []
        self.args: list[object] = []
        self.args2: list[int] = []

    def emit(self, op: Opcode, arg: object = None, arg2: int = -1) -> int:
        if len(self.ops) >= MAX_PROGRAM:
            raise ProgramTooLarge(f"the pattern compiles to more than {MAX_PROGRAM} instructions")
        self.ops.append(op)
        self.args.append(arg)
        self.args2.append(arg2)
        return len(self.ops) - 1

    def node(self, node: RegexNode) -> None:
        if isinstance(node, Chars):
            self.emit(Opcode.CHARS, node.chars)
        elif isinstance(node, EmptyWidth):
            if node.assertion is not None:
                self.emit(Opcode.ASSERT, node.assertion)
        elif isinstance(node, Concat):
            for item in node.items:
                self.node(item)
        elif isinstance(node, Alternate):
            self.alternate(node)
        else:
            self.repeat(node)

    def alternate(self, node: Alternate) -> None:
        exits = []
        for branch in node.branches[:-1]:
            split = self.emit(Opcode.SPLIT, len(self.ops) + 1)
            self.node(branch)
            exits.append(self.emit(Opcode.JUMP))
            self.args2[split] = len(self.ops)
        self.node(node.branches[-1])
        for jump in exits:
            self.args[jump] = len(self.ops)

    def repeat(self, node: Repeat) -> None:
        for _ in range(node.min):
            self.node(node.item)
        if node.max is None:  # x* after the required copies: L: split(L+1, out); x; jump L
            loop = self.emit(Opcode.SPLIT, len(self.ops) + 1)
            self.node(node.item)
            self.emit(Opcode.JUMP, loop)
            self.args2[loop] = len(self.ops)
            return
        skips = []  # x{0,k} as (x(x(x)?)?)?: every optional copy can skip to the end
        for _ in range(node.max - node.min):
            skips.append(self.emit(Opcode.SPLIT, len(self.ops) + 1))
            self.node(node.item)
        for split in skips:
            self.args2[split] = len(self.ops)


@dataclass(frozen=True)
class Program:
    ops: tuple[Opcode, ...]
    args: tuple[object, ...]
    args2: tuple[int, ...]
    has_assertions: bool

    def __len__(self) -> int:
        return len(self.ops)


def compile_program(tree: RegexNode, *, unanchored: bool = False) -> Program:
    """The program for `tree` matched against a whole text; with `unanchored`, against any substring
    (as if wrapped in (?s:.*) on both sides)."""
    c = _Compiler()
    anything = CharSet(negated=True)
    if unanchored:
        loop = c.emit(Opcode.SPLIT, 1)
        c.emit(Opcode.CHARS, anything)
        c.emit(Opcode.JUMP, loop)
        c.args2[loop] = len(c.ops)
    c.node(tree)
    if unanchored:
        loop = c.emit(Opcode.SPLIT, len(c.ops) + 1)
        c.emit(Opcode.CHARS, anything)
        c.emit(Opcode.JUMP, loop)
        c.args2[loop] = len(c.ops)
    c.emit(Opcode.MATCH)
    return Program(tuple(c.ops), tuple(c.args), tuple(c.args2), Opcode.ASSERT in c.ops)


# --- running -----------------------------------------------------------------------------------------

class State:
    """A DFA state: the program positions alive after the last character, and that character's kind."""

    __slots__ = ("pcs", "before", "next", "_accepts")

    def __init__(self, pcs: frozenset[int], before: CharKind) -> None:
        self.pcs = pcs
        self.before = before
        self.next: dict[str, State] = {}
        self._accepts: bool | None = None


DEAD = State(frozenset(), CharKind.EDGE)  # no program position alive: no text from here on matches
DEAD._accepts = False


class Matcher:
    """Whether a program matches a text. `steps` counts uncached transitions (for tests and benches)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._lock = threading.Lock()
        self.steps = 0
        self._reset()

    def _reset(self) -> None:
        self._states: dict[tuple[frozenset[int], CharKind], State] = {}
        self._transitions = 0
        self.start = self._state(frozenset({0}), CharKind.EDGE)

    def _state(self, pcs: frozenset[int], before: CharKind) -> State:
        if not pcs:
            return DEAD
        if not self.program.has_assertions:
            before = CharKind.OTHER  # nothing looks at it: share the states
        key = (pcs, before)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = State(pcs, before)
        return state

    def _closure(self, pcs: frozenset[int], before: CharKind, after: CharKind) -> tuple[list[int], bool]:
        """The CHARS instructions reachable from `pcs` without consuming, and whether MATCH is."""
        ops, args, args2 = self.program.ops, self.program.args, self.program.args2
        seen: set[int] = set()
        stack = list(pcs)
        consuming: list[int] = []
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op = ops[pc]
            if op == Opcode.CHARS:
                consuming.append(pc)
            elif op == Opcode.SPLIT:
                stack.append(args2[pc])
                stack.append(args[pc])  # type: ignore[arg-type]
            elif op == Opcode.JUMP:
                stack.append(args[pc])  # type: ignore[arg-type]
            elif op == Opcode.ASSERT:
                if _holds(args[pc], before, after):  # type: ignore[arg-type]
                    stack.append(pc + 1)
            else:
                matched = True
        return consuming, matched

    def step(self, state: State, char: str) -> State:
        """The state after `char` (computed, remembered and returned)."""
        with self._lock:
            self.steps += 1
            if self._transitions >= MAX_TRANSITIONS or len(self._states) >= MAX_STATES:
                self._reset()
            after = _kind(char)
            consuming, _ = self._closure(state.pcs, state.before, after)
            cp = ord(char)
            args = self.program.args
            nxt = self._state(frozenset(pc + 1 for pc in consuming if cp in args[pc]), after)  # type: ignore[operator]
            state.next[char] = nxt
            self._transitions += 1
            return nxt

    def accepts(self, state: State) -> bool:
        """Whether the text may end in `state`."""
        if state._accepts is None:
            state._accepts = self._closure(state.pcs, state.before, CharKind.EDGE)[1]
        return state._accepts

    def matches(self, text: str) -> bool:
        state = self.start
        step = self.step
        for char in text:
            state = state.next.get(char) or step(state, char)
            if state is DEAD:
                return False
        return self.accepts(state)
