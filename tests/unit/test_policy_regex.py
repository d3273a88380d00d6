"""Policy regexes: RE2 (Go regexp) syntax and meaning, whole-value matching, and linear time.

Test data: the env and mount patterns below are the shapes confcom writes into real ACI policies
(its fabric, managed-identity, restart and debug-mode env rules, its POSIX-class sample, its sandbox
mount sources), written here from reading confcom's templates; the Go semantics rows come from Go's
regexp/syntax documentation. The differential test checks the common subset against Python's `re`.
"""

from __future__ import annotations

import random
import re
import threading
import time
import unicodedata

import pytest

from sandbox.shared.policy import re2charset, re2machine
from sandbox.shared.policy.regex import RegexError, check, compile_regex, whole_matcher

# ---------------------------------------------------------------------------------------------------
# The patterns real confcom policies carry

CONFCOM_ROWS = [
    # the fabric rule, in both spellings confcom has used
    ("((?i)FABRIC)_.+=.+", "Fabric_NodeName=_Node_0", True),
    ("((?i)FABRIC)_.+=.+", "FABRIC_APPLICATIONNAME=fabric:/app", True),
    ("((?i)FABRIC)_.+=.+", "fAbRiC_x=y", True),
    ("((?i)FABRIC)_.+=.+", "FABRIC_=x", False),          # .+ needs one character before '='
    ("((?i)FABRIC)_.+=.+", "FABRIC_X=", False),
    ("((?i)FABRIC)_.+=.+", "fabric_x=1\nLD_PRELOAD=/x", False),   # '.' stops at a newline
    ("((?i)FABRIC)_.+=.+", "XFABRIC_A=1", False),         # whole value
    ("(?i)(FABRIC)_.+=.+", "fabric_a=b", True),
    ("(?i)(FABRIC)_.+=.+", "fabric_a=b=c", True),
    ("HOSTNAME=.+", "HOSTNAME=sandbox-7", True),
    ("HOSTNAME=.+", "HOSTNAME=", False),
    ("T(E)?MP=.+", "TMP=/tmp", True),
    ("T(E)?MP=.+", "TEMP=/tmp", True),
    ("T(E)?MP=.+", "TEEMP=/tmp", False),
    ("FabricPackageFileName=.+", "FabricPackageFileName=pkg.xml", True),
    ("IDENTITY_API_VERSION=.+", "IDENTITY_API_VERSION=2019-08-01", True),
    ("IDENTITY_HEADER=.+", "IDENTITY_HEADER=", False),
    ("azurecontainerinstance_restarted_by=.+", "azurecontainerinstance_restarted_by=user", True),
    (".+=.+", "ANY=thing", True),                           # debug mode admits every variable...
    (".+=.+", "=x", False),                                 # ...with a name
    ("TEST_REGEXP_ENV=test_regexp_env_[[:alpha:]]*", "TEST_REGEXP_ENV=test_regexp_env_abcXYZ", True),
    ("TEST_REGEXP_ENV=test_regexp_env_[[:alpha:]]*", "TEST_REGEXP_ENV=test_regexp_env_", True),
    ("TEST_REGEXP_ENV=test_regexp_env_[[:alpha:]]*", "TEST_REGEXP_ENV=test_regexp_env_ab1", False),
    ("PREFIX_.+=.+", "PREFIX_A=1", True),
    ("API_KEY=(?s:.*)", "API_KEY=line1\nline2", True),     # secure values may hold newlines
    ("/run/parma/sandbox/tmp/atlas/emptydir/.+", "/run/parma/sandbox/tmp/atlas/emptydir/cache", True),
    ("/run/parma/sandbox/tmp/atlas/emptydir/.+", "/run/parma/sandbox/tmp/atlas/emptydir/", False),
    ("/run/gcs/c/[0-9a-f]{64}/rootfs", "/run/gcs/c/" + "ab" * 32 + "/rootfs", True),
    ("/run/gcs/c/[0-9a-f]{64}/rootfs", "/run/gcs/c/" + "ab" * 31 + "/rootfs", False),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), CONFCOM_ROWS)
def test_confcom_patterns(pattern: str, value: str, expected: bool) -> None:
    assert whole_matcher(pattern)(value) is expected


