"""Every `$ ...` line of the ```console blocks of README.md and docs/*.md runs as typed, in order, from an
empty directory.

Each block runs as one bash session (`bash -c`, so `cd` and `echo $?` behave as at a prompt) in a fresh
empty directory, all blocks at once (their interpreter start-ups overlap), with this environment's
cpift-merge / cpift-train / torchrun first on PATH and the Hub pointed at the loopback server of
tests/merge/fake_hub.py (HF_ENDPOINT), so nothing reaches the network. Each line's exit status must be
the one the page implies: the value a following
`$ echo $?` shows, else 2 where the shown output has a `cpift-...: error:` line (and that line must
be what the command printed), else 0; each `-o PATH` of a successful line must exist afterwards. A
block is skipped only when the line right before it is a visible `<!-- not run by tests: REASON -->`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "merge"))
from fake_hub import FakeHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # every page whose blocks run
SKIP_MARK = re.compile(r"^<!-- not run by tests: (.+?) -->$")
ERROR_LINE = re.compile(r"^cpift-(merge|train): error: ")
STATUS_ECHO = "echo $?"


@dataclass
class Command:
    text: str  # continuations joined
    shown: list[str] = field(default_factory=list)  # the output lines the README shows under it


@dataclass
class Block:
    line: int  # of the ```console fence, 1-based
    title: str  # the section heading above it
    commands: list[Command]
    skip: str | None = None  # the marker's reason
    page: str = "README.md"  # the document's path from the repository root

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line} ({self.title})"

    @property
    def key(self) -> str:
        return f"{self.page.removesuffix('.md').replace('/', '-')}-line{self.line}"


def parse_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The ```console blocks of a Markdown text, with their `$ ` commands and the output shown under each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    title, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        if line.strip() != "```console":
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.match(before)
        block = Block(line=i + 1, title=title, commands=[], skip=mark.group(1) if mark else None, page=page)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            if line.startswith("$ "):
                text_ = line[2:]
                while text_.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text_ = text_[:-1].rstrip() + " " + lines[i].strip()
                block.commands.append(Command(text_))
            elif block.commands:
                block.commands[-1].shown.append(line)
            i += 1
        blocks.append(block)
        i += 1
    return blocks


def expected_status(commands: list[Command], i: int) -> int:
    """The exit status the README implies for commands[i]."""
    if i + 1 < len(commands) and commands[i + 1].text.strip() == STATUS_ECHO:
        return int(commands[i + 1].shown[0])
    if commands[i].text.rstrip().endswith(STATUS_ECHO):  # `cmd; echo $?`: echo's own status
        return 0
    return 2 if any(ERROR_LINE.match(s) for s in commands[i].shown) else 0


def output_paths(command: str) -> list[str]:
    """The PATH of every `-o PATH` / `--out PATH` in a command line (all parts of a compound one)."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = list(lex)
    return [words[k + 1] for k, w in enumerate(words[:-1]) if w in ("-o", "--out")]


def session_script(commands: list[Command], log: Path) -> str:
    """One bash script: each command with its output in log/N.out, log/N.err, then `status<TAB>$PWD`
    appended to log/status; `$?` is restored after the bookkeeping, so `echo $?` sees the command's."""
    parts = []
    for n, c in enumerate(commands):
        parts.append(f"{{ {c.text}\n}} >{shlex.quote(str(log / f'{n}.out'))} 2>{shlex.quote(str(log / f'{n}.err'))}\n"
                     f"__s=$?; printf '%s\\t%s\\n' \"$__s\" \"$PWD\" >>{shlex.quote(str(log / 'status'))}; "
                     f"(exit $__s)\n")
    return "".join(parts)


BLOCKS = [b for doc in DOCUMENTS for b in parse_blocks(doc.read_text(), doc.relative_to(ROOT).as_posix())]


def session_env(root: Path, hub: FakeHub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               HF_HOME=str(root / "hf-home"), HF_TOKEN="hf_loopback_test_token", HF_ENDPOINT=hub.url,
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, request):
    """The selected blocks' sessions started at once (each in its own empty directory, one Hub for all),
    so their interpreter start-ups overlap; each test then waits for its own."""
    params = (getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items)
    selected = {p["block"].key for p in params if isinstance(p.get("block"), Block)}  # other files have "block" too
    hub = FakeHub()
    started = {}
    for block in BLOCKS:
        if block.skip or block.key not in selected:
            continue
        root = tmp_path_factory.mktemp(f"readme-{block.key}")
        (root / "work").mkdir()
        (root / "log").mkdir()
        script = session_script(block.commands, root / "log")
        started[block.key] = (subprocess.Popen(["bash", "-c", script], cwd=root / "work",
                                                env=session_env(root, hub)), root / "log")
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    hub.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.key for b in BLOCKS])
def test_readme_console_block_runs_as_typed(block: Block, sessions):
    if block.skip:
        pytest.skip(f"{block.name}: {block.skip}")
    proc, log = sessions[block.key]
    proc.wait(timeout=900)
    statuses = (log / "status").read_text().splitlines() if (log / "status").exists() else []
    assert len(statuses) == len(block.commands), f"{block.name}: the session stopped after {len(statuses)} lines"
    for n, (command, status) in enumerate(zip(block.commands, statuses)):
        code, pwd = status.split("\t", 1)
        out, err = (log / f"{n}.out").read_text(), (log / f"{n}.err").read_text()
        where = f"{block.name}: $ {command.text}\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-3000:]}"
        assert int(code) == expected_status(block.commands, n), where
        if command.text.strip() == STATUS_ECHO or command.text.rstrip().endswith(STATUS_ECHO):
            assert out.splitlines()[-1:] == command.shown[-1:], where  # the status the README shows
        shown_errors = [s for s in command.shown if ERROR_LINE.match(s)]
        if int(code) != 0 or command.text.rstrip().endswith(STATUS_ECHO):
            printed = [s for s in err.splitlines() if ERROR_LINE.match(s)]
            assert printed == shown_errors, where
        if int(code) == 0:
            for path in output_paths(command.text):
                assert (Path(pwd) / path).exists(), f"{where}\n-o {path} does not exist"
        assert "Traceback" not in err, where


def test_every_console_block_is_run_or_visibly_skipped():
    skipped = [b for b in BLOCKS if b.skip]
    assert len(BLOCKS) >= 5 and all(b.commands for b in BLOCKS)
    assert {b.page for b in BLOCKS} > {"README.md"}, "docs/*.md blocks are not collected"
    assert len(skipped) <= 1, f"{len(skipped)} blocks skipped: {[b.name for b in skipped]}"
    print(f"{len(BLOCKS) - len(skipped)} console blocks run, {len(skipped)} skipped"
          + "".join(f"\n  skipped {b.name}: {b.skip}" for b in skipped))


SAMPLE = """# T
## One
```console
$ cpift-merge slerp a b \\
      --t 1.5 -o out
cpift-merge: error: t: 1.5 is outside [0.0, 1.0]
$ echo $?
2
$ cpift-train pull x; echo $?
cpift-train: error: x: no
2
$ ls out && cpift-merge linear a b -o 'c d' --out=e
c
```

<!-- not run by tests: needs the real Hub -->

```console
$ cpift-merge push x org/y
```
"""


def test_parse_blocks_reads_commands_statuses_outputs_and_markers():
    one, two = parse_blocks(SAMPLE)
    assert [c.text for c in one.commands] == ["cpift-merge slerp a b --t 1.5 -o out", "echo $?",
                                              "cpift-train pull x; echo $?",
                                              "ls out && cpift-merge linear a b -o 'c d' --out=e"]
    assert one.commands[0].shown == ["cpift-merge: error: t: 1.5 is outside [0.0, 1.0]"]
    assert [expected_status(one.commands, i) for i in range(4)] == [2, 0, 0, 0]
    assert output_paths(one.commands[3].text) == ["c d"]
    assert (one.line, one.title, one.skip) == (3, "One", None)
    assert two.skip == "needs the real Hub" and two.name == "README.md:18 (One)"
    assert parse_blocks(SAMPLE, "docs/x.md")[0].key == "docs-x-line3"
    assert [c.text for c in two.commands] == ["cpift-merge push x org/y"]
