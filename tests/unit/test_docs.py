"""The documentation works as written: every relative link resolves (the file, and the heading
an ``#anchor`` names), and every ``trainbus …`` command in a shell block parses with the real
command line (a misspelt command or option fails here, not for a reader)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from runtime.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "("}


def _prose(text: str) -> str:
    """The page without its fenced blocks: a link or heading inside a code block is not one."""
    return _FENCE.sub("", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_prose(page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


def trainbus_commands(text: str) -> list[list[str]]:
    """Each ``trainbus`` command line in the shell blocks of ``text``, as the words after ``trainbus``."""
    found = []
    for language, body in _FENCE.findall(text):
        if language not in SHELL_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            starts = [i for i, w in enumerate(words) if w == "trainbus" and (i == 0 or _command_position(words, i))]
            for start in starts:
                rest = words[start + 1 :]
                end = next((i for i, w in enumerate(rest) if w in _OPERATORS), len(rest))
                found.append(rest[:end])
    return found


def _command_position(words: list[str], i: int) -> bool:
    """``trainbus`` starts a command: after an operator or after ``VAR=value`` assignments only."""
    before = words[:i]
    while before and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", before[-1]):
        before.pop()
    return not before or before[-1] in _OPERATORS


def parse_error(argv: list[str]) -> str | None:
    """What the real parser says about ``trainbus ARGV`` without running it (None: it parses)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:
        return f"exit {exc.code}"
    # as in runtime.cli.main: KEY=VALUE pairs may follow options of a command that takes values
    if extra and not (getattr(args, "values", None) is not None and all("=" in e for e in extra)):
        return f"unrecognized arguments: {' '.join(extra)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_trainbus_command_in_a_shell_block_parses(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused = {}
    for argv in trainbus_commands(page.read_text()):
        error = parse_error(argv)
        if error is not None:
            refused[" ".join(argv)] = error + " " + capsys.readouterr().err.strip()
    assert not refused, f"{page.relative_to(REPO)}: {refused}"


_TEST_REF = re.compile(r"`((?:tests/[\w/]+\.py)?)(?:::(\w+))?`")


def named_tests(text: str) -> list[tuple[str, str]]:
    """Each ``tests/….py[::name]`` a page names; a bare ``::name`` belongs to the file named before it."""
    refs, last = [], ""
    for path, name in _TEST_REF.findall(text):
        last = path or last
        if last and (path or name):
            refs.append((last, name))
    return refs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_a_page_names_exists(page: Path) -> None:
    missing = []
    for path, name in named_tests(page.read_text()):
        file = REPO / path
        if not file.exists():
            missing.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", file.read_text(), re.MULTILINE):
            missing.append(f"{path}::{name}")
    assert not missing, f"{page.relative_to(REPO)} names tests that do not exist: {missing}"


def test_the_readme_shows_trainbus_commands() -> None:
    # the checks above are only as good as what they find
    assert len(trainbus_commands((REPO / "README.md").read_text())) >= 5


@pytest.mark.parametrize(
    "command",
    [
        "trainbus trian configs/tiny.yaml",  # a misspelt command
        "trainbus runs --stale running",  # a misspelt option
        "trainbus ctl pause",  # a required option left out
        "trainbus events --run my-run --folow",
    ],
)
def test_a_misspelt_command_in_the_docs_would_fail(command: str) -> None:
    [argv] = trainbus_commands(f"```sh\n{command}   # comment\n```\n")
    assert parse_error(argv) is not None


def test_commands_are_found_after_pipes_and_variables_and_not_in_comments() -> None:
    text = (
        "```sh\n"
        'echo "hi" | trainbus predict --alias risk --json -\n'
        "NATS_USER=operator NATS_PASSWORD=$X trainbus runs --csv > runs.csv\n"
        "trainbus up &   # then trainbus bogus\n"
        "```\n"
        "```python\ntrainbus bogus\n```\n"
    )
    assert trainbus_commands(text) == [["predict", "--alias", "risk", "--json", "-"], ["runs", "--csv"], ["up"]]