def test_python_re_cannot_even_compile_the_fabric_rule() -> None:
    """Why a matcher of our own: Python's re rejects the inline flag group confcom emits."""
    with pytest.raises(re.error):
        re.compile("((?i)FABRIC)_.+=.+")
    check("((?i)FABRIC)_.+=.+")


# ---------------------------------------------------------------------------------------------------
# Go's meaning, where it differs from Python's re (each row is what Go's regexp answers)

GO_ROWS = [
    ("A=.*", "A=1\nB=2", False),
    ("A=.*", "A=1\n", False),
    ("A=1$", "A=1\n", False),                # $ is the end of the text, no trailing-newline exception
    ("^A=1$", "A=1", True),
    ("A=1|B=1", "A=1", True),
    ("A=1|B=1", "A=1;X=2", False),           # whole value: the framework's ^A=1|B=1$ would pass this
    ("\\s", "\v", False),                    # Go's \s is [\t\n\f\r ]
    ("\\s", "\f", True),
    ("[[:space:]]", "\v", True),             # ...but [[:space:]] has \v
    ("\\d+", "١٢", False),                   # ASCII digits only
    ("\\w+", "é", False),
    ("\\pL+", "héllo", True),
    ("\\p{L}\\p{Nd}", "ж7", True),
    ("\\p{Lu}", "a", False),
    ("(?i)\\p{Lu}", "a", True),              # folding applies to Unicode classes too
    ("\\PL", "7", True),
    ("\\p{^L}", "a", False),
    ("\\P{^L}", "a", True),
    ("\\p{Any}", "\n", True),
    ("[\\pL\\d_]+", "ab_12ß", True),
    ("a{,2}", "a{,2}", True),                # {,n} is not a repeat in Go: literal text
    ("a{,2}", "aa", False),
    ("a{01}", "a{01}", True),                # nor is a count with a leading zero
    ("a{2}", "aa", True),
    ("a{2,}", "aaaa", True),
    ("a{2,3}", "aaaa", False),
    ("a{0}", "", True),
    ("x{", "x{", True),
    ("}", "}", True),
    ("]", "]", True),
    ("\\Qa.b*c\\E", "a.b*c", True),
    ("\\Qa.b*c\\E", "axbbc", False),
    ("\\Qa.b", "a.b", True),                 # \Q runs to the end without \E
    ("\\12", "\n", True),                    # octal
    ("\\0", "\0", True),
    ("\\101\\x41\\x{41}", "AAA", True),
    ("\\x{263a}", "\u263a", True),
    ("\\a\\f\\t\\v\\r\\n", "\a\f\t\v\r\n", True),
    ("\\_\\-\\ \\#\\~\\&", "_- #~&", True),      # escaped punctuation is literal (re.escape output works)
    ("(?i)k", "\u212a", True),                # KELVIN SIGN folds to k
    ("(?i)s", "\u017f", True),                # LONG S folds to s
    ("(?i)[^k]", "K", False),
    ("(?i)[^k]", "\u212a", False),
    ("(?i)\u212a", "k", True),
    ("(?i)σ", "ς", True),
    ("(?i)ǆ", "ǅ", True),
    ("(?i)ß", "ẞ", True),
    ("(?i)i", "ı", False),                    # dotless i has no simple folding partner
    ("(?i)[a-z]+", "ABCxyz", True),
    ("(?i)[[:upper:]]", "q", True),
    ("(?i)\\W", "k", False),
    ("(?i:A)b", "ab", True),
    ("(?i:A)b", "aB", False),
    ("(?i)a(?-i)b", "Ab", True),
    ("(?i)a(?-i)b", "AB", False),
    ("(?i)a|b", "B", True),                   # flags hold across | until the group closes
    ("(?i-s:A.)", "a\n", False),
    ("(?s)(?-s:.)", "\n", False),
    ("(?s).", "\n", True),
    ("[^a]", "\n", True),                     # negated classes match newline
    ("(?m)^a$\\n^b$", "a\nb", True),
    ("(?m)a$", "a", True),
    ("(?m)^", "", True),
    ("(?m)a\\n^", "a\n", True),
    ("a\\n^", "a\n", False),
    ("\\Aa\\z", "a", True),
    ("\\bfoo\\b", "foo", True),
    ("a\\bb", "ab", False),
    ("a\\Bb", "ab", True),
    ("é\\b", "é", False),                     # \b is ASCII: é is not a word character
    ("(?U)a+", "aaa", True),
    ("a+?b??c*?d{1,2}?", "aaabdd", True),
    ("(?)a", "a", True),
    ("(?:)", "", True),
    ("a|", "", True),
    ("|", "", True),
    ("()", "", True),
    ("(|a)+", "aaa", True),
    ("(a*)*", "", True),
    ("(a*)+b", "aab", True),
    ("$*a", "a", True),                       # Go accepts a repeated assertion (zero times here)
    ("(?P<name>a)(?<other>b)", "ab", True),
    ("[]a]+", "]a]", True),
    ("[^]a]", "]", False),
    ("[a-]+", "a-", True),
    ("[-a]+", "-a", True),
    ("[a-c-e]+", "b-e", True),
    ("[[]", "[", True),
    ("[\\]\\\\]+", "]\\", True),
    ("[\\x00-\\x{10FFFF}]", "\U0010ffff", True),
    ("[[:^alpha:]]", "1", True),
    ("[[:^alpha:]]", "a", False),
    ("[[:word:][:punct:]]+", "a_!", True),
    ("[\\D]", "a", True),
    ("[^\\D]", "5", True),
    ("[^\\x00-\\x{10FFFF}]", "a", False),
    ("ab*", "abab", False),                  # the repeat binds to b only
]


