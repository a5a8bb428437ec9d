"""The docs stay true: every command they show exists, every relative link resolves.

Commands are the lines of fenced code blocks in README.md and docs/*.md that start with
``make `` or ``simstream `` (also after ``&&``, ``;`` or ``|``); backslash continuations are
joined, ``# comments``, ``NAME=value`` prefixes and redirections dropped, and ``[optional]``
brackets ignored. ``make X`` needs a target X in the Makefile; ``simstream a b --opt`` must
resolve to a command of the click CLI that answers ``--help`` and has every ``--opt`` shown.
Links are checked down to the heading anchor. No Kafka: nothing runs but ``--help``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from streams.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def fenced_lines(text: str) -> list[str]:
    """Logical lines inside fenced code blocks, backslash continuations joined."""
    out: list[str] = []
    inside = False
    pending = ""
    for line in text.splitlines():
        if _FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        out.append(line)
    return out


_SEPARATORS = {"&&", "||", ";", "|", "&"}
_CANDIDATE = re.compile(r"(^|[;&|]\s*)([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(make|simstream)(\s|$)")


def _tokens(line: str) -> list[str]:
    """Shell words of a line; operators (``&&``, ``|``, ``>`` ...) are words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def commands_in(text: str) -> list[str]:
    """Every ``make ...`` / ``simstream ...`` command in the fenced blocks of ``text``."""
    found: list[str] = []
    for line in fenced_lines(text):
        try:
            tokens = _tokens(line)
        except ValueError:  # unbalanced quotes: fine in a JSON sample, a bug in a command
            assert not _CANDIDATE.search(line.strip()), f"cannot parse the command line: {line!r}"
            continue
        command: list[str] = []
        redirected = False
        for token in [*tokens, ";"]:
            if token in _SEPARATORS:
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)  # NAME=value before the command
                if command and command[0] in ("make", "simstream"):
                    found.append(shlex.join(command))
                command, redirected = [], False
            elif re.fullmatch(r"[0-9]*[<>]+&?", token):
                redirected = True  # the rest is the redirection's target, not the command's
            elif not redirected:
                command.append(token)
    return found


def documented_commands() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in commands_in(doc.read_text("utf-8"))]


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text("utf-8")
    targets: set[str] = set()
    for match in re.finditer(r"^([A-Za-z0-9_.\-/ ]+?)\s*:(?!=)", text, re.MULTILINE):
        targets.update(match.group(1).split())
    return targets


def _words(command: str) -> list[str]:
    """The words of a command, without ``[`` ``]`` of optional parts."""
    return [w for w in (t.strip("[]") for t in shlex.split(command)) if w]


def _options(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if re.match(r"^--?[A-Za-z]", w)}


def resolve(words: list[str]) -> tuple[list[str], click.Command]:
    """The (sub)command path the words name, and that command; fails when one does not exist."""
    command: click.Command = main
    path: list[str] = []
    for word in words:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.get_command(click.Context(command), word)
        assert sub is not None, f"`simstream {' '.join([*path, word])}` is not a command"
        command, path = sub, [*path, word]
    assert not isinstance(command, click.Group) or "--help" in words or "-h" in words, (
        f"`simstream {' '.join(path)}` is a group: name one of its commands"
    )
    return path, command


def options_of(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def test_docs_show_commands() -> None:
    commands = [cmd for _, cmd in documented_commands()]
    assert any(cmd.startswith("make demo") for cmd in commands)
    assert any(cmd.startswith("simstream worker") for cmd in commands)


def test_fenced_lines_join_continuations_and_drop_comments() -> None:
    text = (
        "text\n```bash\nsimstream eval sessions --train a \\\n  --test b   # a comment, --not-an-option\n"
        "make demo && SIMSTREAM_K=5 simstream worker\n"
        "simstream settings --markdown > docs/configuration.md\n"
        "{\"title\": \"noah's ark\"}\n```\nmake nope\n"
    )
    assert commands_in(text) == [
        "simstream eval sessions --train a --test b", "make demo", "simstream worker", "simstream settings --markdown",
    ]


@pytest.mark.parametrize(("doc", "command"), [c for c in documented_commands() if c[1].startswith("make")])
def test_make_targets_shown_in_the_docs_exist(doc: str, command: str) -> None:
    targets = [w for w in _words(command)[1:] if "=" not in w and not w.startswith("-")]
    missing = [t for t in targets if t not in makefile_targets()]
    assert not missing, f"{doc}: `{command}` names Makefile targets that do not exist: {missing}"


@pytest.mark.parametrize(("doc", "command"), [c for c in documented_commands() if c[1].startswith("simstream")])
def test_simstream_commands_shown_in_the_docs_exist(doc: str, command: str) -> None:
    words = _words(command)[1:]
    path, cmd = resolve(words)
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, f"{doc}: `simstream {' '.join(path)} --help` failed:\n{result.output}"
    shown = _options(words)
    unknown = sorted(shown - options_of(cmd))
    assert not unknown, f"{doc}: `{command}` uses options that `simstream {' '.join(path)}` lacks: {unknown}"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


def relative_links(doc: Path) -> list[str]:
    """Targets of the page's markdown links and images that are not URLs, outside code."""
    prose = re.sub(r"`[^`]*`", "", "\n".join(_unfenced(doc.read_text("utf-8"))))
    return [t for t in _LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken = [t for t in relative_links(doc) if not t.startswith("#") and not (doc.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_of_relative_links_exist(doc: Path) -> None:
    broken = []
    for target in (t for t in relative_links(doc) if "#" in t):
        path, anchor = target.split("#", 1)
        page = (doc.parent / path) if path else doc
        if page.suffix == ".md" and page.exists() and anchor not in _anchors(page.read_text("utf-8")):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing headings: {broken}"


def _unfenced(text: str) -> list[str]:
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    for line in _unfenced(text):
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            title = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors
