"""The command blocks of README.md, docs/*.md and examples/*/README.md, and a runner that follows a document the
way a reader does: its runnable blocks in order, in one scratch directory, with the venv's `parma-sandbox`.

Every fenced `sh` block says what it is in its info string:

    ```sh runnable [vm] [exit=N]    commands to run: `vm` when they boot a UVM (vm tier; tools tier otherwise),
                                    `exit=N` when the block must end with status N (default 0)
    ```sh synopsis                  usage lines with placeholders, not commands
    ```sh skip=REASON               commands that cannot run offline on a test machine (network, snp, docker...)

and two kinds of blocks serve the runnable ones:

    ```LANG file=PATH               a file the text tells the reader to save: written (relative to the scratch
                                    directory) before the blocks that follow it run
    ```text output                  what the runnable block just before it prints: each non-blank line must appear
                                    in that block's stdout or stderr (`...` inside a line matches anything)

How a document runs: blocks run in document order, each by `bash -euo pipefail` in the same scratch directory,
which links `examples/` and `build/` to the checkout (so the docs' relative paths work and the
example images are found). The venv's bin directory comes first on PATH; PARMA_SANDBOX_RUNTIME and
PARMA_SANDBOX_KBS_STORE point into the scratch directory, so `down --all` and the key broker's store touch
nothing else. The loopback ports the docs use (DOC_PORTS) are replaced by free ports, consistently in every
block of the document, so that runs in parallel do not collide. Background processes a block starts (`&`)
are stopped when the document ends, and so is every sandbox it left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOC_PORTS = (5000, 8300, 18080)   # registry, key broker, the guide's forwarded port
LINKED = ("examples", "build")
FENCE = re.compile(r"^(```+)\s*([^`]*)$")
SHELL_LANGS = ("sh", "bash", "shell", "console")
KINDS = ("runnable", "synopsis", "skip")


def documents() -> list[Path]:
    """The documents whose blocks are checked: README.md, docs/*.md, examples/*/README.md."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*/README.md"))]
    return [d for d in docs if d.is_file()]


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int                    # of the opening fence, 1-based
    lang: str
    words: tuple[str, ...]       # the info string after the language
    text: str

    @property
    def where(self) -> str:
        doc = self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc
        return f"{doc}:{self.line}"

    def attr(self, key: str) -> str | None:
        for w in self.words:
            k, sep, v = w.partition("=")
            if sep and k == key:
                return v
        return None

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS

    @property
    def runnable(self) -> bool:
        return self.is_shell and "runnable" in self.words

    @property
    def vm(self) -> bool:
        return self.runnable and "vm" in self.words

    @property
    def file(self) -> str | None:
        return self.attr("file")

    @property
    def output(self) -> bool:
        return self.lang == "text" and "output" in self.words

    @property
    def expected_exit(self) -> int:
        return int(self.attr("exit") or 0)


def blocks(doc: Path) -> list[Block]:
    out = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, info = m.group(1), m.group(2).split()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != ticks:
            body.append(lines[i])
            i += 1
        i += 1
        lang = info[0] if info else ""
        out.append(Block(doc, start + 1, lang, tuple(info[1:]), "\n".join(body) + "\n"))
    return out


def classification_problems(block: Block) -> list[str]:
    """What is wrong with a block's markers (empty when it is fine)."""
    problems = []
    if block.is_shell:
        kinds = [w for w in block.words if w.split("=")[0] in KINDS]
        if len(kinds) != 1:
            problems.append(f"{block.where}: a ```{block.lang} block says exactly one of 'runnable', 'synopsis' "
                            f"or 'skip=REASON' (found {list(block.words)}); see tests/docblocks.py")
        elif kinds[0].startswith("skip") and not block.attr("skip"):
            problems.append(f"{block.where}: 'skip' needs a reason: skip=network, skip=snp, ...")
        known = {"runnable", "vm", "synopsis"}
        for w in block.words:
            if w not in known and w.split("=")[0] not in ("skip", "exit"):
                problems.append(f"{block.where}: unknown marker {w!r}")
        exit_code = block.attr("exit")
        if exit_code is not None and (not block.runnable or not exit_code.isdigit()):
            problems.append(f"{block.where}: exit=N (a number) belongs to runnable blocks")
    if block.file is not None and (block.file.startswith("/") or ".." in Path(block.file).parts):
        problems.append(f"{block.where}: file= must be a relative path inside the scratch directory")
    return problems


def runnable_documents(*, vm: bool) -> list[Path]:
    """Documents with runnable blocks: those with a `vm` block (vm=True) or those without (vm=False)."""
    out = []
    for doc in documents():
        bs = blocks(doc)
        if any(b.runnable for b in bs) and any(b.vm for b in bs) == vm:
            out.append(doc)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
    return text


def _line_pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in line.strip().split("...")))


@dataclass
class Session:
    """One document being followed: its scratch directory, environment, and what it started."""

    doc: Path
    root: Path
    ports: dict[int, int] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PARMA_SANDBOX_RUNTIME", "PARMA_SANDBOX_KBS"))}
        env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                    "PARMA_SANDBOX_RUNTIME": str(self.root / ".run"),
                    "PARMA_SANDBOX_KBS_STORE": str(self.root / ".kbs"),
                    "PYTHONDONTWRITEBYTECODE": "1"})
        return env

    def run(self, block: Block, timeout: float) -> tuple[int, str, str]:
        n = len(self.groups)
        out_path, err_path = self.root / f".block-{n}.out", self.root / f".block-{n}.err"
        script = _substitute(block.text, self.ports)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Output goes to files, not pipes: a background process the block starts keeps its descriptors.
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=self.root, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            self.groups.append(proc.pid)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                code = -1
        return code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")

    def stop(self) -> None:
        for pgid in self.groups:
            _kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for pgid in self.groups:
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _kill_group(pgid, signal.SIGKILL)
        if any((self.root / ".run").glob("*")):
            subprocess.run(["parma-sandbox", "down", "--all"], cwd=self.root, env=self.env, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def session(doc: Path, root: Path) -> Iterator[Session]:
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    s = Session(doc, root, {port: free_port() for port in DOC_PORTS})
    try:
        yield s
    finally:
        s.stop()


def follow(doc: Path, root: Path, *, timeout: float) -> None:
    """Run the document's blocks in order; AssertionError with the block, its output and the reason on failure."""
    with session(doc, root) as s:
        last: tuple[Block, str] | None = None
        for block in blocks(doc):
            if block.file is not None:
                target = root / block.file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(_substitute(block.text, s.ports))
            elif block.runnable:
                code, out, err = s.run(block, timeout)
                if code != block.expected_exit:
                    raise AssertionError(
                        f"{block.where}: exited {code}, expected {block.expected_exit}\n--- block (ports "
                        f"{s.ports}):\n{block.text}--- stdout:\n{out[-4000:]}--- stderr:\n{err[-4000:]}")
                last = (block, out + err)
            elif block.output:
                if last is None:
                    raise AssertionError(f"{block.where}: an output block must follow a runnable block")
                source, printed = last
                for line in _substitute(block.text, s.ports).splitlines():
                    if line.strip() and not _line_pattern(line).search(printed):
                        raise AssertionError(f"{block.where}: {line.strip()!r} is not in what {source.where} "
                                             f"printed:\n{printed[-4000:]}")


def ensure_example_image() -> None:
    """build/images/busybox, which the examples' group files name (`make example-images` builds the same)."""
    if not (REPO / "build" / "images" / "busybox" / "index.json").exists():
        subprocess.run([sys.executable, str(REPO / "images" / "examples" / "busybox.py")], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