@pytest.mark.parametrize(("pattern", "value", "expected"), GO_ROWS)
def test_go_semantics(pattern: str, value: str, expected: bool) -> None:
    assert compile_regex(pattern).fullmatch(value) is expected


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("b", "abc", True), ("^b", "abc", False), ("c$", "abc", True), ("(?m)^b$", "a\nb\nc", True),
    ("x*", "abc", True), ("\\bbc", "abc", False), ("\\bbc", "a bc", True), ("", "", True),
])
def test_search_finds_a_match_anywhere(pattern: str, value: str, expected: bool) -> None:
    assert compile_regex(pattern).search(value) is expected


# ---------------------------------------------------------------------------------------------------
# What Go's regexp refuses is a policy error that names the construct and the position

@pytest.mark.parametrize(("pattern", "fragment"), [
    ("(", "missing closing )"), ("a)", "unexpected )"), ("[a", "missing closing ]"), ("[]", "missing closing ]"),
    ("[[:alpha:]", "missing closing ]"), ("a**", "invalid nested repetition operator '*'"),
    ("a++", "invalid nested repetition"), ("a{2}{3}", "invalid nested repetition"), ("*a", "missing argument"),
    ("a|*", "missing argument"), ("(?i)*", "missing argument"), ("a{1001}", "invalid repeat count"),
    ("a{3,2}", "invalid repeat count"), ("(a{100}){11}", "exceed 1000 copies"), ("(?=a)", "lookahead"),
    ("(?!a)", "negative lookahead"), ("(?<=a)b", "lookbehind"), ("(?<!a)b", "negative lookbehind"),
    ("(?P=n)", "backreference"), ("(?>a)", "atomic group"), ("(?#c)", "comment group"), ("(a)\\1", "backreferences"),
    ("\\8", "invalid escape \\8"), ("\\e", "invalid escape \\e"), ("a\\Z", "invalid escape \\Z"),
    ("\\C", "\\C"), ("\\é", "invalid escape"), ("a\\", "trailing backslash"), ("(?x)a", "flag group '(?x'"),
    ("(?i-)a", "flag group"), ("(?-)a", "flag group"), ("(?i", "flag group"), ("(?P<>a)", "invalid named capture"),
    ("(?P<a-b>a)", "invalid named capture"), ("(?P<a", "invalid named capture"), ("[z-a]", "range 'z-a'"),
    ("[[:foo:]]", "invalid character class [:foo:]"), ("\\p{Greek}", "only general categories"),
    ("\\p{L", "not closed"), ("\\p", "needs a name"), ("\\xZZ", "two hex digits"), ("\\x{110000}", "10FFFF"),
    ("\\x{}", "\\x{HEX}"), ("[\\b]", "invalid escape \\b"), ("(" * 101 + ")" * 101, "nested more than 100 deep"),
])
def test_refused_patterns(pattern: str, fragment: str) -> None:
    with pytest.raises(RegexError) as exc:
        check(pattern)
    message = str(exc.value)
    assert fragment in message, message
    assert message.startswith("is not valid RE2 syntax: ") and "(at position " in message


