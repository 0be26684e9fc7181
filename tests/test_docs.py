"""The documentation runs as written: every `essence` command in the README and docs/ parses,
the cheap ones run, and the configuration reference matches the schema."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from essence.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Commands cheap enough to run in the suite (seconds, offline).
CHEAP = ("essence data profile", "essence data show", "essence data synth")


def commands() -> list[tuple[str, str]]:
    """(page, command) for every line of a bash block that starts with `essence `."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("essence ") and "$" not in line:
                    found.append((page.name, line))
    return found


def test_docs_have_commands():
    assert len(commands()) >= 10


@pytest.mark.parametrize("page,command", commands(), ids=[f"{p}:{c[:60]}" for p, c in commands()])
def test_command_parses(page, command):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{page}: `{command}` does not parse (exit {err.code})")


def _offline(command: str) -> bool:
    """Cheap and offline: a CHEAP command whose inputs are the repository's own files."""
    return command.startswith(CHEAP) and ("tests/fixtures" in command or " synth " in command)


@pytest.mark.parametrize("command", [c for _, c in commands() if _offline(c)])
def test_cheap_command_runs(command, tmp_path):
    argv = [a.replace("runs/", f"{tmp_path}/") for a in shlex.split(command)[1:]]
    done = subprocess.run([sys.executable, "-m", "essence", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_config_reference_is_current():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