def test_error_positions() -> None:
    with pytest.raises(RegexError, match=r"at position 4\)"):
        check("abc|**")
    with pytest.raises(RegexError, match=r"at position 2\)"):
        check("ab[c")


def test_stacked_repeats_are_bounded() -> None:
    """`a*(?i)*` is valid Go (the flag group resets the repeat check); stacking it stays bounded."""
    assert compile_regex("a*(?i)*").fullmatch("aaa")
    with pytest.raises(RegexError, match="nested more than 100 deep"):
        check("a" + "*(?i)" * 150)


def test_program_size_is_bounded() -> None:
    check("[a-z]{1000}")
    check("[^=]{0,1000}=.{0,1000}")
    with pytest.raises(RegexError, match="too large"):
        check("(abcdefghijklmnopqrstuvwxyz){1000}")


# ---------------------------------------------------------------------------------------------------
# Linear time on the pathological cases (operation counts, plus a generous wall-clock bound)

PATHOLOGICAL = [
    ("FABRIC_.+=.+", "FABRIC_" + "=" * 100_000 + "\n", False),   # quadratic for a backtracker
    ("FABRIC_.+=.+", "FABRIC_" + "x=" * 50_000, True),
    ("(A|AA)+=1", "A" * 100_000 + "!", False),                    # exponential for a backtracker
    ("(A|AA)+=1", "A" * 100_000 + "=1", True),
    ("(a*)*b", "a" * 100_000, False),
    ("(x+x+)+y", "x" * 100_000, False),
    ("(.*)*,(.*)*,(.*)*=", "a," * 50_000, False),
    ("(?i)(a|aa|aaa|\\w)*k", "A" * 100_000, False),
]


@pytest.mark.parametrize(("pattern", "text", "expected"), PATHOLOGICAL,
                         ids=[p for p, _, _ in PATHOLOGICAL])
def test_pathological_inputs_take_linear_time(pattern: str, text: str, expected: bool) -> None:
    regex = compile_regex(pattern)
    matcher = regex._whole
    steps_before = matcher.steps
    start = time.process_time()
    assert regex.fullmatch(text) is expected
    elapsed = time.process_time() - start
    # Every character is one cached lookup after a handful of distinct states have been built.
    assert matcher.steps - steps_before <= 64
    assert elapsed < 5.0, f"{pattern}: {elapsed:.2f} s of CPU for {len(text)} characters"


def test_state_blowup_is_still_linear() -> None:
    """(a|b)*a(a|b){12} needs 2**13 DFA states: the cache is dropped and rebuilt, each character costs at
    most one pass over the program, and the answer stays right."""
    pattern = "(a|b)*a(a|b){12}"
    regex = compile_regex(pattern)
    rng = random.Random(7)
    text = "".join(rng.choice("ab") for _ in range(20_000))
    program = len(regex._whole.program)
    before = regex._whole.steps
    assert regex.fullmatch(text) is (text[-13] == "a")
    assert regex._whole.steps - before <= len(text)
    assert program < 200
    assert regex.fullmatch(text[:-13] + "a" + text[-12:])


def test_matchers_are_thread_safe_across_cache_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(re2machine, "MAX_STATES", 8)
    regex = compile_regex("(a|b)*a(a|b){6}x")
    rng = random.Random(3)
    texts = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 300))) + "x" for _ in range(200)]
    expected = [re.fullmatch("(a|b)*a(a|b){6}x", t) is not None for t in texts]
    failures: list[str] = []

    def worker() -> None:
        for t, want in zip(texts, expected, strict=True):
            if regex.fullmatch(t) is not want:
                failures.append(t)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# ---------------------------------------------------------------------------------------------------
# Differential test against Python's re on the subset both read the same way

def _random_pattern(rng: random.Random, multiline: bool, depth: int = 0) -> tuple[str, str]:
    """A random pattern as (Go spelling, Python spelling); same language by construction."""
    roll = rng.random()
    if depth > 3 or roll < 0.35:
        kind = rng.choice(["lit", "lit", "lit", "dot", "class", "nclass", "perl", "anchor", "esc"])
        if kind == "lit":
            c = rng.choice("abAB-_ ")
            return re.escape(c), re.escape(c)
        if kind == "dot":
            return ".", "."
        if kind in ("class", "nclass"):
            body = rng.choice(["ab", "a-c", "A-Z_", "b\\-", "\\d", "a\\n", "_\\s"])
            neg = "^" if kind == "nclass" else ""
            return f"[{neg}{body}]", f"[{neg}{body}]"
        if kind == "perl":
            c = rng.choice("dDwWsS")
            py = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]",
                  "s": "[\\t\\n\\f\\r ]", "S": "[^\\t\\n\\f\\r ]"}[c]
            return "\\" + c, py
        if kind == "anchor":
            # Python's $ also matches before a final newline; Go's (without (?m)) only at the end.
            return rng.choice([("^", "^"), ("$", "$" if multiline else "\\Z"), ("\\b", "\\b"), ("\\B", "\\B"),
                               ("\\A", "\\A"), ("\\z", "\\Z")])
        return "\\n", "\\n"
    if roll < 0.55:
        parts = [_random_pattern(rng, multiline, depth + 1) for _ in range(rng.randint(2, 3))]
        return "".join(g for g, _ in parts), "".join(p for _, p in parts)
    if roll < 0.75:
        parts = [_random_pattern(rng, multiline, depth + 1) for _ in range(rng.randint(2, 3))]
        return "(?:" + "|".join(g for g, _ in parts) + ")", "(?:" + "|".join(p for _, p in parts) + ")"
    go, py = _random_pattern(rng, multiline, depth + 1)
    if go in ("^", "$", "\\b", "\\B", "\\A", "\\z"):
        return go, py  # Python cannot repeat an assertion
    op = rng.choice(["*", "+", "?", "{2}", "{1,3}", "{0,}", "*?", "+?", "??"])
    return f"(?:{go}){op}", f"(?:{py}){op}"


@pytest.mark.parametrize("seed", range(8))
def test_differential_against_python_re(seed: int) -> None:
    rng = random.Random(seed)
    checked = 0
    for _ in range(300):
        flags = rng.choice(["", "(?i)", "(?m)", "(?s)", "(?im)"])
        go, py = _random_pattern(rng, "m" in flags)
        go, py = flags + go, flags + py
        try:
            ours = compile_regex(go)
            theirs = re.compile(py, re.ASCII)
        except (RegexError, re.error):
            pytest.fail(f"{go!r} / {py!r} must compile in both")
        for _ in range(12):
            text = "".join(rng.choice("abAB-_ \n1") for _ in range(rng.randint(0, 10)))
            if not text and "\\B" in go:
                continue  # Python's \B never matches in an empty string; Go's does
            assert ours.fullmatch(text) is (theirs.fullmatch(text) is not None), (go, py, text)
            assert ours.search(text) is (theirs.search(text) is not None), (go, py, text)
            checked += 1
    assert checked > 300 * 11


# ---------------------------------------------------------------------------------------------------
# The Unicode tables this relies on

def test_no_cased_character_after_last_cased() -> None:
    for cp in range(re2charset.LAST_CASED + 1, re2charset.MAX_CODE_POINT + 1):
        char = chr(cp)
        assert re2charset.fold_key(char) == char and char.upper() == char, hex(cp)


def test_fold_orbits_match_go_on_known_cases() -> None:
    orbit = re2charset.ORBITS.orbit
    assert set(orbit(ord("k"))) == {ord("k"), ord("K"), 0x212A}
    assert set(orbit(ord("s"))) == {ord("s"), ord("S"), 0x17F}
    assert set(orbit(ord("σ"))) == {ord("σ"), ord("ς"), ord("Σ")}
    assert set(orbit(ord("ß"))) == {ord("ß"), 0x1E9E}
    assert orbit(0x130) == (0x130,) and orbit(0x131) == (0x131,)
    assert unicodedata.category("ǅ") == "Lt" and set(orbit(ord("ǅ"))) == {0x1C4, 0x1C5, 0x1C6}
